#!/usr/bin/env bash
# Grad-CAM and pipeline benchmarks on a lent GPU machine that has JAX with CUDA and no TensorFlow (Keras' JAX
# backend; see the device tool's README, "nvidia-h200": its python3 holds JAX, Python packages it lacks travel as
# wheels with the working tree, 64 MiB in all).
#
#   here:   bash bench/gpu.sh --download     fetch the wheels it lacks into wheels/ (ignored by git): keras and its
#                                            two missing deps, the node's small deps, the sample radiographs
#   there:  bash bench/gpu.sh                one call (carry ["wheels"]), under 8 minutes: a venv that sees the
#                                            machine's packages (--system-site-packages) plus the wheels, then
#                                            bench.gradcam on JAX at batch 1, 16, 64, 256 in float32 and mixed
#                                            precision (seed InceptionV3), and bench.pipeline with the seed model
#   here:   bash bench/gpu.sh --cpu          the same set-up steps with wheels for this machine's Python and
#                                            TensorFlow made unimportable, then batch 1 on JAX's CPU and a short
#                                            pipeline run: everything but the GPU
#           bash bench/gpu.sh --dry-run      print the steps and check the wheels, run nothing
#
# PYTHON names the interpreter whose packages the venv sees (default: python3; with --cpu, .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
MODE=gpu
case "${1:-}" in
  --download) MODE=download ;;
  --cpu) MODE=cpu ;;
  --dry-run) MODE=dry-run ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--download | --cpu | --dry-run]" >&2; exit 2 ;;
esac

WHEELS="$ROOT/wheels"
GPU_PYTHON_VERSION=3.12  # the lent machine's python3 (device KINDS.md)
# What the GPU machine lacks, pinned to what the tests here run with: Keras and the two of its dependencies that
# image does not carry; the node's pure-Python dependencies (and the two compiled ones, pydantic-core and
# pyjpegls, for its Python); pylibjpeg for the J2K sample; pydicom-data for the sample radiographs (34 MB of
# the 64 MiB a call carries).
PACKAGES=(keras==3.15.1 namex==0.1.0 optree==0.20.0 pydicom==3.0.2 pynetdicom==3.0.4 highdicom==0.28.2
          pyjpegls==1.5.1 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 annotated-types==0.8.0
          typing-inspection==0.4.5 python-dotenv==1.2.4 pylibjpeg==2.1.0 pylibjpeg-openjpeg==2.6.0
          pydicom-data==1.0.0)
# Checked once set up: everything bench.gradcam and bench.pipeline import.
IMPORTS="keras, jax, numpy, cv2, pydicom, pynetdicom, highdicom, pydantic, pydantic_settings, prometheus_client, rich"

download() {  # $1: folder, $2: Python version (X.Y)
  local folder=$1 version=$2
  mkdir -p "$folder"
  [ "$folder" != "$WHEELS" ] || [ -f "$WHEELS/.gitignore" ] || echo '*' >"$WHEELS/.gitignore"  # never committed
  "${PIP_PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$folder" "${PACKAGES[@]}"
  echo "bench/gpu.sh: $(find "$folder" -name '*.whl' | wc -l) wheels for Python $version in $folder" \
       "($(du -sh "$folder" | cut -f1))"
}

if [ "$MODE" = download ]; then
  download "$WHEELS" "$GPU_PYTHON_VERSION"
  exit 0
fi

if [ "$MODE" = cpu ]; then
  PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
  VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  FOUND=${CPU_WHEELS:-/tmp/cxr-lens-wheels-$VERSION}  # outside wheels/, which a device call carries whole
  [ -d "$FOUND" ] || PIP_PYTHON="$PYTHON" download "$FOUND" "$VERSION"
else
  PYTHON=${PYTHON:-python3}
  FOUND="$WHEELS"
fi
count=$( { find "$FOUND" -maxdepth 1 -name '*.whl' 2>/dev/null || true; } | wc -l)
wheels_missing() {
  echo "bench/gpu.sh: $count wheels in $FOUND, ${#PACKAGES[@]} expected: run 'bash bench/gpu.sh --download' here" \
       "and carry wheels/" >&2
}
if [ "$count" -ne ${#PACKAGES[@]} ] && [ "$MODE" != dry-run ]; then
  wheels_missing
  exit 2
fi
VERSION=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)
if [ "$MODE" = gpu ] && [ "$VERSION" != "$GPU_PYTHON_VERSION" ]; then
  echo "bench/gpu.sh: $PYTHON is Python $VERSION, the wheels are for $GPU_PYTHON_VERSION" >&2
  exit 2
fi

VENV=${VENV:-/tmp/cxr-lens-bench-venv}
SITE="$VENV/lib/python$VERSION/site-packages"
steps() {
  cat <<EOF
1. $PYTHON -m venv --system-site-packages --without-pip $VENV, plus a .pth naming $PYTHON's own site-packages
   (python3 there is itself a venv, whose packages --system-site-packages alone would not show)
2. $PYTHON -m pip install --no-index --no-deps --target $SITE $FOUND/*.whl  ($count wheels)
3. import check: $IMPORTS; JAX's devices
EOF
  if [ "$MODE" = cpu ]; then
    echo "4. KERAS_BACKEND=jax python -m bench.gradcam --models seed,demo --batches 1 (JAX on this CPU)"
    echo "5. KERAS_BACKEND=jax python -m bench.pipeline --model seed --n 16 --syntaxes UNCR"
  else
    echo "4. KERAS_BACKEND=jax python -m bench.gradcam --models seed --batches 1,16,64,256 --no-seed, float32"
    echo "5. the same with --mixed-precision (float16 compute, float32 CAM maths)"
    echo "6. KERAS_BACKEND=jax python -m bench.pipeline --model seed --n 512 --senders 8 --syntaxes UNCR,J2KR"
    echo "   --set model.backend='jax' --set worker.batch_size=32, then its end-to-end images per second"
    echo "   (time budgets: ${GRADCAM_BUDGET_S:-140} s per gradcam run, ${PIPELINE_BUDGET_S:-150} s for the pipeline)"
  fi
}
if [ "$MODE" = dry-run ]; then
  steps
  [ "$count" -eq ${#PACKAGES[@]} ] || wheels_missing
  total=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 |
          cut -f1)
  wheels=$(du -sb "$WHEELS" 2>/dev/null | cut -f1 || echo 0)
  echo "what a call carries: working tree $(( total / 1048576 )) MiB + wheels/ $(( ${wheels:-0} / 1048576 )) MiB" \
       "(limit 64 MiB)"
  exit 0
fi

if [ "$MODE" = gpu ]; then
  if ! command -v nvidia-smi >/dev/null; then
    echo "bench/gpu.sh: no NVIDIA driver here (nvidia-smi not found); 'bash bench/gpu.sh --cpu' runs the rest" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || nvidia-smi
fi

started=$(date +%s)
rm -rf "$VENV"
"$PYTHON" -m venv --system-site-packages --without-pip "$VENV"
mkdir -p "$SITE"
"$PYTHON" -c 'import site; print("\n".join(site.getsitepackages()))' >"$SITE/cxr_lens_base_packages.pth"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$FOUND"/*.whl
if [ "$MODE" = cpu ]; then
  # As on the GPU machine, where TensorFlow does not exist: any import of it fails.
  cat >"$SITE/cxr_lens_no_tensorflow.py" <<'EOF'
import sys


class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tf_keras"):
            raise ModuleNotFoundError(f"No module named {name!r} (bench/gpu.sh --cpu: as on the GPU machine)")
        return None


sys.meta_path.insert(0, _Absent())
EOF
  echo "import cxr_lens_no_tensorflow" >"$SITE/cxr_lens_no_tensorflow.pth"
fi
PY="$VENV/bin/python"
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
"$PY" -c "
import $IMPORTS
import jax
print('set up: Python', '.'.join(map(str, __import__('sys').version_info[:3])), '| JAX', jax.__version__, '| Keras',
      keras.__version__, '| devices', jax.devices())
"
echo "bench/gpu.sh: set up in $(( $(date +%s) - started )) s"

if [ "$MODE" = cpu ]; then
  "$PY" -m bench.gradcam --backend jax --models seed,demo --batches 1 --no-seed --seconds 2
  "$PY" -m bench.pipeline --model seed --n 16 --senders 2 --syntaxes UNCR --set "model.backend='jax'" \
    --set worker.batch_size=8 | tee /tmp/cxr-lens-pipeline.txt || true
else
  # Each step has a time budget, so that the whole call stays under 8 minutes and earlier rows still print.
  timeout "${GRADCAM_BUDGET_S:-140}" "$PY" -m bench.gradcam --backend jax --models seed --batches 1,16,64,256 \
    --no-seed --seconds 2 --no-mixed-precision || echo "bench/gpu.sh: float32 run stopped (exit $?)"
  timeout "${GRADCAM_BUDGET_S:-140}" "$PY" -m bench.gradcam --backend jax --models seed --batches 1,16,64,256 \
    --no-seed --seconds 2 --mixed-precision || echo "bench/gpu.sh: mixed-precision run stopped (exit $?)"
  # Batch 32: the worker's warm-up compiles six buckets (1..32) before the timed span.
  timeout "${PIPELINE_BUDGET_S:-150}" "$PY" -m bench.pipeline --model seed --n 512 --senders 8 \
    --syntaxes UNCR,J2KR --set "model.backend='jax'" --set worker.batch_size=32 | tee /tmp/cxr-lens-pipeline.txt \
    || echo "bench/gpu.sh: pipeline run stopped or missed a target (exit $?)"
fi
# bench.pipeline's ms/img column (first C-STORE to last output, per image) as images per second.
awk '$1 ~ /^(UNCR|J2KR|J2KI)$/ && $2 + 0 > 0 { printf "pipeline %s: %.1f images/s end to end\n", $1, 1000 / $2 }' \
  /tmp/cxr-lens-pipeline.txt
echo "bench/gpu.sh: done in $(( $(date +%s) - started )) s"

# -------------------------------------------------------------------------------------------------------------------
# worker.processes scaling (issue #16; a block of its own, appended by the throughput work). bench.pipeline with the
# model in a child process and 0 (threads), 2, 4, 8 and 14 stage processes (14: the 16 cores less receiving and the
# model), the same images for each run, ending with its scaling table: images per second end to end and the node's
# CPU per image over all its processes. Off unless PROCESS_CURVE=1. It needs a call of its own (about 5 minutes;
# the steps above take the rest of one): PROCESS_CURVE=1 GRADCAM_BUDGET_S=1 PIPELINE_BUDGET_S=1 bash bench/gpu.sh
# cuts those to a second each.
if [ "$MODE" = gpu ] && [ "${PROCESS_CURVE:-0}" = 1 ]; then
  timeout "${CURVE_BUDGET_S:-300}" "$PY" -m bench.pipeline --model demo --n 256 --senders 8 --syntaxes UNCR,J2KR \
    --processes "${CURVE_PROCESSES:-0,2,4,8,14}" --set "model.backend='jax'" | tee /tmp/cxr-lens-curve.txt \
    || echo "bench/gpu.sh: process curve stopped or missed a target (exit $?)"
  sed -n '/^Scaling/,$p' /tmp/cxr-lens-curve.txt
fi
