#!/usr/bin/env bash
# Pack switching on the offline H200 host (issue 16): SmolLM2-135M-Instruct from its GGUF file, two documents
# fitted on the GPU, one fp16 static-cache base, two packs, then bench/pack_switch.py on ort-cuda (CUDA graphs) with
# 16 packs loaded, and the answers of a pack on its base beside the single-file bundle's.
#
# Needs onnxruntime-gpu and gguf staged in /tmp/site (../shared/tools/gpu-wheels.sh gguf==0.19.0) and the GGUF
# file in parts /tmp/gguf/part.* (sha256 in GGUF_SHA256). Results land in $OUT.
#   bash bench/h200_packs.sh
set -euo pipefail
out=${OUT:-bench/results}
work=${WORK:-/tmp/packs}
mkdir -p "$out" "$work" /tmp/pp
gguf=$work/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$gguf" ] || cat /tmp/gguf/part.* > "$gguf"
echo "$GGUF_SHA256  $gguf" | sha256sum -c -
ln -sfn "$PWD/runtime" /tmp/pp/nectar_runtime
ln -sfn "$PWD/graphs" /tmp/pp/nectar_graphs
export PYTHONPATH=/tmp/site:/tmp/pp:$PWD NECTAR_CACHE=$work/cache TQDM_DISABLE=1 PYTHONUNBUFFERED=1
cli() { python3 -m nectar_export.cli "$@"; }
stamp() { echo "[packs] $(date +%T) $*"; }

stamp fit
cli fit --model "$gguf" --quick --no-ablations --context-tokens 1024 --device cuda --overwrite -o "$work/art-default" &
cli fit --model "$gguf" --quick --no-ablations --context manual-4k --context-tokens 1024 --device cuda --overwrite \
    -o "$work/art-m4k" &
wait
stamp export
cli export "$work/art-default" --base --precision fp16 --cache static --overwrite -o "$work/base" &
cli export "$work/art-default" --precision fp16 --cache static --overwrite -o "$work/bundle-default" &
wait
stamp pack
cli pack "$work/art-default" --base "$work/base" --device cuda --overwrite -o "$work/pack-default"
cli pack "$work/art-m4k" --base "$work/base" --device cuda --overwrite -o "$work/pack-m4k"
du -b "$work/base" "$work/pack-default" "$work/pack-m4k" "$work/bundle-default" | tee "$out/sizes.txt"

stamp same answers
question="What does the with statement do?"
cli run "$work/bundle-default" --backend ort-cuda --prompt "$question" --max-new-tokens 32 | tee "$out/answer-bundle.txt"
cli run "$work/base" --pack "$work/pack-default" --backend ort-cuda --prompt "$question" --max-new-tokens 32 \
    | tee "$out/answer-pack.txt"
if [ "$(head -n -1 "$out/answer-bundle.txt")" = "$(head -n -1 "$out/answer-pack.txt")" ]; then
    echo "same answer text: yes"; else echo "same answer text: NO"; fi

stamp switch
python3 bench/pack_switch.py --base "$work/base" --pack default="$work/pack-default" --pack m4k="$work/pack-m4k" \
    --copies 8 --rounds 400 --backend ort-cuda --compare "$work/bundle-default" --out "$out"
stamp done
