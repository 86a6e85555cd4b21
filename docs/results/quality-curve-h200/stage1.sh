# call 1 on the device: keep half a and the gguf wheel in /tmp/cv/stage (they live while the machine stays warm)
set -eu
mkdir -p /tmp/cv/stage
cp .gpu/a/part.aa .gpu/a/gguf-0.19.0-py3-none-any.whl /tmp/cv/stage/
ls -l /tmp/cv/stage; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader; nproc
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__)"
