"""A shared cluster that lets no one in and loses nothing, for real: secrets in storage URLs, tracking URIs
and the environment never reach what cnnbench writes; a real ``mlflow server --app-name basic-auth`` lets a
worker with credentials in and refuses others with 401/403; a run killed on "machine A" finishes on
"machine B" from the checkpoint it uploaded to MLflow. PostgreSQL and MLflow servers are the local ones
the scale-out tests use (:mod:`tests.test_workers`)."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import torch
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient

from cnnbench import redact
from tests.conftest import TINY_SUITE, write_suite
from tests.test_workers import (  # noqa: F401 - new_database, mlflow_server: fixtures used by name
    _SPAWNED,
    ENV,
    FAST_HEARTBEAT,
    _free_port,
    _no_leftover_workers,
    mlflow_server,
    new_database,
    start_mlflow_server,
    stop,
)

PG_SECRET, URI_SECRET, ENV_SECRET, ADMIN_SECRET = "PgS3cret-7431", "UriS3cret-9052", "EnvS3cret-2718", "Adm1nS3cret-5550"
SECRETS = (PG_SECRET, URI_SECRET, ENV_SECRET)


# ───────────────────────────── masking, in process ─────────────────────────────

@pytest.mark.parametrize("raw, shown", [
    ("postgresql://postgres:S3cretPW@127.0.0.1/cnbsec", "postgresql://postgres:***@127.0.0.1/cnbsec"),
    ("postgresql+psycopg://u:p@ss:w@db:5432/x", "postgresql+psycopg://u:***@db:5432/x"),
    ("http://worker:W0rk!@127.0.0.1:5000/#/experiments/1", "http://worker:***@127.0.0.1:5000/#/experiments/1"),
    ("https://h/x?a=1&token=tok123456&b=2", "https://h/x?a=1&token=***&b=2"),
    ("host=db user=u password=hunter2secret dbname=x", "host=db user=u password=*** dbname=x"),
    ("http://127.0.0.1:5000 sqlite:///mlflow.db postgresql://postgres@127.0.0.1/db lr=0.05 key=3",
     "http://127.0.0.1:5000 sqlite:///mlflow.db postgresql://postgres@127.0.0.1/db lr=0.05 key=3"),
])
def test_passwords_in_urls_and_parameters_are_masked_and_nothing_else_is(raw, shown):
    assert redact.text(raw) == shown


def test_secret_named_environment_values_and_remembered_url_passwords_are_masked_anywhere(monkeypatch, tmp_path):
    monkeypatch.setenv("PGPASSWORD", "pg-env-secret")
    monkeypatch.setenv("MLFLOW_FLASK_SERVER_SECRET_KEY", "k")  # too short to mask: it would eat every "k"
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".mlflow").mkdir()
    (tmp_path / ".mlflow" / "credentials").write_text("[mlflow]\nmlflow_tracking_username = w\n"
                                                      "mlflow_tracking_password = file-secret-77\n")
    redact.text("connecting to postgresql://u:remembered-pw@h/db")
    assert redact.text("a pg-env-secret b file-secret-77 c remembered-pw d k") == "a *** b *** c *** d k"
    assert redact.value({"cmd": ["--storage", "postgresql://u:x-secret-1@h/db"], "n": 3}) == \
        {"cmd": ["--storage", "postgresql://u:***@h/db"], "n": 3}
    # a batch looks the known secrets up once; a password its first string carries still masks the second
    assert redact.value(["postgresql://u:batch-secret-2@h/db", "retrying with batch-secret-2"]) == \
        ["postgresql://u:***@h/db", "retrying with ***"]


def test_the_tracker_masks_params_tags_artifacts_and_notes_it_writes(workdir):
    from cnnbench.tracking import Tracker

    secret_url = "postgresql://postgres:TagS3cret-01@127.0.0.1/db"
    tracker = Tracker("sqlite:///mlflow.db")
    exp = tracker.experiment_id("masked", question=f"stored at {secret_url}?")
    run = tracker.start_run(exp, "r", {"cnnbench.where": secret_url})
    tracker.log(run, params={"optuna_storage": secret_url}, tags={"cnnbench.reason": f"failed: {secret_url}"})
    tracker.log_artifacts(run, {"environment.json": {"command": f"cnnbench run s.yaml --storage {secret_url}"},
                                "traceback.txt": f"OperationalError: {secret_url}"})
    tracker.publish_report(exp, run, f"see {secret_url}", {"r.md": b"report"})
    tracker.end_run(run)
    store = [*Path(".").glob("mlflow.db*"), *Path("mlruns").rglob("*")]  # the store's write-ahead log too
    written = b"".join(p.read_bytes() for p in store if p.is_file())
    assert b"TagS3cret-01" not in written
    assert b"postgres:***@127.0.0.1" in written


def test_an_error_message_carrying_a_password_is_masked_on_the_terminal(workdir):
    from cnnbench.cli import main

    suite = write_suite(workdir / "tiny.yaml", TINY_SUITE)
    result = CliRunner().invoke(main, ["run", str(suite), "--storage", "postgresql://postgres:Term1nalS3cret@127.0.0.1:1/x"])
    assert result.exit_code == 2
    assert "cannot open the Optuna storage postgresql://postgres:***@127.0.0.1:1/x" in result.output
    assert "Term1nalS3cret" not in result.output


# ───────────────────────────── checkpoints that travel, in process ─────────────────────────────

def _tiny_run(tracker, exp_id: str, fingerprint: str) -> str:
    return tracker.start_run(exp_id, "r", {"cnnbench.fingerprint": fingerprint, "cnnbench.role": "run"})


def test_a_travelled_checkpoint_that_was_changed_or_belongs_to_another_run_is_refused(workdir):
    from cnnbench import data as datamod
    from cnnbench.checkpoint_store import MLFLOW, CheckpointStore
    from cnnbench.checkpoints import CheckpointError
    from cnnbench.config import Experiment
    from cnnbench.tracking import Tracker
    from cnnbench.train import train

    exp = Experiment.model_validate(yaml.safe_load(TINY_SUITE)["base"])
    split = datamod.split(datamod.load(exp.data), exp.data.val_fraction)
    tracker = Tracker("sqlite:///mlflow.db")
    exp_id = tracker.experiment_id("tiny")
    machine_a = CheckpointStore(MLFLOW, tracker, "tiny", exp_id, every_s=0)  # tiny epochs: save each one
    first = _tiny_run(tracker, exp_id, "fp-a")
    ckpt, resumed = machine_a.open("fp-a", first)
    assert resumed == {}
    train(exp, 0, split, torch.device("cpu"), checkpoint=ckpt)  # 2 epochs: epoch 1's state uploaded
    assert tracker.run_tags(first)["cnnbench.checkpoint.epoch"] == "1"
    assert ckpt.on_saved.seconds > 0

    shutil.rmtree(machine_a.dir)  # "machine B": no local file; the uploaded one is found, checked, used
    second = _tiny_run(tracker, exp_id, "fp-a")
    ckpt_b, resumed = machine_a.open("fp-a", second)
    assert resumed["cnnbench.resumed_from"] == f"runs:/{first}/checkpoint/state-1.pt (epoch 1)"
    assert ckpt_b.path.exists()

    # another run's state under this run's name (a copied file whose tags were copied too): refused on load
    other = _tiny_run(tracker, exp_id, "fp-b")
    tracker.log_file(other, ckpt_b.path, "checkpoint")
    tracker.log(other, tags={k: v for k, v in tracker.run_tags(first).items() if k.startswith("cnnbench.checkpoint.")}
                | {"cnnbench.checkpoint.slot": f"checkpoint/{ckpt_b.path.name}"})
    stolen, _ = machine_a.open("fp-b", _tiny_run(tracker, exp_id, "fp-b"))
    with pytest.raises(CheckpointError, match=r"refused: it was saved by run fp-a, not by this one \(fp-b\)"):
        train(exp, 0, split, torch.device("cpu"), checkpoint=stolen)

    # the uploaded file changed after its SHA-256 was recorded: refused before it is loaded
    ckpt_b.path.unlink()
    [uploaded] = Path("mlruns").rglob(f"{first}/artifacts/checkpoint/state-1.pt")
    data = bytearray(uploaded.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one weight's bits flipped
    uploaded.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"state-1\.pt: refused: its SHA-256 is not the one recorded"):
        machine_a.open("fp-a", _tiny_run(tracker, exp_id, "fp-a"))

    machine_a.finished("fp-a")  # the result is recorded: every copy and its tags go
    assert not [t for t in tracker.run_tags(first) if t.startswith("cnnbench.checkpoint.")]
    assert not list(Path("mlruns").rglob(f"{first}/artifacts/checkpoint/*.pt"))


# ───────────────────────────── a real authenticated server, real workers ─────────────────────────────

def _suite(path: Path, name: str, seeds: int, epochs: int, train_size: int = 512) -> Path:
    text = (TINY_SUITE.replace("name: tiny", f"name: {name}").replace("seeds: 2", f"seeds: {seeds}")
            .replace("epochs: 2", f"epochs: {epochs}, threads: 1").replace("train_size: 512", f"train_size: {train_size}")
            .replace("  device: cpu\n", "  device: cpu\n  inference: {enabled: false}\n"))
    return write_suite(path, text)


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """``mlflow server --app-name basic-auth`` as the README's recipe starts it, with a user ``worker``
    (password ``URI_SECRET``) and a user ``reader`` (READ on everything, MLflow's default permission)."""
    root = tmp_path_factory.mktemp("auth")
    (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{root}/users.db\n"
                                   "admin_username = admin\nauth_cache_ttl_seconds = 60\n")
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"), "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_SECRET,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": "a-long-random-key-for-csrf"}
    proc, url = start_mlflow_server(f"sqlite:///{root}/mlflow.db", root / "artifacts", None, "--app-name", "basic-auth",
                                    env=env)
    for user, password in (("worker", URI_SECRET), ("reader", ENV_SECRET)):
        requests.post(f"{url}/api/2.0/mlflow/users/create", json={"username": user, "password": password},
                      auth=("admin", ADMIN_SECRET), timeout=30).raise_for_status()
    yield url, root
    stop(proc)


def _cnnbench(args: list, cwd: Path, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cnnbench", "run", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _SPAWNED.append(proc)
    return proc


def _pg_dump(url: str) -> str:
    user_host, db = url.rsplit("/", 1)
    return subprocess.run(["pg_dump", "--data-only", "-h", "127.0.0.1", "-U", "postgres", db], capture_output=True,
                          text=True, check=True).stdout


@pytest.mark.slow
def test_workers_with_credentials_run_a_suite_and_no_secret_is_written_anywhere(new_database, auth_server,  # noqa: F811
                                                                                workdir):
    """Two workers of one queue: one gives the tracking server its credentials in the URI, the other in
    MLflow's environment variables (the README's way); the queue's PostgreSQL URL carries a password.
    Then the MLflow store, its artifacts, the queue's database, both reports, stdout and stderr are searched."""
    url, root = auth_server
    storage = new_database().replace("postgres@", f"postgres:{PG_SECRET}@")  # trust auth: accepted, and carried
    host = url.removeprefix("http://")
    for d in ("a", "b"):
        (workdir / d).mkdir()
    suite_a, suite_b = (_suite(workdir / d / "team.yaml", "team", seeds=2, epochs=2) for d in ("a", "b"))
    in_uri = _cnnbench([suite_a, "-q", "--storage", storage, "--tracking-uri", f"http://worker:{URI_SECRET}@{host}",
                        *FAST_HEARTBEAT], workdir / "a", ENV)
    in_env = _cnnbench([suite_b, "-q", "--storage", storage, "--tracking-uri", url, *FAST_HEARTBEAT], workdir / "b",
                       ENV | {"MLFLOW_TRACKING_USERNAME": "worker", "MLFLOW_TRACKING_PASSWORD": URI_SECRET,
                              "PGPASSWORD": ENV_SECRET})
    outs = [p.communicate(timeout=600) for p in (in_uri, in_env)]
    assert [in_uri.returncode, in_env.returncode] == [0, 0], outs
    assert "tracking http://worker:***@" in outs[0][0]

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")  # the server's own store, read directly
    exp = client.get_experiment_by_name("team")
    [parent] = client.search_runs([exp.experiment_id], "tags.`cnnbench.role` = 'suite'")
    assert parent.data.params["optuna_storage"].startswith("postgresql://postgres:***@127.0.0.1")
    assert len(client.search_runs([exp.experiment_id], "tags.`cnnbench.role` = 'run'")) == 4

    written = {"queue database": _pg_dump(storage)} | {  # the store, with its write-ahead log if it has one
        f.name: f.read_bytes().decode("latin-1") for f in root.glob("mlflow.db*")}
    for place in [root / "artifacts", workdir / "a", workdir / "b"]:  # artifacts, reports, checkpoints, anything
        for f in place.rglob("*"):
            if f.is_file() and f.suffix != ".yaml":
                written[str(f)] = f.read_bytes().decode("latin-1")
    written |= {"worker a stdout+stderr": "".join(outs[0]), "worker b stdout+stderr": "".join(outs[1])}
    assert any(f.endswith("team.md") for f in written)  # the reports were written, and searched
    leaks = {where: s for where, text in written.items() for s in SECRETS if s in text}
    assert not leaks


@pytest.mark.slow
def test_clients_without_credentials_or_permission_are_refused_with_the_reason_and_no_secret(auth_server, workdir):
    url, _ = auth_server
    suite = _suite(workdir / "refused.yaml", "refused", seeds=1, epochs=1)
    no_creds = subprocess.run([sys.executable, "-m", "cnnbench", "run", suite, "-q", "--tracking-uri", url],
                              cwd=workdir, env=ENV, capture_output=True, text=True, timeout=120)
    wrong = subprocess.run([sys.executable, "-m", "cnnbench", "run", suite, "-q", "--tracking-uri", url], cwd=workdir,
                           env=ENV | {"MLFLOW_TRACKING_USERNAME": "worker", "MLFLOW_TRACKING_PASSWORD": "Wr0ng-Passw0rd"},
                           capture_output=True, text=True, timeout=120)
    for result in (no_creds, wrong):
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"the MLflow tracking server at {url} refused cnnbench's request with 401 Unauthorized" in result.stderr
        assert "MLFLOW_TRACKING_USERNAME" in result.stderr and "Traceback" not in result.stderr
    assert "Wr0ng-Passw0rd" not in wrong.stdout + wrong.stderr

    # the worker creates the experiment; a reader may look at it but not write to it: 403, exit 3
    host = url.removeprefix("http://")
    made = subprocess.run([sys.executable, "-m", "cnnbench", "run", suite, "-q", "--no-report", "--tracking-uri",
                           f"http://worker:{URI_SECRET}@{host}"], cwd=workdir, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert made.returncode == 0, made.stdout + made.stderr
    reader = subprocess.run([sys.executable, "-m", "cnnbench", "run", suite, "-q", "--rerun", "--tracking-uri", url],
                            cwd=workdir, env=ENV | {"MLFLOW_TRACKING_USERNAME": "reader",
                                                    "MLFLOW_TRACKING_PASSWORD": ENV_SECRET},
                            capture_output=True, text=True, timeout=300)
    assert reader.returncode == 3, reader.stdout + reader.stderr
    assert "refused cnnbench's request with 403 Forbidden" in reader.stderr
    assert "once the credentials or the permission are fixed" in reader.stderr and "checkpoint" not in reader.stderr
    assert ENV_SECRET not in reader.stdout + reader.stderr and URI_SECRET not in made.stdout + made.stderr


@pytest.mark.slow
def test_a_run_killed_on_machine_a_finishes_on_machine_b_from_its_travelled_checkpoint(new_database, mlflow_server,  # noqa: F811
                                                                                       workdir):
    """Machine A (its own directory) trains with --checkpoints mlflow and is SIGKILLed after its state of
    epoch ≥ 2 was uploaded; machine B (another directory, no local checkpoint) picks the re-queued run up,
    resumes from the uploaded state and ends with the metrics of an uninterrupted run (machine C)."""
    storage, epochs = new_database(), 12
    machines = {m: workdir / m for m in ("a", "b", "c")}
    for d in machines.values():
        d.mkdir()
    suites = {m: _suite(d / "travel.yaml", "travel", seeds=1, epochs=epochs, train_size=2048)
              for m, d in machines.items()}
    for s in suites.values():  # one variant: one run to follow
        s.write_text(s.read_text().replace("  adam: {optimizer: {name: adam, lr: 0.001}}\n", ""))
    common = ["-q", "--no-report", "--storage", storage, "--tracking-uri", mlflow_server, "--checkpoints", "mlflow",
              "--checkpoint-every", "0", *FAST_HEARTBEAT]
    a = _cnnbench([suites["a"], *common], machines["a"], ENV)
    client = MlflowClient(mlflow_server)
    deadline, run = time.monotonic() + 180, None
    while time.monotonic() < deadline and a.poll() is None:
        exp = client.get_experiment_by_name("travel")
        runs = client.search_runs([exp.experiment_id], "tags.`cnnbench.role` = 'run'") if exp else []
        if runs and int(runs[0].data.tags.get("cnnbench.checkpoint.epoch", 0)) >= 2:
            run = runs[0]
            break
        time.sleep(0.05)
    assert run is not None, "machine A never uploaded the state of epoch 2"
    a.send_signal(signal.SIGKILL)
    a.communicate(timeout=60)
    uploaded = int(client.get_run(run.info.run_id).data.tags["cnnbench.checkpoint.epoch"])
    assert 2 <= uploaded < epochs

    b = _cnnbench([suites["b"], *common], machines["b"], ENV)
    out_b = b.communicate(timeout=600)
    assert b.returncode == 0, out_b
    c = subprocess.run([sys.executable, "-m", "cnnbench", "run", suites["c"], "-q", "--no-report"], cwd=machines["c"],
                       env=ENV, capture_output=True, text=True, timeout=600)  # uninterrupted, its own SQLite store
    assert c.returncode == 0, c.stdout + c.stderr

    exp = client.get_experiment_by_name("travel")
    [done] = client.search_runs([exp.experiment_id], "tags.`cnnbench.role` = 'run' and attributes.status = 'FINISHED'")
    assert done.data.tags["cnnbench.resumed_from"].startswith(f"runs:/{run.info.run_id}/checkpoint/state-")
    assert done.data.metrics["resumed_from_epoch"] >= uploaded  # A may have uploaded once more before it died
    assert done.data.metrics["checkpoint_upload_s"] > 0
    assert not list((machines["b"] / "checkpoints").rglob("*.pt"))  # B's local copy went with the result
    ref_client = MlflowClient(f"sqlite:///{machines['c'] / 'mlflow.db'}")
    [ref] = ref_client.search_runs([ref_client.get_experiment_by_name("travel").experiment_id],
                                   "tags.`cnnbench.role` = 'run'")
    for key in ("test_accuracy", "test_loss", "val_loss", "train_loss", "f1_macro"):
        assert done.data.metrics[key] == ref.data.metrics[key], key
    killed = client.get_run(run.info.run_id)  # the uploaded copies and their tags are gone
    assert not [t for t in killed.data.tags if t.startswith("cnnbench.checkpoint.")]
    assert not client.list_artifacts(run.info.run_id, "checkpoint")


# ───────────────────────────── PostgreSQL with passwords, for real ─────────────────────────────

ROLE_SECRET = "R0le-S3cret-4471"


@pytest.fixture(scope="module")
def password_postgres():
    """A private PostgreSQL server that checks passwords (scram-sha-256 for every connection; the machine's
    shared one trusts 127.0.0.1), with a role ``cnnbench`` of its own (not a superuser) owning database
    ``queue``; yields its port. Started as the ``postgres`` user when the tests run as root (initdb refuses root)."""
    bindir = Path(subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True).stdout.strip() or "/nonexistent")
    if not (bindir / "initdb").exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"PostgreSQL's initdb not found in {bindir}")
    root = Path(tempfile.mkdtemp(prefix="cnnbench-pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    (root / "superpw").write_text("Sup3r-only-for-setup\n")
    if as_postgres:
        shutil.chown(root, "postgres")
        shutil.chown(root / "superpw", "postgres")
    port = _free_port()

    def pg(*args):
        return subprocess.run([*as_postgres, *args], capture_output=True, text=True, check=True, timeout=120)

    pg(str(bindir / "initdb"), "-D", str(root / "data"), "-U", "postgres", "--auth=scram-sha-256",
       f"--pwfile={root / 'superpw'}")
    pg(str(bindir / "pg_ctl"), "-D", str(root / "data"), "-l", str(root / "log"), "-w", "start", "-o",
       f"-p {port} -k {root} -c listen_addresses=127.0.0.1")
    admin = {**os.environ, "PGPASSWORD": "Sup3r-only-for-setup"}
    for sql in (f"CREATE ROLE cnnbench LOGIN PASSWORD '{ROLE_SECRET}'", "CREATE DATABASE queue OWNER cnnbench"):
        subprocess.run(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres", "-c", sql],
                       env=admin, capture_output=True, check=True, timeout=60)
    yield port
    subprocess.run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "immediate", "stop"],
                   capture_output=True, timeout=60)
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.slow
def test_workers_reach_postgresql_as_their_own_role_with_the_password_in_pgpass_only(password_postgres, workdir):
    """The README's recipe: role ``cnnbench`` (no superuser), its password in ``~/.pgpass`` and nowhere on the
    command line; without it the server refuses and cnnbench says so, exit 2, before anything runs."""
    storage = f"postgresql://cnnbench@127.0.0.1:{password_postgres}/queue"
    suite = _suite(workdir / "roles.yaml", "roles", seeds=1, epochs=1)
    home = workdir / "home"
    home.mkdir()
    env = {k: v for k, v in ENV.items() if k != "PGPASSWORD"} | {"HOME": str(home)}
    refused = subprocess.run([sys.executable, "-m", "cnnbench", "run", suite, "-q", "--no-report", "--storage", storage,
                              *FAST_HEARTBEAT], cwd=workdir, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "cannot open the Optuna storage" in refused.stderr and "password" in refused.stderr
    assert "Traceback" not in refused.stderr

    (home / ".pgpass").write_text(f"127.0.0.1:{password_postgres}:*:cnnbench:{ROLE_SECRET}\n")
    (home / ".pgpass").chmod(0o600)  # libpq ignores a .pgpass others can read
    ran = subprocess.run([sys.executable, "-m", "cnnbench", "run", suite, "-q", "--storage", storage, *FAST_HEARTBEAT],
                         cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "roles: 2 finished" in ran.stdout
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")  # absolute: MLflow caches stores per URI string
    [parent] = client.search_runs([client.get_experiment_by_name("roles").experiment_id], "tags.`cnnbench.role` = 'suite'")
    assert parent.data.params["optuna_storage"] == storage  # nothing to mask: the password never was in it


@pytest.mark.slow
def test_the_ui_gets_a_store_url_with_a_password_outside_its_command_line(new_database, workdir):  # noqa: F811
    """`cnnbench ui --tracking-uri postgresql://…:PW@…`: the UI serves that store, the password is masked in
    what cnnbench prints and absent from the process's command line (which any user can read in `ps`)."""
    store = new_database().replace("postgres@", f"postgres:{PG_SECRET}@")
    MlflowClient(store).create_experiment("visible")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "cnnbench", "ui", "--tracking-uri", store, "--port", str(port)],
                            cwd=workdir, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                found = requests.post(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                      json={"max_results": 10}, timeout=2)
                if found.ok:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        else:
            pytest.fail("cnnbench ui did not answer within 120 s")
        assert "visible" in [e["name"] for e in found.json()["experiments"]]
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # the same process: execve replaced it
        assert b"mlflow" in cmdline and PG_SECRET.encode() not in cmdline
    finally:
        stop(proc)
    out = proc.stdout.read()
    assert "postgres:***@127.0.0.1" in out and PG_SECRET not in out
