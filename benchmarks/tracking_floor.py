"""What one run's records cost cnnbench in MLflow on SQLite, in WAL mode (cnnbench's) and in SQLite's default
rollback-journal mode (issue 19, item 2).

A run shaped like a quickstart run (66 params, 10 epochs of 5 metrics plus 15 final ones, 9 tags at the start
and 3 at the end, 3 small artifacts) is written through ``cnnbench.tracking.Tracker`` exactly as
``single_run.run_one`` writes it: create_run, one log_batch, log_artifacts, set_terminated. Two fresh stores
in one process, the two modes alternating run by run, so the machine's drift hits both alike. Prints each
mode's median per run and per call, and the median of the pairwise ratio.

    python benchmarks/tracking_floor.py [RUNS]          # default 80 runs per mode, the first 10 not counted

Measured 2026-12-04 on a 2-core AMD EPYC (AVX2 only), torch 2.14.1, MLflow 3.17.2, 80 runs per mode: see the
README (Tracking overhead).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from cnnbench import tracking
from cnnbench.tracking import BufferedRun, Tracker

PARAMS = {f"config.key_{i}": f"value {i}" for i in range(66)}
START_TAGS = {f"cnnbench.tag_{i}": "value" for i in range(9)}
END_TAGS = {"cnnbench.status": "finished", "cnnbench.time_to_target_epoch": "4", "cnnbench.note": "x"}
EPOCH = {"loss": 0.1, "train_accuracy": 0.9, "val_accuracy": 0.9, "lr": 0.01, "epoch_s": 0.05}
FINAL = {f"final_{i}": 1.0 for i in range(15)}
FILES = {"config.yaml": "key: value\n" * 40, "environment.json": {"torch": "2.14.1", "cpu": "x" * 200},
         "confusion_matrix.json": [[1] * 10] * 10}


def open_store(path: Path, wal: bool) -> Tracker:
    """A fresh store; ``wal=False`` opens it as cnnbench did before (SQLite's default rollback journal)."""
    if wal:
        return Tracker(f"sqlite:///{path}")
    write_ahead, tracking.write_ahead = tracking.write_ahead, lambda uri: None
    try:
        return Tracker(f"sqlite:///{path}")
    finally:
        tracking.write_ahead = write_ahead


def one_run(tracker: Tracker, exp_id: str, parent: str, i: int, calls: dict[str, float]) -> float:
    timed = tracker._timed

    def timing(fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return timed(fn, *args, **kwargs)
        finally:
            name = getattr(fn, "__name__", "log_artifacts")
            calls["log_artifacts" if name == "<lambda>" else name] += time.perf_counter() - t0

    tracker._timed = timing
    t0 = time.perf_counter()
    run_id = tracker.start_run(exp_id, f"run{i}", START_TAGS, parent)
    buffered = BufferedRun(tracker, run_id, params=PARAMS)
    for epoch in range(10):
        buffered.log_epoch({"epoch": epoch, **EPOCH})
    buffered.flush(metrics=FINAL, tags=END_TAGS, step=10)
    tracker.log_artifacts(run_id, FILES)
    tracker.end_run(run_id)
    wall = time.perf_counter() - t0
    tracker._timed = timed
    return wall


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 80
    warmup = 10
    with tempfile.TemporaryDirectory() as tmp:
        stores = {"wal": open_store(Path(tmp) / "wal.db", True), "rollback": open_store(Path(tmp) / "rollback.db", False)}
        for mode, tracker in stores.items():
            with tracker.client._tracking_client.store.engine.connect() as connection:
                print(f"{mode}: journal_mode={connection.exec_driver_sql('PRAGMA journal_mode').scalar()}")
        ids = {mode: t.experiment_id("floor") for mode, t in stores.items()}
        parents = {mode: t.start_run(ids[mode], "suite", {"cnnbench.role": "suite"}) for mode, t in stores.items()}
        walls: dict[str, list[float]] = defaultdict(list)
        calls: dict[str, dict[str, float]] = {mode: defaultdict(float) for mode in stores}
        for i in range(warmup + runs):
            for mode, tracker in (reversed(stores.items()) if i % 2 else stores.items()):
                if i == warmup:
                    calls[mode].clear()
                wall = one_run(tracker, ids[mode], parents[mode], i, calls[mode])
                if i >= warmup:
                    walls[mode].append(wall)
    for mode in stores:
        w = sorted(walls[mode])
        parts = "  ".join(f"{name} {s / runs * 1e3:.1f}" for name, s in calls[mode].items())
        print(f"{mode:8s} per run: median {statistics.median(w) * 1e3:5.1f} ms [q25 {w[runs // 4] * 1e3:.1f}, "
              f"q75 {w[3 * runs // 4] * 1e3:.1f}]; mean per call, ms: {parts}")
    ratios = [a / b for a, b in zip(walls["wal"], walls["rollback"])]
    print(f"wal / rollback, median of {runs} pairs: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
