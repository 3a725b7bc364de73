"""Scale-out costs on PostgreSQL: the queue's and tracking's overhead per run, and 1 vs 2 local workers.

1. Queue overhead per run, in one process against the local PostgreSQL: enqueue, pop (``Study.ask``
   taking a waiting trial), heartbeat thread start/stop, the trial's attrs and ``tell`` — what a
   worker does around each (variant, seed) — median and IQR over ``--items`` runs.
2. Tracking overhead per run: one worker runs the suite against a real ``mlflow server`` on
   PostgreSQL; cnnbench times every MLflow call (``mlflow_overhead_s`` of the parent run) — divided
   by the number of runs, next to the suite's wall time per run.
3. Wall time of the whole suite (``cnnbench run`` processes, imports included) with 1 worker, 2
   workers, and 2 workers of 1 thread each, in alternating order over ``--rounds`` rounds, each on a
   fresh queue database and experiment; medians and the ratio to 1 worker. On 2 cores, 2 workers of 2
   threads each oversubscribe the CPU: little gain is expected.

    python benchmarks/workers.py [--suite suites/quickstart.yaml] [--rounds 2] [--items 100]

Needs PostgreSQL at $CNNBENCH_TEST_POSTGRES (default postgresql://postgres@127.0.0.1:5432/postgres)
with the right to create databases.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PG_ADMIN = os.environ.get("CNNBENCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


class Databases:
    def __init__(self):
        import psycopg

        self.admin = psycopg.connect(PG_ADMIN, autocommit=True)
        self.made: list[str] = []

    def new(self) -> str:
        name = f"cnnbench_bench_{uuid.uuid4().hex[:10]}"
        self.admin.execute(f'CREATE DATABASE "{name}"')
        self.made.append(name)
        return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"

    def drop_all(self) -> None:
        for name in self.made:
            self.admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def mlflow_server(backend: str, artifacts: str):
    import requests

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", backend,
                             "--artifacts-destination", artifacts, "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.2)
    raise RuntimeError("mlflow server did not start")


def quartiles(xs: list[float]) -> str:
    q = statistics.quantiles(xs, n=4)
    return f"median {statistics.median(xs) * 1e3:.1f} ms (IQR {q[0] * 1e3:.1f}–{q[2] * 1e3:.1f})"


def queue_overhead(storage_url: str, items: int) -> None:
    from cnnbench.config import RunSpec, load_suite
    from cnnbench.optuna_storage import QueueSettings, heartbeat
    from cnnbench.optuna_storage import open_shared_storage as open_storage
    from cnnbench.workqueue import RunQueue

    suite = load_suite(REPO / "suites/quickstart.yaml", ())
    settings = QueueSettings(storage_url, heartbeat_interval=10, grace_period=60)
    queue = RunQueue(open_storage(settings), suite, settings)
    queue.join()
    exp = next(iter(suite.experiments.values()))
    specs = [RunSpec(suite.name, f"v{i}", i, exp, plan_key=f"k{i}") for i in range(items)]
    t0 = time.perf_counter()
    queue.fill(specs)
    fill_s = (time.perf_counter() - t0) / items
    per_run = []
    while True:
        t0 = time.perf_counter()
        trial = queue.pop()
        if trial is None:
            break
        with heartbeat(queue.study, trial):
            trial.set_user_attr("worker", "bench")
            trial.set_user_attr("mlflow_run_id", "x")
            trial.set_user_attr("status", "finished")
            queue.study.tell(trial, 0.0)
        per_run.append(time.perf_counter() - t0)
    print(f"queue on PostgreSQL, {items} runs: enqueue {fill_s * 1e3:.1f} ms/run; pop + heartbeat + attrs + tell "
          f"{quartiles(per_run)} per run (the pop also scans for stale trials, so it grows with the queue)")


def worker_cmd(suite: Path, storage: str, tracking: str, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "cnnbench", "run", str(suite), "-q", "--no-report", "--storage", storage,
            "--tracking-uri", tracking, *extra]


def suite_wall(suite: Path, storage: str, tracking: str, workers: int, extra: list[str], cwd: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    procs = [subprocess.Popen(worker_cmd(suite, storage, tracking, extra), cwd=cwd, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(workers)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError("\n".join(outs))
    return wall, outs[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--suite", default=str(REPO / "suites/quickstart.yaml"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--items", type=int, default=100)
    args = ap.parse_args()
    dbs = Databases()
    tmp = Path(tempfile.mkdtemp(prefix="cnnbench-workers-"))
    server = None
    try:
        queue_overhead(dbs.new(), args.items)
        server, url = mlflow_server(dbs.new(), str(tmp / "artifacts"))
        settings = {"1 worker": (1, []), "2 workers": (2, []), "2 workers × 1 thread": (2, ["--set", "base.train.threads=1"])}
        walls: dict[str, list[float]] = {k: [] for k in settings}
        text = Path(args.suite).read_text()
        name = re.search(r"^name:\s*(\S+)", text, re.M).group(1)
        for r in range(args.rounds):
            order = list(settings) if r % 2 == 0 else list(reversed(settings))
            for label in order:
                n, extra = settings[label]
                tag = f"{name}_{r}_{label.split()[0]}w{len(extra)}"
                suite = tmp / f"{tag}.yaml"
                suite.write_text(re.sub(r"^name:\s*\S+", f"name: {tag}", text, count=1, flags=re.M))
                wall, out = suite_wall(suite, dbs.new(), url, n, extra, tmp)
                walls[label].append(wall)
                m = re.search(r"(\d+) finished.*?([\d.]+) s \(([\d.]+) s in MLflow\)", out)
                if n == 1 and m:
                    runs, suite_s, mlflow_s = int(m.group(1)), float(m.group(2)), float(m.group(3))
                    print(f"round {r}: 1 worker, {runs} runs: {suite_s / runs:.2f} s per run, of which MLflow calls "
                          f"(server on PostgreSQL) {mlflow_s / runs * 1e3:.0f} ms ({mlflow_s / suite_s:.1%})")
                print(f"round {r}: {label}: suite wall {wall:.1f} s", flush=True)
        base = statistics.median(walls["1 worker"])
        for label, xs in walls.items():
            print(f"{label:>22}: median wall {statistics.median(xs):6.1f} s (range {min(xs):.1f}–{max(xs):.1f}); "
                  f"1 worker / this = {base / statistics.median(xs):.2f}×")
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGKILL)
        dbs.drop_all()


if __name__ == "__main__":
    main()
