#!/usr/bin/env bash
# On the H200 host: a tiny random Llama with SmolLM2's tokenizer, fitted and exported here, then verify on
# ort-cpu and ort-cuda for the four bundle kinds; the reports go to $OUT.
set -euo pipefail
repo=$(pwd)
mkdir -p /tmp/shim && ln -sfn "$repo/nectar_export" /tmp/shim/nectar_export && ln -sfn "$repo/graphs" /tmp/shim/nectar_graphs \
  && ln -sfn "$repo/runtime" /tmp/shim/nectar_runtime
export PYTHONPATH=/tmp/site:/tmp/shim HF_HUB_OFFLINE=1
work=/tmp/gpucheck && rm -rf $work && mkdir -p $work && cd $work
python3 - "$repo/.gpucheck/tok" <<'PY'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
                  tie_word_embeddings=False, initializer_range=0.2)
LlamaForCausalLM(cfg).save_pretrained("ckpt"); tok.save_pretrained("ckpt")
PY
cli="python3 -m nectar_export.cli"
$cli fit --model ckpt --context-tokens 512 --quick --epochs 2 --no-ablations -o art 2>fit.err || { tail -20 fit.err; exit 1; }
for kind in nectar:"" nectar_static:"--cache static" full:"--baseline" full_static:"--baseline --cache static"; do
  $cli export art -o "${kind%%:*}" ${kind#*:} 2>>export.err || { tail -20 export.err; exit 1; }
done
for b in nectar nectar_static full full_static; do
  for backend in ort-cpu ort-cuda; do
    $cli verify $b --prompts 4 --backend $backend --json > "$OUT/verify-$b-$backend.json" 2>>verify.err \
      || { tail -5 verify.err; exit 1; }
    python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], r['top1_match'], {k: f'{v:.2g}' for k, v in r['max_abs_diff_by_output'].items()})" "$OUT/verify-$b-$backend.json"
  done
done
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import onnxruntime as o, torch, transformers; print('onnxruntime', o.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
