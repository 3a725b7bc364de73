import os
from pathlib import Path

import pytest
from click.testing import CliRunner

# Under pytest-xdist (pyproject's addopts: one worker per core) every worker, and every process it starts,
# computes on one thread: two workers with torch's default of one thread per core would oversubscribe the
# cores, and OpenMP's spinning threads then slow a training test 10x, not 2x.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

REPO = Path(__file__).resolve().parents[1]
SUITES = REPO / "suites"


def shared_data_dir() -> Path:
    """$CNNBENCH_DATA_DIR (CI points it at ../shared/data), else ../shared/data beside the repo."""
    return Path(os.environ.get("CNNBENCH_DATA_DIR") or REPO.parent / "shared" / "data")


@pytest.fixture
def mnist_dir() -> Path:
    d = shared_data_dir()
    if not (d / "MNIST" / "raw" / "train-images-idx3-ubyte").exists():
        pytest.skip(f"real MNIST not found under {d} (set CNNBENCH_DATA_DIR)")
    return d


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A clean current directory with its own SQLite store (MLflow's default sqlite:///mlflow.db)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture
def cli(workdir):
    """Invoke the CLI in-process; returns the click Result."""
    from cnnbench.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def write_suite(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TINY_SUITE = """\
name: tiny
question: Does Adam beat SGD on synthetic blobs?
base:
  data: {dataset: synthetic, batch_size: 64, val_fraction: 0.2, synthetic: {train_size: 512, test_size: 256, image_size: 16}}
  model: {name: lenet5}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  train: {epochs: 2, target_accuracy: 0.5}
  device: cpu
variants:
  sgd: {}
  adam: {optimizer: {name: adam, lr: 0.001}}
baseline: sgd
seeds: 2
"""
