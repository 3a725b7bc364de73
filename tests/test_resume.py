"""Checkpoint per epoch and resume: a run stopped after an epoch and resumed ends exactly where an
uninterrupted run ends (CPU, deterministic); bad checkpoints are refused with the way out."""

import os
import signal
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from cnnbench import data as datamod
from cnnbench.checkpoints import CheckpointError, load_training_state
from cnnbench.config import Experiment, deep_merge
from cnnbench.train import train
from tests.conftest import REPO, TINY_SUITE, write_suite

TIMING = ("train_time_cum_s",)


def _experiment() -> Experiment:  # every source of state: momentum, a schedule, dropout, augmentation
    return Experiment.model_validate(deep_merge({
        "data": {"dataset": "synthetic", "batch_size": 64, "augment": ["random_crop", "random_erasing"],
                 "synthetic": {"train_size": 512, "test_size": 128, "image_size": 16}},
        "model": {"name": "lenet5", "dropout": 0.3},
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "schedule": {"name": "cosine"},
        "train": {"epochs": 4},
        "device": "cpu",
    }, {}))


class Stop(Exception):
    pass


def _learned(result):
    history = [{k: v for k, v in r.items() if k not in TIMING} for r in result.history]
    metrics = {k: v for k, v in result.metrics.items() if k.startswith("test_") or k.endswith("_macro")}
    return history, metrics


def test_a_run_saves_its_state_at_most_every_every_s_seconds(tmp_path, monkeypatch):
    """The checkpoint policy: after every epoch with every_s 0; none within every_s of the last save (a run
    shorter than every_s, cheaper to redo than to save, writes nothing); CheckpointStore passes the
    suite-wide setting on (``--checkpoint-every``, default CHECKPOINT_EVERY_S)."""
    import cnnbench.train as trainmod
    from cnnbench.checkpoint_store import CHECKPOINT_EVERY_S, LOCAL, CheckpointStore
    from cnnbench.checkpoints import TrainingCheckpoint
    from cnnbench.tracking import Tracker

    exp = _experiment()  # 4 epochs
    split = datamod.split(datamod.load(exp.data), exp.data.val_fraction)
    saved = []
    real_save = trainmod._save
    monkeypatch.setattr(trainmod, "_save", lambda run, ckpt, epoch: saved.append(epoch) or real_save(run, ckpt, epoch))
    train(exp, 0, split, torch.device("cpu"), checkpoint=TrainingCheckpoint(tmp_path / "a.pt", every_s=0))
    assert saved == [1, 2, 3]  # not after the last epoch: the run is done
    saved.clear()
    train(exp, 0, split, torch.device("cpu"), checkpoint=TrainingCheckpoint(tmp_path / "b.pt", every_s=3600))
    assert saved == [] and not (tmp_path / "b.pt").exists()
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    store = CheckpointStore(LOCAL, tracker, "tiny", tracker.experiment_id("tiny"))
    assert store.open("fp", "run")[0].every_s == CHECKPOINT_EVERY_S > 0
    assert CheckpointStore(LOCAL, tracker, "tiny", "0", every_s=0).open("fp", "run")[0].every_s == 0


def test_stopped_after_two_epochs_and_resumed_equals_uninterrupted(tmp_path):
    exp = _experiment()
    split = datamod.split(datamod.load(exp.data), exp.data.val_fraction)
    whole = train(exp, 3, split, torch.device("cpu"))

    ckpt = tmp_path / "run.pt"

    def stop_after_two(record):
        if record["epoch"] == 2:
            raise Stop  # as a SIGTERM seen at the end of epoch 2 would
    with pytest.raises(Stop):
        train(exp, 3, split, torch.device("cpu"), on_epoch=stop_after_two, checkpoint=ckpt)
    assert load_training_state(ckpt)["epoch"] == 2

    replayed = []
    resumed = train(exp, 3, split, torch.device("cpu"), on_epoch=replayed.append, checkpoint=ckpt)
    assert resumed.metrics["resumed_from_epoch"] == 2
    assert [r["epoch"] for r in replayed] == [1, 2, 3, 4]  # the resumed run logs the whole curve
    assert _learned(resumed) == _learned(whole)  # bit-for-bit


def test_truncated_and_pickled_checkpoints_are_refused(tmp_path):
    exp = _experiment()
    split = datamod.split(datamod.load(exp.data), exp.data.val_fraction)
    ckpt = tmp_path / "run.pt"
    with pytest.raises(Stop):
        train(exp, 0, split, torch.device("cpu"), on_epoch=lambda r: (_ for _ in ()).throw(Stop()), checkpoint=ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"run\.pt: not a torch checkpoint .*delete it to start this run from scratch"):
        train(exp, 0, split, torch.device("cpu"), checkpoint=ckpt)

    class Payload:  # what an attacker's checkpoint would carry
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"version": 1, "model": Payload()}, ckpt)
    with pytest.raises(CheckpointError, match=r"refused: it holds pickled Python objects"):
        train(exp, 0, split, torch.device("cpu"), checkpoint=ckpt)


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_redoes_only_what_was_lost(workdir):
    """A real process: SIGTERM after epoch 2 of 6 → exit 143, run KILLED, checkpoint kept; the next
    `run` continues from epoch 2 and ends with the same metrics as an uninterrupted run elsewhere."""
    text = (TINY_SUITE.replace("epochs: 2", "epochs: 6").replace("seeds: 2", "seeds: 1")
            .replace("  adam: {optimizer: {name: adam, lr: 0.001}}\n", ""))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    (workdir / "a").mkdir()
    (workdir / "b").mkdir()
    suite = write_suite(workdir / "a" / "tiny.yaml", text)
    proc = subprocess.Popen([sys.executable, "-m", "cnnbench", "run", str(suite), "-q", "--no-report",
                             "--checkpoint-every", "0"],  # tiny epochs: save each one
                            cwd=workdir / "a", env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = workdir / "a" / "checkpoints" / "tiny"
    try:
        while proc.poll() is None and not any(ckpts.glob("*.pt")):
            pass
        while proc.poll() is None and load_training_state(next(ckpts.glob("*.pt")))["epoch"] < 2:
            pass
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, out
    [ckpt] = ckpts.glob("*.pt")
    stopped_at = load_training_state(ckpt)["epoch"]
    assert 2 <= stopped_at < 6

    def runs(where):
        c = MlflowClient(f"sqlite:///{where / 'mlflow.db'}")
        exp = c.get_experiment_by_name("tiny")
        return c.search_runs([exp.experiment_id], "tags.`cnnbench.role` = 'run'")

    assert [r.info.status for r in runs(workdir / "a")] == ["KILLED"]
    resumed = subprocess.run([sys.executable, "-m", "cnnbench", "run", str(suite), "-q", "--no-report"],
                             cwd=workdir / "a", env=env, capture_output=True, text=True, timeout=300)
    (workdir / "tmp").mkdir()
    fresh = subprocess.run([sys.executable, "-m", "cnnbench", "run", str(write_suite(workdir / "b" / "tiny.yaml", text)),
                            "-q", "--no-report"], cwd=workdir / "b", env=env | {"TMPDIR": str(workdir / "tmp")},
                           capture_output=True, text=True, timeout=300)
    assert not list((workdir / "tmp").glob("cnnbench-*"))  # no temporary directory of its own left behind
    assert resumed.returncode == 0 and fresh.returncode == 0, resumed.stderr + fresh.stderr
    assert not any(ckpts.glob("*.pt"))  # removed once the run finished
    [done] = [r for r in runs(workdir / "a") if r.info.status == "FINISHED"]
    [ref] = runs(workdir / "b")
    assert done.data.metrics["resumed_from_epoch"] == stopped_at
    for key in ("test_accuracy", "test_loss", "val_loss", "train_loss", "f1_macro"):
        assert done.data.metrics[key] == ref.data.metrics[key], key


def test_a_run_a_dead_process_left_running_is_ended_failed_when_the_suite_runs_again(tmp_path):
    """SIGKILL leaves a child run RUNNING in MLflow. The next single-process `run` looks those up once per
    suite and ends each FAILED, with the reason, as its run starts again; runs nobody abandoned are left."""
    from cnnbench.config import load_suite, plan
    from cnnbench.runner import run_suite
    from cnnbench.tracking import ROLE_RUN, Tracker

    suite = load_suite(write_suite(tmp_path / "tiny.yaml", TINY_SUITE.replace("seeds: 2", "seeds: 1")))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = tracker.experiment_id(suite.name)
    spec = next(s for s in plan(suite) if s.variant == "adam")
    dead = tracker.start_run(exp_id, spec.run_name, {"cnnbench.suite": suite.name, "cnnbench.role": ROLE_RUN,
                                                     "cnnbench.fingerprint": spec.fingerprint})
    other = tracker.start_run(exp_id, "old/seed0", {"cnnbench.suite": suite.name, "cnnbench.role": ROLE_RUN,
                                                    "cnnbench.fingerprint": "0" * 16})  # a config no longer planned
    assert tracker.running_fingerprints(exp_id, suite.name) == {spec.fingerprint, "0" * 16}
    outcome = run_suite(suite, tracker)
    assert outcome.counts == {"finished": 2}
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    ended = client.get_run(dead)
    assert ended.info.status == "FAILED" and ended.data.tags["cnnbench.status"] == "failed"
    assert "the run was started again" in ended.data.tags["cnnbench.reason"]
    assert client.get_run(other).info.status == "RUNNING"  # ended only when its own run starts again
    assert tracker.running_fingerprints(exp_id, suite.name) == {"0" * 16}


def test_a_suite_that_crashes_ends_its_parent_failed_with_its_wall_time(tmp_path):
    """An unexpected error (here: a progress display that raises) must not leave the suite's parent run
    RUNNING forever: it ends FAILED with the wall time it had, so the report can still count it."""
    from cnnbench.config import load_suite
    from cnnbench.events import Events
    from cnnbench.runner import run_suite
    from cnnbench.tracking import ROLE_SUITE, Tracker

    class Broken(Events):
        def run_start(self, spec, index, total):
            raise RuntimeError("display broke")

    suite = load_suite(write_suite(tmp_path / "tiny.yaml", TINY_SUITE.replace("seeds: 2", "seeds: 1")))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db")
    with pytest.raises(RuntimeError, match="display broke"):
        run_suite(suite, tracker, events=Broken())
    [parent] = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").search_runs(
        [tracker.experiment_id(suite.name)], f"tags.`cnnbench.role` = '{ROLE_SUITE}'")
    assert parent.info.status == "FAILED" and parent.data.metrics["suite_wall_s"] > 0


def test_what_a_run_recorded_before_its_process_was_killed_is_in_the_store(tmp_path):
    """cnnbench writes its SQLite store ahead (WAL, synchronous=NORMAL: sqlite_store._wal_on_connect). SIGKILL right
    after a run ends leaves that run only in the write-ahead log, and the next reader finds all of it there."""
    import sqlite3

    script = f"""
import os, signal
from cnnbench.tracking import Tracker
tracker = Tracker("sqlite:///{tmp_path}/mlflow.db")
run = tracker.start_run(tracker.experiment_id("killed"), "last/seed0", {{"cnnbench.role": "run"}})
tracker.log(run, metrics={{"test_accuracy": 0.97}}, params={{"lr": 0.1}}, tags={{"cnnbench.status": "finished"}})
tracker.log_artifacts(run, {{"config.yaml": "lr: 0.1"}})
tracker.end_run(run)
os.kill(os.getpid(), signal.SIGKILL)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "mlflow.db-wal").stat().st_size > 0  # never checkpointed: the run is in the log
    with sqlite3.connect(tmp_path / "mlflow.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert run.info.status == "FINISHED"
    assert (run.data.metrics, run.data.params) == ({"test_accuracy": 0.97}, {"lr": "0.1"})
    assert run.data.tags["cnnbench.status"] == "finished"
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
