"""`python -m nectar_runtime` (runtime/__main__.py, generator.main) in a subprocess, and the no-torch guarantee
of the generation path (the runtime, and `nectar-export run`)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import TIMING


def test_edge_entry_point(nectar_bundle):
    done = subprocess.run([sys.executable, "-m", "nectar_runtime", str(nectar_bundle), "--prompt", "Hello?",
                           "--max-new-tokens", "4", "--stream"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert TIMING.match(done.stdout.strip().splitlines()[-1])


NO_TORCH = """
import sys
from nectar_runtime.generator import Generator
from nectar_runtime.sampling import Sampling
with Generator(sys.argv[1]) as g:
    r = g.generate("What is in the manual?", Sampling(max_new_tokens=8, temperature=0.7, top_p=0.9))
assert r.token_ids and r.prefill_ms > 0
from nectar_export.cli import main
try:
    main(["run", sys.argv[1], "--prompt", "Hi", "--max-new-tokens", "3"])
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
print(sorted(m for m in ("torch", "transformers") if m in sys.modules))
"""


def test_generation_imports_neither_torch_nor_transformers(nectar_bundle):
    done = subprocess.run([sys.executable, "-c", NO_TORCH, str(nectar_bundle)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
