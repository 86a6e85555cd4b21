#!/usr/bin/env bash
# The edge install, tested: a fresh virtual environment with only runtime/requirements.txt (pinned by
# constraints.txt), nectar_runtime taken from this checkout without installing the project, then one
# generation from a bundle made earlier (e.g. `nectar-export export ART -o BUNDLE`).
#
#   tests/runtime/edge_venv.sh BUNDLE ["question"]      # PYTHON=python3.12 to pick the interpreter
#
# With BASE=... PACK=... in the environment it also answers from a base bundle and a pack.
#
# Fails if the generation fails or if torch or transformers ended up in the environment.
set -euo pipefail

bundle=$(realpath "${1:?usage: edge_venv.sh BUNDLE [QUESTION]}")
question=${2:-"What does this document describe?"}
repo=$(cd "$(dirname "$0")/../.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

"${PYTHON:-python3}" -m venv "$work/venv"
"$work/venv/bin/pip" install -q --upgrade pip
"$work/venv/bin/pip" install -q -r "$repo/runtime/requirements.txt" -c "$repo/constraints.txt"
mkdir "$work/path"
ln -s "$repo/runtime" "$work/path/nectar_runtime"

if "$work/venv/bin/pip" list 2>/dev/null | grep -Eiq '^(torch|transformers) '; then
    echo "edge_venv: torch or transformers was installed into the edge environment" >&2
    exit 1
fi
cd "$work"
PYTHONPATH="$work/path" "$work/venv/bin/python" -m nectar_runtime "$bundle" --prompt "$question" \
    --max-new-tokens 16 --stream
if [[ -n "${BASE:-}" ]]; then
    PYTHONPATH="$work/path" "$work/venv/bin/python" -m nectar_runtime "$(realpath "$BASE")" \
        --pack "$(realpath "${PACK:?PACK goes with BASE}")" --prompt "$question" --max-new-tokens 8
fi
PYTHONPATH="$work/path" "$work/venv/bin/python" - "$bundle" <<'PY'
import sys
from nectar_runtime.generator import Generator
from nectar_runtime.sampling import Sampling
with Generator(sys.argv[1]) as g:
    result = g.generate("Once more, briefly?", Sampling(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=1))
assert result.token_ids, "no tokens generated"
loaded = sorted(m for m in ("torch", "transformers", "click") if m in sys.modules)
assert not loaded, f"the runtime imported {loaded}"
print(f"edge_venv: ok ({len(result.token_ids)} sampled tokens, nothing but the runtime's packages)")
PY
