#!/usr/bin/env bash
# The GPU check in one call (issue 19): on a lent GPU machine, the CUDA-marked tests, the device tests (which
# pick CUDA when it is there), the training-throughput benchmark on CUDA, and the devices and amp suites end to
# end, with the GPU and torch build named. On an H200 (2026-12-04) the whole run took 2.5 min + 3 min.
#
# The device machine has PyTorch, torchvision, pandas, scipy, rich, click, PyYAML and scikit-learn, but not
# MLflow, Optuna or pydantic, and it cannot download. So, in two steps:
#
#   bash benchmarks/gpu_check.sh prepare     # here: their wheels for the device's Python (3.12, x86-64) into
#                                            # .gpu-wheels/ (ignored by git; 50 MB with MNIST)
#   bash benchmarks/gpu_check.sh run         # there: the `device` tool's run, with carry [".gpu-wheels"];
#                                            # logs and figures also go to $OUT when it is set
#
# Real MNIST is needed for the throughput figure. `prepare` packs it from CNNBENCH_DATA_DIR (default ../shared/data)
# into .gpu-wheels/mnist/ gzipped (11 MB: the raw files, 55 MB, with the wheels would pass the tool's 64 MiB), and
# `run` unpacks it there unless CNNBENCH_DATA_DIR is set; without it the benchmark is skipped and says so. GPU_CHECK_DEVICE=cpu
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
  data=${CNNBENCH_DATA_DIR:-../shared/data}
  if [ -d "$data/MNIST/raw" ]; then
    mkdir -p "$WHEELS/mnist"
    for f in "$data"/MNIST/raw/*-ubyte; do gzip -c "$f" >"$WHEELS/mnist/$(basename "$f").gz"; done
  else
    echo "no MNIST under $data: the throughput benchmark will be skipped there" >&2
  fi
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
    if [ -z "${CNNBENCH_DATA_DIR:-}" ] && [ -d "$WHEELS/mnist" ]; then
      export CNNBENCH_DATA_DIR=$(mktemp -d)
      mkdir -p "$CNNBENCH_DATA_DIR/MNIST/raw"
      for f in "$WHEELS"/mnist/*.gz; do gunzip -c "$f" >"$CNNBENCH_DATA_DIR/MNIST/raw/$(basename "$f" .gz)"; done
    fi
    export CNNBENCH_DATA_DIR=${CNNBENCH_DATA_DIR:-$PWD/shared/data} MPLBACKEND=Agg
    "$PY" -m pytest -n 0 -q -p no:logging -m cuda tests/ --durations=5 || true
    "$PY" -m pytest -n 0 -q -p no:logging tests/test_devices.py tests/test_timing.py --durations=10 || true
    if [ -e "$CNNBENCH_DATA_DIR/MNIST/raw/train-images-idx3-ubyte" ]; then
      "$PY" benchmarks/throughput.py --device "${GPU_CHECK_DEVICE:-cuda}" --rounds "${GPU_CHECK_ROUNDS:-5}"
      # end to end on the GPU: the device suite (its cuda variant against the CPU) and mixed precision
      # (device: auto picks CUDA), each on a fresh store; their reports go to $OUT beside the log
      work=$(mktemp -d)
      for suite in devices amp; do
        "$PY" -m cnnbench run "suites/$suite.yaml" -q --tracking-uri "sqlite:///$work/$suite.db" \
          --reports-dir "$work/reports" || true
        cp "$work/reports/$suite.md" "$OUT/" 2>/dev/null || true
      done
    else
      echo "throughput and suites: skipped, no MNIST under $CNNBENCH_DATA_DIR"
    fi
  } 2>&1 | tee "$OUT/gpu_check.log"
  ;;
*)
  echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2
  exit 2
  ;;
esac
