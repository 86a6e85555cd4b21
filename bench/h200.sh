#!/usr/bin/env bash
# bench/gpu_decode.py on the offline H200 host, from a checkout whose onnxruntime-gpu was staged with
# ../shared/tools/gpu-wheels.sh (installed under /tmp/site). Arguments go to gpu_decode.py; results land
# in $OUT (the device tool's output folder) or bench/results, the full log in gpu_decode.log beside them.
#   bash bench/h200.sh --shape qwen3-1.7b --ns 131072,4096,32768 --full-ns 131072,4096 --recipe quick \
#       --timed-n 0 --jobs 4 --compile --profile --work /tmp/ng
# The fused rows of issue 15 (export --ops ort; a second call resumes from the state under --work):
#   NECTAR_TIMEOUT=580 bash bench/h200.sh --shape qwen3-1.7b --ns 4096,32768,131072 --full-ns 4096,32768,131072 \
#       --engines nectar_ort_fused,full_ort_fused,nectar_ort_cuda,full_ort_cuda --recipe quick --timed-n 0 \
#       --jobs 4 --work /tmp/ng
set -uo pipefail
out=${OUT:-bench/results}
mkdir -p "$out" /tmp/pp
ln -sfn "$PWD/runtime" /tmp/pp/nectar_runtime          # the packages' import names (pip install -e elsewhere)
ln -sfn "$PWD/graphs" /tmp/pp/nectar_graphs
export PYTHONPATH=/tmp/site:/tmp/pp:$PWD
export TQDM_MININTERVAL=30                               # progress bars: a line every 30 s in the log
timeout --kill-after=15 "${NECTAR_TIMEOUT:-0}" python3 bench/gpu_decode.py --tokenizer "${NECTAR_TOKENIZER:-runs/gpu/tokenizer}" --out "$out" "$@" \
  2> "$out/gpu_decode.log"
status=$?
grep -a '^\[gpu\]' "$out/gpu_decode.log" | tail -60
[ $status -eq 0 ] || tail -c 3000 "$out/gpu_decode.log"
exit $status
