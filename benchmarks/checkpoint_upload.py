"""What travelling checkpoints cost per epoch: ``--checkpoints mlflow`` against ``local``.

For each shipped MNIST model, with Adam's state (the largest of the shipped optimizers: two moments per
weight): the training state's size; the median time to save it locally (what every run pays already: atomic
write + fsync); the median time to upload it after that (:class:`cnnbench.checkpoint_store._Uploads`: the
file into the run's artifacts, then its tags) to a real ``mlflow server`` on this machine that proxies
artifacts, and to a SQLite store with local artifacts; and an MNIST epoch's training time on this machine
(54,000 images at the throughput measured here, batch 128, the device synchronized by being the CPU). The
upload is reported as a share of that epoch. A real cluster adds its network to the server's figure.

    python benchmarks/checkpoint_upload.py [--repeats 10]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import torch

from cnnbench.checkpoint_store import _Uploads
from cnnbench.checkpoints import save_training_state
from cnnbench.models import MODELS
from cnnbench.tracking import Tracker

MNIST_TRAIN_IMAGES = 54_000  # 60,000 less the 10% validation split of the shipped suites
MODELS_MEASURED = {"lenet5": {}, "mnist_net": {}, "resnet20": {"depth": 20}}


ADMIN_PASSWORD, WORKER_PASSWORD = "bench-admin-password", "bench-worker-password"


def _server(root: Path, auth: bool = False) -> tuple[subprocess.Popen, str]:
    """A real ``mlflow server`` proxying artifacts; ``auth``: with the README's basic-auth settings and a
    user ``worker`` (credentials cache on, as the README recommends)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = root / ("auth" if auth else "open")
    root.mkdir()
    env = dict(os.environ)
    extra = []
    if auth:
        (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/users.db\n"
                                       "admin_username = admin\nauth_cache_ttl_seconds = 60\n")
        env |= {"MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": "bench-csrf-key"}
        extra = ["--app-name", "basic-auth"]
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", f"sqlite:///{root}/server.db",
                             "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", *extra], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(url + "/health", timeout=1).ok:
                if auth:
                    requests.post(f"{url}/api/2.0/mlflow/users/create", auth=("admin", ADMIN_PASSWORD), timeout=30,
                                  json={"username": "worker", "password": WORKER_PASSWORD}).raise_for_status()
                    url = f"http://worker:{WORKER_PASSWORD}@{url.removeprefix('http://')}"
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    raise SystemExit("mlflow server did not start")


def _state(name: str, kwargs: dict) -> tuple[torch.nn.Module, torch.optim.Optimizer, float]:
    """The model after 20 Adam steps (its optimizer state filled), and its training throughput (img/s)."""
    model = MODELS.create("resnet" if name == "resnet20" else name, **kwargs)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    times = []
    for step in range(20):
        t0 = time.perf_counter()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step >= 5:  # warm-up steps left out
            times.append(time.perf_counter() - t0)
    return model, opt, 128 / statistics.median(times)


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (proc, url), (auth_proc, auth_url) = _server(root), _server(root, auth=True)
        try:
            stores = {"mlflow server": Tracker(url), "basic-auth server": Tracker(auth_url),
                      "SQLite + local artifacts": Tracker(f"sqlite:///{root}/local.db")}
            print(f"CPU: {_cpu()}; torch {torch.__version__}; {torch.get_num_threads()} threads; "
                  f"median of {args.repeats}")
            for name, kwargs in MODELS_MEASURED.items():
                model, opt, img_s = _state(name, kwargs)
                epoch_s = MNIST_TRAIN_IMAGES / img_s
                path = root / f"{name}.pt"

                save_s = _median_s(functools.partial(
                    save_training_state, path, name, epoch=1, model=model.state_dict(), optimizer=opt.state_dict(),
                    scheduler={}, scaler=None, rng={}, loop={}), args.repeats)
                mb = path.stat().st_size / 1e6
                line = (f"{name:10s} state {mb:6.2f} MB; MNIST epoch ≈ {epoch_s:6.1f} s ({img_s:,.0f} img/s); "
                        f"local save {save_s * 1e3:6.1f} ms")
                for label, tracker in stores.items():
                    exp = tracker.experiment_id("checkpoint-upload")
                    upload = _Uploads(tracker, tracker.start_run(exp, name, {}))
                    epochs = itertools.count(1)  # each upload a new epoch: the two slots alternate as in a run
                    upload_s = _median_s(lambda u=upload, p=path, e=epochs: u(p, next(e)), args.repeats)
                    line += f"\n    upload to {label:25s} {upload_s * 1e3:6.1f} ms = {100 * upload_s / epoch_s:5.2f}% of an epoch"
                print(line)
        finally:
            for p in (proc, auth_proc):
                p.kill()
                p.wait()


def _cpu() -> str:
    from cnnbench.devices import cpu_model

    return cpu_model()


if __name__ == "__main__":
    main()
