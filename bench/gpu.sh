#!/usr/bin/env bash
# Run the Grad-CAM benchmark on a lent GPU machine: first in float32, then with mixed precision (float16
# compute, float32 CAM maths), so both rows come from the same card in one session.
#   bash bench/gpu.sh [extra args for python -m bench.gradcam, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3

nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || nvidia-smi
"$PYTHON" -c 'import tensorflow as tf; print("TF", tf.__version__, "GPUs:", tf.config.list_physical_devices("GPU"))'

echo "== float32 =="
CXR_LENS_MIXED_PRECISION=0 "$PYTHON" -m bench.gradcam "$@"
echo "== mixed precision =="
CXR_LENS_MIXED_PRECISION=1 "$PYTHON" -m bench.gradcam "$@"
