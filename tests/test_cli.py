"""End to end through the CLI, into a real SQLite MLflow store in a temporary directory."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import REPO, SUITES, TINY_SUITE, write_suite


def client() -> MlflowClient:
    """The store of the current test directory (absolute: MLflow caches stores per URI string)."""
    return MlflowClient(tracking_uri=f"sqlite:///{Path.cwd() / 'mlflow.db'}")


def child_runs(suite: str):
    exp = client().get_experiment_by_name(suite)
    runs = client().search_runs([exp.experiment_id], "tags.`cnnbench.role` = 'run'", max_results=1000)
    return sorted(runs, key=lambda r: r.info.start_time)


def test_help_is_fast_and_lists_commands():
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "cnnbench", "--help"], capture_output=True, text=True, check=True)
    assert time.perf_counter() - t0 < 5  # torch and mlflow are imported lazily
    for cmd in ("run", "validate", "report", "list", "ui"):
        assert cmd in out.stdout


@pytest.mark.slow
def test_quickstart_end_to_end_then_resume(cli, workdir):
    result = cli("run", SUITES / "quickstart.yaml", "--set", "seeds=2", "--set", "base.train.epochs=2", "-q")
    assert result.exit_code == 0, result.output
    assert "8 finished" in result.output

    # MLflow: one parent, 8 nested children with tags, params, metrics, artifacts
    runs = child_runs("quickstart")
    assert len(runs) == 8
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    parent = client().get_run(parents.pop())
    assert parent.data.tags["cnnbench.role"] == "suite" and parent.info.status == "FINISHED"
    assert "env.torch" in parent.data.params
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {f"{v}/seed{s}" for v in ("baseline", "batchnorm", "augment", "adam") for s in (0, 1)}
    run = by_name["adam/seed1"]
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["cnnbench.variant"] == "adam" and tags["cnnbench.seed"] == "1" and tags["cnnbench.baseline"] == "false"
    assert tags["cnnbench.status"] == "finished" and tags["cnnbench.device"] in ("cpu", "cuda", "mps")
    assert tags["cnnbench.worker"] == f"{socket.gethostname()}:{os.getpid()}"  # in-process run
    assert by_name["baseline/seed0"].data.tags["cnnbench.baseline"] == "true"
    assert params["optimizer.name"] == "adam" and params["optimizer.lr"] == "0.001" and params["train.epochs"] == "2"
    for key in ("test_accuracy", "test_loss", "precision_macro", "recall_macro", "f1_macro", "train_time_s",
                "train_throughput", "params", "peak_memory_bytes", "val_accuracy", "train_loss", "val_loss", "lr"):
        assert key in metrics, key
    assert [m.step for m in client().get_metric_history(run.info.run_id, "val_accuracy")] == [1, 2]
    artifacts = {a.path for a in client().list_artifacts(run.info.run_id)}
    assert {"config.yaml", "confusion_matrix.json", "environment.json"} <= artifacts
    confusion = json.loads(Path(client().download_artifacts(run.info.run_id, "confusion_matrix.json")).read_text())
    assert len(confusion) == 10 and sum(map(sum, confusion)) == 360  # digits test split

    # the report, rendered from MLflow
    report = (workdir / "reports" / "quickstart.md").read_text()
    assert "Which of these tricks helps a small CNN on handwritten digits, given 10 epochs?" in report
    for variant in ("baseline", "batchnorm", "augment", "adam"):
        assert f"| {variant}" in report or f"**{variant}**" in report
    assert "2/0/0/0" in report and "Δ vs baseline [simultaneous 95% CI]" in report
    assert (workdir / "reports" / "quickstart_curves.png").stat().st_size > 10_000
    assert (workdir / "reports" / "quickstart_bars.png").stat().st_size > 5_000
    assert "cnnbench run" in report and "seeds=2" in report  # the exact command
    assert "[quickstart](quickstart.md)" in (workdir / "reports" / "README.md").read_text()

    # the MLflow UI opens on the answer: a model-training experiment described by its question and answer,
    # the rendered report (markdown and the plots it shows) in the suite run's artifacts
    experiment = client().get_experiment_by_name("quickstart")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    note = experiment.tags["mlflow.note.content"]
    assert "Which of these tricks helps" in note and "**Answer.** The baseline `baseline` reaches" in note
    published = {a.path for a in client().list_artifacts(parent.info.run_id, "report")}
    assert {"report/quickstart.md", "report/quickstart_curves.png", "report/quickstart_bars.png"} <= published
    assert f"report: reports/quickstart.md (also in MLflow, suite run {parent.info.run_id}: report/)" in result.output
    assert (f"browse: cnnbench ui  → http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
            "?workflowType=machine_learning") in result.output
    published_md = Path(client().download_artifacts(parent.info.run_id, "report/quickstart.md", str(workdir / "dl")))
    assert published_md.read_text().startswith("# quickstart")  # without the metadata comment

    # resume: nothing finished is redone
    again = cli("run", SUITES / "quickstart.yaml", "--set", "seeds=2", "--set", "base.train.epochs=2", "-q")
    assert again.exit_code == 0 and "8 reused" in again.output
    assert len(child_runs("quickstart")) == 8
    # a changed config is a different fingerprint: only the changed variant runs
    changed = cli("run", SUITES / "quickstart.yaml", "--set", "seeds=2", "--set", "base.train.epochs=2",
                  "--set", "variants.adam.optimizer.lr=0.002", "-q")
    assert changed.exit_code == 0 and "2 finished" in changed.output and "6 reused" in changed.output
    # the report regenerates without training
    (workdir / "reports" / "quickstart.md").unlink()
    rep = cli("report", SUITES / "quickstart.yaml", "--set", "seeds=2", "--set", "base.train.epochs=2")
    assert rep.exit_code == 0 and (workdir / "reports" / "quickstart.md").exists()


def test_diverging_and_skipped_runs_are_results_and_the_suite_finishes(cli, workdir):
    text = TINY_SUITE.replace("seeds: 2", "seeds: 1") + ""
    text = text.replace("  adam: {optimizer: {name: adam, lr: 0.001}}",
                        "  adam: {optimizer: {name: adam, lr: 0.001}}\n"
                        "  huge_lr: {optimizer: {lr: 1.0e6, momentum: 0.0}}\n"
                        "  on_cuda: {device: cuda}")
    suite = write_suite(workdir / "tiny.yaml", text)
    result = cli("run", suite, "-q")
    assert result.exit_code == 0, result.output
    runs = {r.data.tags["cnnbench.variant"]: r for r in child_runs("tiny")}
    assert runs["huge_lr"].data.tags["cnnbench.status"] == "diverged"
    assert runs["huge_lr"].data.metrics["diverged_epoch"] == 1
    assert "diverged at epoch 1" in runs["huge_lr"].data.tags["cnnbench.reason"]
    assert runs["adam"].data.tags["cnnbench.status"] == "finished"
    if not torch.cuda.is_available():
        assert runs["on_cuda"].data.tags["cnnbench.status"] == "skipped"
        assert "CUDA is not available" in runs["on_cuda"].data.tags["cnnbench.reason"]
    report = (workdir / "reports" / "tiny.md").read_text()
    assert "`huge_lr/seed0`: diverged — diverged at epoch 1" in report
    # diverged runs are results: not redone on resume
    assert "reused" in cli("run", suite, "-q").output
    assert len([r for r in child_runs("tiny") if r.data.tags["cnnbench.variant"] == "huge_lr"]) == 1


def test_a_failing_run_is_recorded_and_exit_code_is_1(cli, workdir):
    text = TINY_SUITE.replace("seeds: 2", "seeds: 1").replace(
        "  adam: {optimizer: {name: adam, lr: 0.001}}", "  bad_kwarg: {optimizer: {kwargs: {no_such_arg: 1}}}")
    result = cli("run", write_suite(workdir / "tiny.yaml", text), "-q")
    assert result.exit_code == 1
    runs = {r.data.tags["cnnbench.variant"]: r for r in child_runs("tiny")}
    assert runs["bad_kwarg"].info.status == "FAILED" and runs["bad_kwarg"].data.tags["cnnbench.status"] == "failed"
    assert "no_such_arg" in runs["bad_kwarg"].data.tags["cnnbench.reason"]
    assert runs["sgd"].data.tags["cnnbench.status"] == "finished"
    assert "traceback.txt" in {a.path for a in client().list_artifacts(runs["bad_kwarg"].info.run_id)}


@pytest.mark.parametrize(
    "change, expected",
    [
        (("epochs: 2", "epochz: 2"), "tiny.yaml:7: base.train.epochz: unknown key 'epochz'; did you mean 'epochs'?"),
        (("{name: lenet5}", "{name: lenet}"), "tiny.yaml:5: base.model.name: unknown model 'lenet'; did you mean 'lenet5'?"),
        (("dataset: synthetic", "dataset: mnits"), "base.data.dataset: unknown dataset 'mnits'; did you mean 'mnist'?"),
        (("baseline: sgd", "baseline: sgdd"), "tiny.yaml:12: baseline: baseline 'sgdd' is not a variant; did you mean 'sgd'?"),
        (("lr: 0.001}", "lr: -1}"), "tiny.yaml:11: variants.adam.optimizer.lr: Input should be greater than 0 (got -1)"),
    ],
)
def test_bad_input_exits_2_with_location_and_writes_nothing(cli, workdir, change, expected):
    suite = write_suite(workdir / "tiny.yaml", TINY_SUITE.replace(*change))
    for command in ("run", "validate"):
        result = cli(command, suite)
        assert result.exit_code == 2, result.output
        assert expected in result.output
        assert "Traceback" not in result.output
    assert not (workdir / "mlflow.db").exists() and not (workdir / "reports").exists()


def test_bad_override_missing_file_and_forced_absent_device(cli, workdir):
    suite = write_suite(workdir / "tiny.yaml", TINY_SUITE)
    result = cli("run", suite, "--set", "seeds=-1")
    assert result.exit_code == 2 and "--set seeds=-1: seeds:" in result.output
    result = cli("run", workdir / "missing.yaml")
    assert result.exit_code == 2 and "missing.yaml: <suite>: no such file" in result.output
    if not torch.cuda.is_available():
        result = cli("run", suite, "--device", "cuda")
        assert result.exit_code == 2 and "CUDA is not available" in result.output
    result = cli("run", suite, "--set", "base.data.dataset=cifar10", "--data-dir", workdir / "nodata")
    assert result.exit_code == 2 and "cifar-10-batches-py" in result.output
    assert not (workdir / "mlflow.db").exists()


def test_validate_prints_the_plan_and_list_prints_registries(cli):
    result = cli("validate", SUITES / "quickstart.yaml")
    assert result.exit_code == 0
    assert "4 variants × 6 seeds (0, 1, 2, 3, 4, 5) = 24 runs" in result.output and "total: 240 epochs" in result.output
    assert "adaptive seeds: rounds at 4, 6 seeds, stopping once every comparison is decided — 16 runs at least" \
        in result.output
    result = cli("list")
    assert result.exit_code == 0
    for word in ("datasets:", "models:", "lenet5", "mnist_net", "optimizers:", "schedules:", "cosine", "augmentations:"):
        assert word in result.output
    assert cli("list", "models").output.startswith("models:")
    assert cli("list", "modle").exit_code == 2
    techniques = cli("list", "techniques").output
    for word in ("low_rank", "post-training (low_rank:)", "precision", "training (train:)", "distill"):
        assert word in techniques


def test_report_without_runs_is_a_clear_error(cli, workdir):
    result = cli("report", write_suite(workdir / "tiny.yaml", TINY_SUITE))
    assert result.exit_code == 2 and "no MLflow experiment 'tiny'" in result.output


def _wait_for_running_child(db: Path, timeout: float = 120) -> None:
    """Poll the SQLite file read-only (opening it with MLflow could race the runner's own table creation)."""
    import sqlite3

    query = ("SELECT count(*) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
             "WHERE t.key = 'cnnbench.role' AND t.value = 'run' AND r.status = 'RUNNING'")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
                    if con.execute(query).fetchone()[0]:
                        return
            except sqlite3.Error:
                pass  # tables not created yet
        time.sleep(0.3)
    raise TimeoutError("no run started")


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_ends_runs_as_killed_and_next_run_picks_up(workdir, sig, code):
    text = TINY_SUITE.replace("name: tiny", "name: slow").replace("epochs: 2", "epochs: 400").replace("seeds: 2", "seeds: 1")
    suite = write_suite(workdir / "slow.yaml", text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "cnnbench", "run", str(suite), "-q"], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_running_child(workdir / "mlflow.db")
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, out
    assert "Traceback" not in out and "interrupted" in out
    c = client()
    exp = c.get_experiment_by_name("slow")
    runs = c.search_runs([exp.experiment_id], "")
    assert runs and all(r.info.status == "KILLED" for r in runs)  # the parent and the child in flight
    assert not any(r.info.status == "RUNNING" for r in runs)
    # the next run redoes the killed run (a short version of it, to keep the test quick)
    short = write_suite(workdir / "slow.yaml", text.replace("epochs: 400", "epochs: 1"))
    done = subprocess.run([sys.executable, "-m", "cnnbench", "run", str(short), "-q"], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "2 finished" in done.stdout


@pytest.mark.slow
def test_ui_serves_the_same_store(cli, workdir):
    """`cnnbench ui` starts a real MLflow server on the store `run` wrote, and it lists the suite's runs."""
    import socket
    import urllib.request

    assert cli("run", write_suite(workdir / "tiny.yaml", TINY_SUITE.replace("seeds: 2", "seeds: 1")), "-q").exit_code == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "cnnbench", "ui", "--port", str(port)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline, body = time.time() + 90, None
        while time.time() < deadline and body is None:
            try:
                req = urllib.request.Request(
                    f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny")
                body = json.loads(urllib.request.urlopen(req, timeout=2).read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "the MLflow UI did not answer within 90 s"
        assert body["experiment"]["name"] == "tiny"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_tracking_server_down_at_start_fails_fast_before_training(cli, workdir):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    result = cli("run", write_suite(workdir / "tiny.yaml", TINY_SUITE), "--tracking-uri", f"http://127.0.0.1:{port}")
    assert result.exit_code == 2 and time.time() - t0 < 30
    assert f"http://127.0.0.1:{port}" in result.output and "does not answer" in result.output
    assert "Traceback" not in result.output and not (workdir / "reports").exists()


@pytest.mark.slow
def test_a_second_run_on_the_same_sqlite_store_is_refused_and_the_first_finishes(cli, workdir):
    text = TINY_SUITE.replace("name: tiny", "name: slow").replace("epochs: 2", "epochs: 40").replace("seeds: 2", "seeds: 1")
    suite = write_suite(workdir / "slow.yaml", text)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen([sys.executable, "-m", "cnnbench", "run", str(suite), "-q"], cwd=workdir, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_running_child(workdir / "mlflow.db")
        second = cli("run", write_suite(workdir / "tiny.yaml", TINY_SUITE), "-q")
        assert second.exit_code == 2, second.output
        assert f"pid {first.pid}" in second.output and "sqlite:///mlflow.db" in second.output
        out, _ = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0, out
    c = client()
    runs = c.search_runs([c.get_experiment_by_name("slow").experiment_id], "")
    roles = sorted(r.data.tags["cnnbench.role"] for r in runs)
    assert roles == ["run", "run", "suite", "timing"]  # parent, 2 variants and the timing protocol: store intact
    assert all(r.info.status == "FINISHED" for r in runs)
    assert c.get_experiment_by_name("tiny") is None  # the refused run wrote nothing
    assert cli("run", write_suite(workdir / "tiny.yaml", TINY_SUITE), "-q").exit_code == 0  # free again
