"""`python -m nectar_runtime.serve ...`: the OpenAI-compatible server (flags: --help)."""

from __future__ import annotations

import sys

from nectar_runtime.serve.server import main

if __name__ == "__main__":
    sys.exit(main())
