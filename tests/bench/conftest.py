"""The bench scripts are programs, not a package: `python bench/X.py` puts bench/ first on sys.path, which is
how they import each other and bench/harness.py. The tests import them the same way, from this one place."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
