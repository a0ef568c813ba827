#!/usr/bin/env bash
# Run the Grad-CAM benchmark on a lent GPU machine: first in float32, then with mixed precision (float16
# compute, float32 CAM maths), so both rows come from the same card in one session.
#   bash bench/gpu.sh [extra args for python -m bench.gradcam, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

if ! command -v nvidia-smi >/dev/null; then
  echo "bench/gpu.sh: no NVIDIA driver here (nvidia-smi not found)" >&2
  exit 2
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || nvidia-smi
# Fail with a reason rather than print CPU figures under a GPU heading: TensorFlow finds a GPU only with the CUDA
# libraries it was built for (pip install 'tensorflow[and-cuda]' brings them); without them it runs on the CPU.
if ! "$PYTHON" -c 'import tensorflow' 2>/dev/null; then
  echo "bench/gpu.sh: TensorFlow is not importable with $PYTHON; install it with its CUDA libraries" >&2
  exit 2
fi
"$PYTHON" -c '
import sys
import tensorflow as tf
gpus = tf.config.list_physical_devices("GPU")
print("TF", tf.__version__, "GPUs:", gpus)
if not gpus:
    sys.exit("bench/gpu.sh: TensorFlow sees no GPU (are its CUDA libraries installed?)")
'

echo "== float32 =="
CXR_LENS_MIXED_PRECISION=0 "$PYTHON" -m bench.gradcam "$@"
echo "== mixed precision =="
CXR_LENS_MIXED_PRECISION=1 "$PYTHON" -m bench.gradcam "$@"
