"""Scale-out, for real: a PostgreSQL database per test (the local server, trust auth), a real
``mlflow server`` process on PostgreSQL, and ``cnnbench run`` worker processes started, killed and
interrupted with real signals. Bounded in time: heartbeats every 1 s, a 5 s grace period."""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import REPO, TINY_SUITE, write_suite

pytestmark = pytest.mark.slow

PG_ADMIN = os.environ.get("CNNBENCH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
ENV = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
FAST_HEARTBEAT = ("--heartbeat", "1", "--grace-period", "5")


@pytest.fixture(scope="module")
def new_database():
    """A factory of fresh PostgreSQL databases (dropped afterwards); returns each one's URL."""
    import psycopg

    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as e:  # CI has one: there, a missing server is a failure, not a skip
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            f"PostgreSQL is not reachable at {PG_ADMIN} ({e}); start it, or point CNNBENCH_TEST_POSTGRES at a "
            f"server where this user may create databases")
    made = []

    def new() -> str:
        name = f"cnnbench_test_{uuid.uuid4().hex[:10]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"{PG_ADMIN.rsplit('/', 1)[0]}/{name}"

    yield new
    for storage in _STORAGES.values():
        storage.engine.dispose()
    _STORAGES.clear()
    for name in made:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(backend: str, artifacts: Path, port: int | None = None, *extra: str, env: dict | None = None):
    """``mlflow server`` as the README's recipe starts it (``extra`` arguments, e.g. ``--app-name basic-auth``,
    and ``env``); returns (process, URL) once /health answers."""
    port = port or _free_port()
    exe = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(exe), "server", "--backend-store-uri", backend, "--artifacts-destination",
                             str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1", *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    import requests

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"mlflow server exited with {proc.returncode}"
        try:
            if requests.get(url + "/health", timeout=1).ok:
                return proc, url
        except requests.RequestException:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("mlflow server did not answer within 120 s")


def stop(proc) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def mlflow_server(new_database, tmp_path_factory):
    proc, url = start_mlflow_server(new_database(), tmp_path_factory.mktemp("artifacts"))
    yield url
    stop(proc)


def _suite(workdir: Path, name: str, seeds: int, epochs: int) -> Path:
    text = (TINY_SUITE.replace("name: tiny", f"name: {name}").replace("seeds: 2", f"seeds: {seeds}")
            .replace("epochs: 2", f"epochs: {epochs}, threads: 1")  # N workers share 2 cores
            .replace("  device: cpu\n", "  device: cpu\n  inference: {enabled: false}\n"))
    return write_suite(workdir / f"{name}.yaml", text)


_SPAWNED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_workers():
    """A failed assertion must not leave workers running into the next test."""
    yield
    for proc in _SPAWNED:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    _SPAWNED.clear()


def _worker(suite: Path, storage: str, tracking: str, cwd: Path, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cnnbench", "run", str(suite), "-q", "--no-report",
                             "--storage", storage, "--tracking-uri", tracking, *FAST_HEARTBEAT, *extra],
                            cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _SPAWNED.append(proc)
    return proc


def _runs(tracking: str, suite: str, role: str = "run") -> list:
    client = MlflowClient(tracking)
    exp = client.get_experiment_by_name(suite)
    return client.search_runs([exp.experiment_id], f"tags.`cnnbench.role` = '{role}'", max_results=1000)


_STORAGES: dict = {}  # one Optuna storage per database: a new one per poll leaked connections until PostgreSQL
#                       refused clients ("too many clients already")


def _studies(url: str) -> dict[str, list]:
    """study name → its trials, for every study in the database at ``url``."""
    import optuna

    if url not in _STORAGES:
        _STORAGES[url] = optuna.storages.RDBStorage(url)
    storage = _STORAGES[url]
    return {s.study_name: optuna.load_study(study_name=s.study_name, storage=storage).trials
            for s in storage.get_all_studies()}


def _queue_trials(storage: str, suite: str):
    return [t for name, trials in _studies(storage).items() if name.startswith(f"{suite}.queue.") for t in trials]


def _wait_running(storage: str, suite: str, n: int, timeout: float = 120) -> list:
    """The queue trials that are RUNNING with an MLflow run, once there are ``n`` of them."""
    from optuna.trial import TrialState

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            running = [t for t in _queue_trials(storage, suite)
                       if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]
        except Exception:  # noqa: BLE001 - the schema may not exist yet while workers start
            running = []
        if len(running) >= n:
            return running
        time.sleep(0.2)
    pytest.fail(f"fewer than {n} runs of {suite} were running after {timeout} s")


def _expected(seeds: int) -> Counter:
    return Counter((v, str(s)) for v in ("sgd", "adam") for s in range(seeds))


def test_four_workers_run_every_variant_seed_exactly_once(new_database, mlflow_server, workdir):
    storage, seeds = new_database(), 4
    suite = _suite(workdir, "four", seeds, epochs=2)
    workers = [_worker(suite, storage, mlflow_server, workdir) for _ in range(4)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0] * 4, "\n".join(outs)

    runs = _runs(mlflow_server, "four")
    assert all(r.info.status == "FINISHED" and r.data.tags["cnnbench.status"] == "finished" for r in runs)
    assert Counter((r.data.tags["cnnbench.variant"], r.data.tags["cnnbench.seed"]) for r in runs) == _expected(seeds)
    assert len({r.data.tags["cnnbench.worker"] for r in runs}) >= 2  # the work was shared
    [parent] = _runs(mlflow_server, "four", "suite")  # created once although four workers started together
    assert parent.info.status == "FINISHED" and parent.data.metrics["runs_finished"] == 2 * seeds
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    trials = _queue_trials(storage, "four")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len({t.user_attrs["plan_key"] for t in complete}) == len(complete) == 2 * seeds
    # the only other trials: empty ones `ask` made when another worker took the last waiting run first
    assert all(t.state.name == "FAIL" and t.user_attrs.get("empty") for t in trials if t not in complete)

    again = _worker(suite, storage, mlflow_server, workdir)  # a finished suite: nothing is redone
    out, _ = again.communicate(timeout=300)
    assert again.returncode == 0 and "nothing to run" in out, out
    assert len(_runs(mlflow_server, "four")) == 2 * seeds


def test_killed_and_interrupted_workers_runs_are_requeued_and_finished_by_others(new_database, mlflow_server, workdir):
    """SIGKILL one worker mid-run (its run is failed after the grace period, re-queued, finished by
    another) and SIGINT another (exit 130, its run KILLED and re-queued at once): the count is exact."""
    storage, seeds = new_database(), 3
    suite = _suite(workdir, "faults", seeds, epochs=8)
    workers = [_worker(suite, storage, mlflow_server, workdir) for _ in range(3)]
    running = _wait_running(storage, "faults", 2)
    pid_of = {w.pid: w for w in workers}
    victims = [pid_of[int(t.user_attrs["worker"].rsplit(":", 1)[1])] for t in running[:2]]
    killed_run, interrupted_run = (t.user_attrs["mlflow_run_id"] for t in running[:2])
    victims[0].send_signal(signal.SIGKILL)
    victims[1].send_signal(signal.SIGINT)
    outs = {w.pid: w.communicate(timeout=600)[0] for w in workers}
    assert victims[0].returncode == -signal.SIGKILL
    assert victims[1].returncode == 130, outs[victims[1].pid]
    [survivor] = [w for w in workers if w not in victims]
    assert survivor.returncode == 0, outs[survivor.pid]

    runs = {r.info.run_id: r for r in _runs(mlflow_server, "faults")}
    assert runs[killed_run].info.status == "FAILED"
    assert "stopped sending heartbeats" in runs[killed_run].data.tags["cnnbench.reason"]
    assert runs[interrupted_run].info.status == "KILLED"
    finished = [r for r in runs.values() if r.info.status == "FINISHED"]
    assert Counter((r.data.tags["cnnbench.variant"], r.data.tags["cnnbench.seed"]) for r in finished) == _expected(seeds)
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    trials = _queue_trials(storage, "faults")
    assert sum(t.state.name == "COMPLETE" for t in trials) == 2 * seeds
    assert any(t.system_attrs.get("failed_trial") is not None for t in trials)  # RetryHeartbeatStaleTrialCallback
    [parent] = _runs(mlflow_server, "faults", "suite")
    assert parent.info.status == "FINISHED" and parent.data.metrics["runs_finished"] == 2 * seeds


def test_tracking_server_stopped_mid_suite_fails_loudly_and_the_next_run_redoes_only_what_was_lost(workdir):
    """Choice: fail loudly (exit 3, the URI in the message), no buffering. The run in flight keeps its
    checkpoint; with the server back, the same command finishes the suite and redoes nothing finished."""
    backend = f"sqlite:///{workdir / 'server.db'}"
    port = _free_port()
    server, url = start_mlflow_server(backend, workdir / "artifacts", port)
    suite = _suite(workdir, "lost", seeds=2, epochs=6)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "cnnbench", "run", str(suite), "-q", "--no-report",
                                 "--tracking-uri", url, "--checkpoint-every", "0"], cwd=workdir, env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        client = MlflowClient(url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # the first run has finished, the second is training
            exp = client.get_experiment_by_name("lost")
            runs = client.search_runs([exp.experiment_id], "tags.`cnnbench.role` = 'run'") if exp else []
            if len(runs) == 2 and list((workdir / "checkpoints" / "lost").glob("*.pt")):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the suite did not reach its second run")
        stop(server)
        out, _ = proc.communicate(timeout=300)
    finally:
        stop(server) if server.poll() is None else None
    assert proc.returncode == 3, out
    assert f"the MLflow tracking store at {url} stopped answering" in out and "Traceback" not in out
    assert list((workdir / "checkpoints" / "lost").glob("*.pt"))  # kept for the redo

    server, url = start_mlflow_server(backend, workdir / "artifacts", port)
    try:
        again = subprocess.run([sys.executable, "-m", "cnnbench", "run", str(suite), "-q", "--no-report",
                                "--tracking-uri", url], cwd=workdir, env=ENV, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stdout + again.stderr
        runs = _runs(url, "lost")
    finally:
        stop(server)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert len(finished) == 2 * 2
    assert Counter(r.data.tags["cnnbench.fingerprint"] for r in finished).most_common(1)[0][1] == 1  # none redone
    assert any(r.data.metrics.get("resumed_from_epoch", 0) >= 1 for r in finished)  # the lost run resumed


SEARCHED = """\
name: searched
question: Does Adam beat SGD with the same tuning budget, tuned by two workers?
base:
  data: {dataset: digits, batch_size: 128}
  model: {name: lenet5}
  optimizer: {name: sgd, lr: 0.05, momentum: 0.9}
  train: {epochs: 2, threads: 1}
  device: cpu
  inference: {enabled: false}
search:
  trials: 4
  sampler: random
  space:
    optimizer.lr: {type: float, low: 1.0e-3, high: 0.1, log: true}
variants:
  sgd: {}
  adam: {optimizer: {name: adam, momentum: 0.0}}
baseline: sgd
seeds: 2
"""


def test_two_workers_share_a_search_without_exceeding_its_budget(new_database, mlflow_server, workdir):

    storage = new_database()
    suite = write_suite(workdir / "searched.yaml", SEARCHED)
    workers = [_worker(suite, storage, mlflow_server, workdir) for _ in range(2)]
    outs = [w.communicate(timeout=600)[0] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], "\n".join(outs)

    studies = {name: trials for name, trials in _studies(storage).items() if ".queue." not in name}
    assert len(studies) == 2
    for name, trials in studies.items():
        trained = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED", "FAIL") and not t.user_attrs.get("surplus")]
        assert len(trained) == 4, name  # the budget, no more (a trial both workers made room for is ended unrun)
        assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    searches = _runs(mlflow_server, "searched", "search")
    assert sorted(r.data.tags["cnnbench.variant"] for r in searches) == ["adam", "sgd"]  # one each, not one per worker
    assert all(r.info.status == "FINISHED" for r in searches)
    trial_runs = _runs(mlflow_server, "searched", "trial")
    assert len(trial_runs) == 8 and len({r.data.tags["cnnbench.worker"] for r in trial_runs}) == 2
    runs = _runs(mlflow_server, "searched")
    assert Counter((r.data.tags["cnnbench.variant"], r.data.tags["cnnbench.seed"]) for r in runs) == _expected(2)
    assert all(r.data.tags.get("cnnbench.tuned") == "true" for r in runs)
    [parent] = _runs(mlflow_server, "searched", "suite")
    assert parent.info.status == "FINISHED"


def test_a_run_popped_by_a_worker_that_died_before_its_first_heartbeat_is_requeued(new_database):
    """Optuna never calls a trial without heartbeats stale; the queue fails and re-queues it itself."""
    from cnnbench.config import RunSpec, load_suite
    from cnnbench.optuna_storage import QueueSettings, ask
    from cnnbench.optuna_storage import open_shared_storage as open_storage
    from cnnbench.workqueue import RunQueue

    suite = load_suite(REPO / "suites/quickstart.yaml", ())
    settings = QueueSettings(new_database(), heartbeat_interval=1, grace_period=1, poll_s=0.1)
    queue = RunQueue(open_storage(settings), suite, settings)
    assert queue.join()
    spec = RunSpec(suite.name, "adam", 0, suite.experiments["adam"], plan_key="k0")
    queue.fill([spec])
    dead = ask(queue.study)  # popped, then the worker died: no heartbeat, no worker attr
    assert queue.pop() is None and queue.counts() == {"waiting": 0, "running": 1}
    time.sleep(1.5)
    other = RunQueue(open_storage(settings), suite, settings)
    assert not other.join()  # the same round: it still holds work
    again = other.pop()
    assert again is not None and again.user_attrs["plan_key"] == "k0" and again.number != dead.number


def test_a_search_trial_of_a_killed_worker_is_retried_and_the_budget_still_holds(new_database, mlflow_server, workdir):
    from optuna.trial import TrialState

    from cnnbench.search import _counted

    storage = new_database()
    text = SEARCHED.replace("name: searched", "name: searchkill").replace("epochs: 2", "epochs: 6") \
        .replace("trials: 4", "trials: 3").replace("seeds: 2", "seeds: 1")
    suite = write_suite(workdir / "searchkill.yaml", text)
    workers = [_worker(suite, storage, mlflow_server, workdir) for _ in range(2)]
    deadline, victim = time.monotonic() + 120, None
    while victim is None and time.monotonic() < deadline:
        try:
            for name, trials in _studies(storage).items():
                for t in trials:
                    if ".queue." not in name and t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs:
                        victim = t
        except Exception:  # noqa: BLE001 - the schema may not exist yet
            pass
        time.sleep(0.2)
    assert victim is not None, "no search trial started"
    pid = int(victim.user_attrs["worker"].rsplit(":", 1)[1])
    [killed] = [w for w in workers if w.pid == pid]
    killed.send_signal(signal.SIGKILL)
    [survivor] = [w for w in workers if w is not killed]
    out, _ = survivor.communicate(timeout=600)
    killed.wait()
    assert survivor.returncode == 0, out

    for name, trials in _studies(storage).items():
        if ".queue." in name:
            continue
        assert sum(_counted(t, trials) for t in trials) == 3, name  # the dead trial does not use up budget
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        if any(t.number == victim.number and t.state == TrialState.FAIL for t in trials):  # the victim's study
            assert any(t.system_attrs.get("failed_trial") == victim.number for t in trials)  # retried with its params
    client = MlflowClient(mlflow_server)
    dead = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert dead.info.status == "FAILED" and "stopped sending heartbeats" in dead.data.tags["cnnbench.reason"]
    runs = _runs(mlflow_server, "searchkill")
    assert Counter(r.data.tags["cnnbench.variant"] for r in runs) == Counter({"sgd": 1, "adam": 1})


def test_workers_on_one_machine_are_told_when_they_oversubscribe_its_cores(new_database):
    from cnnbench.config import RunSpec, load_suite
    from cnnbench.optuna_storage import QueueSettings
    from cnnbench.optuna_storage import open_shared_storage as open_storage
    from cnnbench.workqueue import RunQueue, oversubscription

    assert oversubscription(1, 2, 2) is None and oversubscription(2, 1, 2) is None
    assert "--set base.train.threads=1" in oversubscription(2, 2, 2)
    assert "--set base.train.threads=4" in oversubscription(4, 16, 16)

    suite = load_suite(REPO / "suites/quickstart.yaml", ())
    settings = QueueSettings(new_database())
    queue = RunQueue(open_storage(settings), suite, settings)
    queue.join()
    queue.fill([RunSpec(suite.name, v, 0, suite.experiments[v], plan_key=v) for v in ("adam", "augment", "batchnorm")])
    for worker in ("here:1", "here:2", "elsewhere:1"):
        queue.pop().set_user_attr("worker", worker)
    assert queue.colocated("here") == 2 and queue.colocated("elsewhere") == 1 and queue.colocated("nowhere") == 0
