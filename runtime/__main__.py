"""`python -m nectar_runtime BUNDLE --prompt TEXT`: generate from a bundle with only the runtime's packages."""

from __future__ import annotations

import sys

from nectar_runtime.generator import main

if __name__ == "__main__":
    sys.exit(main())
