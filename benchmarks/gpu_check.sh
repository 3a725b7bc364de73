#!/usr/bin/env bash
# The GPU check in one call (issue 19): on a lent GPU machine, the CUDA-marked tests, the device tests (which
# pick CUDA when it is there) and the training-throughput benchmark on CUDA, with the GPU and torch build named.
#
# The device machine has PyTorch, torchvision, pandas, scipy, rich, click, PyYAML and scikit-learn, but not
# MLflow, Optuna or pydantic, and it cannot download. So, in two steps:
#
#   bash benchmarks/gpu_check.sh prepare     # here: their wheels for the device's Python (3.12, x86-64) into
#                                            # .gpu-wheels/ (ignored by git; about 40 MB)
#   bash benchmarks/gpu_check.sh run         # there: the `device` tool's run, with carry [".gpu-wheels"];
#                                            # logs and figures also go to $OUT when it is set
#
# Real MNIST is needed for the throughput figure: put it in shared/data inside the checkout (it travels) or
# point CNNBENCH_DATA_DIR at it; without it the benchmark is skipped and says so. GPU_CHECK_DEVICE=cpu
# GPU_CHECK_ROUNDS=1 runs the same steps on a machine without a GPU (a smoke test of the script).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.gpu-wheels
PY=${PYTHON:-python3}

case "${1:-run}" in
prepare)
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  "$PY" -m pip download --quiet -d "$WHEELS" --python-version 3.12 --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any "mlflow-skinny==3.17.2" "optuna==5.1.0" "pydantic>=2.7" "sqlalchemy>=2" alembic \
    pytest-xdist execnet  # pyproject's addopts use xdist (-n auto)
  du -sh "$WHEELS"
  ;;
run)
  OUT=${OUT:-$(mktemp -d)}
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not available"
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available:', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
    if [ -d "$WHEELS" ]; then  # offline: only what was carried, and what the machine already has
      "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" "mlflow-skinny==3.17.2" "optuna==5.1.0" "pydantic>=2.7" pytest-xdist
    fi
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
    export CNNBENCH_DATA_DIR=${CNNBENCH_DATA_DIR:-$PWD/shared/data} MPLBACKEND=Agg
    "$PY" -m pytest -n 0 -q -p no:logging -m cuda tests/ || true
    "$PY" -m pytest -n 0 -q -p no:logging tests/test_devices.py tests/test_timing.py || true
    if [ -e "$CNNBENCH_DATA_DIR/MNIST/raw/train-images-idx3-ubyte" ]; then
      "$PY" benchmarks/throughput.py --device "${GPU_CHECK_DEVICE:-cuda}" --rounds "${GPU_CHECK_ROUNDS:-5}"
    else
      echo "throughput: skipped, no MNIST under $CNNBENCH_DATA_DIR"
    fi
  } 2>&1 | tee "$OUT/gpu_check.log"
  ;;
*)
  echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2
  exit 2
  ;;
esac
