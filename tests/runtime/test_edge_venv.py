"""The edge install end to end (opt-in: needs a package registry and ~30 s): NECTAR_EDGE_VENV=1 pytest ...

It runs tests/runtime/edge_venv.sh on the Nectar bundle this session built: a fresh virtual environment
with only runtime/requirements.txt, nectar_runtime from the checkout, one streamed and one sampled answer, and
one answer from a base bundle with a pack.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("edge_venv.sh")


@pytest.mark.skipif(os.environ.get("NECTAR_EDGE_VENV") != "1", reason="set NECTAR_EDGE_VENV=1 (needs a registry)")
def test_edge_venv_generates_without_torch(nectar_bundle, packs):
    env = {**os.environ, "BASE": str(packs["base"]), "PACK": str(packs["manual"])}
    done = subprocess.run(["bash", str(SCRIPT), str(nectar_bundle)], capture_output=True, text=True, timeout=900,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "edge_venv: ok" in done.stdout
