#!/usr/bin/env bash
# Run bench/gpu_bench.py on a bare GPU machine that has CUDA PyTorch but none of this project's
# serving packages and no network (how this project's lent H100/H200 machines come).
#
#   bench/gpu/run_on_device.sh WHEELS_DIR PARTS_DIR [gpu_bench.py args...]
#
# WHEELS_DIR holds: small/*.whl (the pinned transformers/tokenizers/huggingface-hub/optimum/
# optimum-onnx/starlette/uvicorn/httptools wheels for the machine's Python), minilm/ (the MiniLM
# config + tokenizer; weights optional), wrk/ (the wrk binary and its libluajit), shared/data/banking77/
# (train.csv, dev.csv).
# PARTS_DIR holds part.0, part.1, ...: onnxruntime-gpu (the wheel's files, tar + xz) split in
# pieces small enough to travel one per call; set ORT_TAR_SHA256 to check the reassembly.
# Results: $OUT/gpu.json and $OUT/gpu-bench.log (OUT defaults to /tmp/gpu-out).
set -euo pipefail
W=$(cd "$1" && pwd); PARTS=$2; shift 2
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
SITE=/tmp/nlpfleet-site
if [ ! -d "$SITE/onnxruntime/capi" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$W"/small/*.whl
  cat "$PARTS"/part.* > /tmp/ort.tar.xz
  if [ -n "${ORT_TAR_SHA256:-}" ]; then echo "$ORT_TAR_SHA256  /tmp/ort.tar.xz" | sha256sum -c; fi
  python3 -c "import tarfile, sys; tarfile.open('/tmp/ort.tar.xz', 'r:xz').extractall('$SITE')"
  rm -f /tmp/ort.tar.xz
fi
export NLPFLEET_SHARED="${NLPFLEET_SHARED:-$W/shared}"  # Banking77 texts (shared/data/banking77)
export PYTHONPATH="$SITE:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
# CUDA / cuDNN / cuBLAS from the nvidia-* wheels PyTorch brought (the server process does not
# import torch, so ONNX Runtime's CUDA provider must find them on the library path).
NV=$(python3 -c "import nvidia, os; print(' '.join(nvidia.__path__))" 2>/dev/null || true)
LIBS=$( (for d in $NV; do find "$d" -name 'lib*.so*' -printf '%h\n'; done) | sort -u | paste -sd: )
export LD_LIBRARY_PATH="$W/wrk:${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PATH="$W/wrk:$PATH"
python3 - <<'PY'
import onnxruntime, tokenizers, torch, transformers
print("python ok: torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__,
      "| onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 bench/gpu_bench.py --base-model "$W/minilm" --out "$OUT/gpu.json" "$@" 2>&1 | tee "$OUT/gpu-bench.log"
