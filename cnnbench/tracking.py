"""The only module that talks to MLflow.

Writes: one parent run per ``cnnbench run`` and one nested child per (variant, seed); metrics are
buffered and sent with ``log_batch`` (1,000 single ``log_metric`` calls on SQLite cost ~3 s here),
flushed every ``FLUSH_EVERY_S`` seconds so long runs show up live, and always before a run ends —
also when it is interrupted. Reads: the suite's runs as a pandas DataFrame and metric histories,
for resume and for reports. Every call is timed so a suite can report its tracking overhead.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import socket
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from cnnbench import redact
from cnnbench.sqlite_store import absolute_uri, write_ahead

DEFAULT_URI = "sqlite:///mlflow.db"
FLUSH_EVERY_S = 10.0
ROLE_SUITE, ROLE_RUN, ROLE_SEARCH, ROLE_TRIAL = "suite", "run", "search", "trial"
ROLE_TIMING, TIMING_ARTIFACT = "timing", "timing.json"  # the timing protocol's run (cnnbench.sidebyside)
DONE_STATUSES = ("finished", "diverged")  # results worth keeping; failed/skipped/killed are redone
# MLflow 3's UI opens an experiment in the view its kind names; cnnbench's are model training, not GenAI
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
NOTE_TAG = "mlflow.note.content"  # an experiment's description in the UI (markdown)


def experiment_note(question: str, answer: str | None = None, where: str = "") -> str:
    """An experiment's description: the suite's question, then its latest answer and where the report is."""
    return f"**Question.** {question}" + (f"\n\n**Answer.** {answer}" if answer is not None else "") + \
        (f"\n\n{where}" if where else "")


def worker_id() -> str:
    """host:pid of this process: the tag cnnbench.worker on every run it starts."""
    return f"{socket.gethostname()}:{os.getpid()}"


def resolve_uri(cli_uri: str | None = None) -> str:
    """``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else MLflow's own default ``sqlite:///mlflow.db``."""
    return cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached or opened."""


class TrackingLost(RuntimeError):
    """The tracking store stopped answering mid-suite. cnnbench fails loudly rather than buffering:
    the run in flight keeps its checkpoint (and, with a shared queue, goes back to the queue), the
    suite stops with exit 3, and the next ``cnnbench run`` redoes what was not recorded."""


def _caused_by(exc: BaseException | None, types: tuple) -> bool:
    """Whether ``exc`` or anything in its chain of causes is one of ``types``."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, types):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means the store cannot be reached, rather than a refused request."""
    import http.client

    import requests
    import urllib3
    from sqlalchemy.exc import OperationalError

    # a server stopped mid-response: ChunkedEncodingError / ProtocolError / IncompleteRead, not ConnectionError
    return _caused_by(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                            urllib3.exceptions.ProtocolError, http.client.HTTPException, OperationalError,
                            ConnectionError))


def open_racing_schema(open_store, attempts: int = 6):
    """``open_store()``, retried with jitter while it fails because another process created the same
    table first: N workers starting on a fresh PostgreSQL database all create Optuna's or MLflow's
    tables at once (UniqueViolation on ``alembic_version``, seen with 2 and 4 workers)."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            return open_store()
        except Exception as e:
            if attempt == attempts - 1 or not _caused_by(e, (IntegrityError, ProgrammingError)):
                raise
            time.sleep(0.2 + random.random())


def _check_server(uri: str, shown: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any training, when a tracking server does not answer its health check
    (``shown``: the URI with its credentials masked, for the message)."""
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout_s).raise_for_status()
    except requests.RequestException as e:
        raise TrackingUnavailable(
            f"the MLflow tracking server at {shown} does not answer ({shown.rstrip('/')}/health: {type(e).__name__}); "
            f"start it (mlflow server --backend-store-uri … --port …) or check --tracking-uri / MLFLOW_TRACKING_URI"
        ) from None


_AUTH_HELP = {
    401: "401 Unauthorized: it did not accept the credentials sent (none, or a wrong user name or password). Give "
         "them as MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or [mlflow] mlflow_tracking_username / "
         "mlflow_tracking_password in ~/.mlflow/credentials), not on the command line (README: Scale out)",
    403: "403 Forbidden: the user it logged in as may not do this. An admin grants EDIT on the suite's experiment, or "
         "every worker logs in as the user that created it (README: Scale out)",
}


def _refusal(exc: BaseException, shown: str) -> str | None:
    """The message for a tracking server that refused the credentials (401) or the request (403), else None."""
    from mlflow.exceptions import MlflowException

    while exc is not None and not isinstance(exc, MlflowException):
        exc = exc.__cause__ or exc.__context__
    if exc is None:
        return None
    status = exc.get_http_status_code()
    return f"the MLflow tracking server at {shown} refused cnnbench's request with {_AUTH_HELP[status]}" \
        if status in _AUTH_HELP else None


class TrackingRefused(TrackingLost):
    """The tracking server refused a request mid-suite (401/403): handled as a lost store — a run in flight goes
    back to the queue, the suite stops with exit 3 — with the reason and the fix in the message."""


class Tracker:
    """A thin, timed wrapper around ``MlflowClient`` for one tracking URI."""

    def __init__(self, uri: str):
        self._uri = uri  # as the user gave it, credentials included: only for connecting
        self.uri = redact.text(uri)  # what is shown (messages, reports): credentials masked
        self.seconds = 0.0  # time spent inside MLflow calls
        self._artifact_uris: dict[str, str] = {}  # run id → artifact URI, for the runs this process started
        t0 = time.perf_counter()
        # MLflow prints "View run … at <tracking URI>" as runs end: cnnbench shows its own pointer to the UI
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # cnnbench draws its own progress
        from mlflow import MlflowClient

        for name in ("mlflow", "alembic"):  # after the import: mlflow configures its loggers on import
            logging.getLogger(name).setLevel(logging.WARNING)

        if uri.startswith(("http://", "https://")):
            _check_server(uri, self.uri)  # MLflow's own client retries for minutes before giving up
        write_ahead(uri)

        def open_store():
            client = MlflowClient(tracking_uri=absolute_uri(uri))  # a database store creates its tables here
            client.search_experiments(max_results=1)  # opens the store; fails fast if unreachable
            return client

        try:
            self.client = open_racing_schema(open_store)
        except Exception as e:  # noqa: BLE001 - MLflow raises many kinds here; all mean the same to the user
            raise TrackingUnavailable(_refusal(e, self.uri) or f"cannot open the MLflow tracking store at {self.uri}: "
                                      f"{type(e).__name__}: {redact.text(str(e))[:500]}") from None
        self.seconds += time.perf_counter() - t0

    def _timed(self, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if (refused := _refusal(e, self.uri)) is not None:
                raise TrackingRefused(refused) from None
            if _connection_error(e):
                raise TrackingLost(f"the MLflow tracking store at {self.uri} stopped answering ({type(e).__name__}: "
                                   f"{redact.text(str(e))[:300]})") from e
            raise
        finally:
            self.seconds += time.perf_counter() - t0

    # ── experiments and runs ────────────────────────────────────────────────

    def experiment_id(self, name: str, create: bool = True, question: str | None = None) -> str | None:
        """Get or create the experiment (safe when several processes create it at once), marked as a
        model-training experiment; the suite's ``question`` becomes its note when it has none yet."""
        from mlflow.exceptions import MlflowException

        exp = self._timed(self.client.get_experiment_by_name, name)
        if exp is not None:
            if create:  # experiments created before cnnbench marked them, or by hand
                missing = {k: v for k, v in EXPERIMENT_KIND.items() if exp.tags.get(k) != v}
                if question and not exp.tags.get(NOTE_TAG):
                    missing[NOTE_TAG] = experiment_note(question)
                for key, value in missing.items():
                    self._timed(self.client.set_experiment_tag, exp.experiment_id, key, redact.text(value))
            return exp.experiment_id
        if not create:
            return None
        try:
            return self._timed(self.client.create_experiment, name, tags=EXPERIMENT_KIND | (
                {NOTE_TAG: redact.text(experiment_note(question))} if question else {}))
        except MlflowException:
            exp = self._timed(self.client.get_experiment_by_name, name)
            if exp is None:
                raise
            return exp.experiment_id

    def start_run(self, experiment_id: str, name: str, tags: dict[str, str], parent_id: str | None = None) -> str:
        tags = redact.value(dict(tags))
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self._timed(self.client.create_run, experiment_id, tags=tags, run_name=name)
        self._artifact_uris[run.info.run_id] = run.info.artifact_uri
        return run.info.run_id

    def log(self, run_id: str, metrics: dict[str, float] | None = None, params: dict[str, Any] | None = None,
            tags: dict[str, str] | None = None, step: int = 0) -> None:
        """One batch of metrics (at ``step``), params and tags."""
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        m = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
        p = [Param(k, _param_str(v)) for k, v in (params or {}).items()]
        t = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        self.log_entities(run_id, m, p, t)

    def log_entities(self, run_id: str, metrics: list, params: list = (), tags: list = ()) -> None:
        """``log_batch`` in as few calls as MLflow's caps allow (≤ 100 params+tags, ≤ 1,000 entities a call);
        secrets in param and tag values are masked."""
        from mlflow.entities import Param, RunTag

        values = redact.value([x.value for x in (*params, *tags)])  # one lookup of the secrets for the batch
        params = [Param(p.key, v) for p, v in zip(params, values)]
        tags = [RunTag(t.key, v) for t, v in zip(tags, values[len(params):])]
        keyed = [("param", x) for x in params] + [("tag", x) for x in tags]
        calls = max(math.ceil(len(metrics) / 900), math.ceil(len(keyed) / 100), 1)
        for i in range(calls):
            part = keyed[i * 100 : (i + 1) * 100]
            self._timed(
                self.client.log_batch,
                run_id,
                metrics=metrics[i * 900 : (i + 1) * 900],
                params=[x for kind, x in part if kind == "param"],
                tags=[x for kind, x in part if kind == "tag"],
            )

    def log_artifacts(self, run_id: str, files: dict[str, str | bytes | dict | list]) -> None:
        """Write ``{relative name: content}`` to a temp dir and upload it in one call (JSON for dicts/lists);
        secrets in text are masked (bytes — plots, weights — go as they are)."""
        known = redact.known_secrets()
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = Path(tmp) / name
                path.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, (dict, list)):
                    path.write_text(json.dumps(redact.value(content, known), indent=2, sort_keys=True))
                elif isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(redact.text(content, known))
            if (uri := self._artifact_uris.get(run_id)) is None:  # a run this process did not start
                self._timed(self.client.log_artifacts, run_id, tmp)
            else:  # MLflow's client would read the whole run back (~10 ms on SQLite) to find where its files go
                from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

                self._timed(lambda: get_artifact_repository(uri, tracking_uri=absolute_uri(self._uri)).log_artifacts(tmp))

    def publish_report(self, experiment_id: str, run_id: str | None, description: str, files: dict[str, bytes]) -> None:
        """The rendered report beside the runs: the experiment's description (:func:`experiment_note`) and
        the report's ``files`` (name → content) as artifacts ``report/…`` of the suite run ``run_id``."""
        self._timed(self.client.set_experiment_tag, experiment_id, NOTE_TAG, redact.text(description))
        if run_id is not None:
            self.log_artifacts(run_id, {f"report/{name}": content for name, content in files.items()})

    def log_file(self, run_id: str, local_path: str | Path, artifact_dir: str) -> None:
        """Upload one file as it is (a checkpoint: binary, not masked) into ``artifact_dir`` of the run."""
        self._timed(self.client.log_artifact, run_id, str(local_path), artifact_dir)

    def delete_tags(self, run_id: str, keys: Iterable[str]) -> None:
        for key in keys:
            self._timed(self.client.delete_tag, run_id, key)

    def delete_artifacts(self, run_id: str, artifact_dir: str) -> bool:
        """Remove ``artifact_dir`` of a run where its artifact store can delete (local paths, a server that
        proxies artifacts); False where it cannot (the files stay)."""
        from mlflow.exceptions import MlflowException
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        run = self._timed(self.client.get_run, run_id)
        try:
            repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=absolute_uri(self._uri))
            self._timed(repo.delete_artifacts, artifact_dir)
        except (MlflowException, NotImplementedError, OSError):
            return False
        return True

    def runs_of(self, experiment_id: str, fingerprint: str) -> list:
        """Every attempt (any status) of the run with ``fingerprint``."""
        return self.search(experiment_id, f"tags.`cnnbench.fingerprint` = '{fingerprint}' and "
                                          f"tags.`cnnbench.role` = '{ROLE_RUN}'")

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        """``status``: FINISHED, FAILED or KILLED."""
        self._timed(self.client.set_terminated, run_id, status)
        self._artifact_uris.pop(run_id, None)

    # ── queries ─────────────────────────────────────────────────────────────

    def search(self, experiment_id: str, filter_string: str = "") -> list:
        runs, token = [], None
        while True:
            page = self._timed(self.client.search_runs, [experiment_id], filter_string, max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def done_runs(self, experiment_id: str, suite: str, fingerprint: str | None = None) -> dict[str, str]:
        """fingerprint → run id of child runs that finished (or diverged) and ended cleanly in MLflow
        (only those of ``fingerprint`` when given)."""
        only = f" and tags.`cnnbench.fingerprint` = '{fingerprint}'" if fingerprint else ""
        runs = self.search(
            experiment_id,
            f"tags.`cnnbench.suite` = '{suite}' and tags.`cnnbench.role` = '{ROLE_RUN}' and attributes.status = 'FINISHED'"
            + only,
        )
        out = {}
        for r in sorted(runs, key=lambda r: r.info.start_time):
            if r.data.tags.get("cnnbench.status") in DONE_STATUSES:
                out[r.data.tags["cnnbench.fingerprint"]] = r.info.run_id
        return out

    def run_tags(self, run_id: str) -> dict[str, str]:
        return self._timed(self.client.get_run, run_id).data.tags

    def run_status(self, run_id: str) -> str:
        """RUNNING, FINISHED, FAILED or KILLED."""
        return self._timed(self.client.get_run, run_id).info.status

    def end_abandoned(self, experiment_id: str, fingerprint: str, reason: str) -> int:
        """End as FAILED the earlier attempts of a run still marked RUNNING: their process died (SIGKILL,
        a lost tracking server) before it could end them. Called when the same run starts again — by
        then no live process holds it (the SQLite lock, or the queue trial this worker popped)."""
        runs = self.search(experiment_id, f"tags.`cnnbench.fingerprint` = '{fingerprint}' and "
                                          f"tags.`cnnbench.role` = '{ROLE_RUN}' and attributes.status = 'RUNNING'")
        for r in runs:
            self.log(r.info.run_id, tags={"cnnbench.status": "failed", "cnnbench.reason": reason})
            self.end_run(r.info.run_id, "FAILED")
        return len(runs)

    def running_fingerprints(self, experiment_id: str, suite: str) -> set[str]:
        """Fingerprints of the suite's runs still marked RUNNING: at the start of a single-process suite, those
        a dead process left (:meth:`end_abandoned` ends each as its run starts again) — one query per suite
        instead of one per run."""
        runs = self.search(experiment_id, f"tags.`cnnbench.suite` = '{suite}' and tags.`cnnbench.role` = "
                                          f"'{ROLE_RUN}' and attributes.status = 'RUNNING'")
        return {r.data.tags.get("cnnbench.fingerprint") for r in runs} - {None}

    def runs_frame(self, suite: str) -> pd.DataFrame:
        """Every run of the suite: one row each with ``run_id``, ``status``, ``start_time``, ``role``,
        ``tags.*``, ``params.*`` and final ``metrics.*`` columns. Empty if there is no such experiment."""
        exp_id = self.experiment_id(suite, create=False)
        if exp_id is None:
            return pd.DataFrame()
        rows = []
        for r in self.search(exp_id, f"tags.`cnnbench.suite` = '{suite}'"):
            row = {"run_id": r.info.run_id, "status": r.info.status, "start_time": r.info.start_time,
                   "end_time": r.info.end_time, "run_name": r.info.run_name}
            row.update({f"tags.{k}": v for k, v in r.data.tags.items()})
            row.update({f"params.{k}": v for k, v in r.data.params.items()})
            row.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
            rows.append(row)
        return pd.DataFrame(rows)

    def history(self, run_ids: Iterable[str], keys: Iterable[str]) -> pd.DataFrame:
        """Long table of per-step metric values: run_id, key, step, value."""
        rows = []
        for run_id in run_ids:
            for key in keys:
                for m in self._timed(self.client.get_metric_history, run_id, key):
                    rows.append({"run_id": run_id, "key": key, "step": m.step, "value": m.value})
        return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])

    def has_artifact(self, run_id: str, path: str) -> bool:
        """Whether the run stored an artifact at ``path`` (e.g. ``checkpoint/model.pt``)."""
        folder = path.rsplit("/", 1)[0] if "/" in path else None
        return any(f.path == path for f in self._timed(self.client.list_artifacts, run_id, folder))

    def download_artifact(self, run_id: str, path: str, dst_dir: str) -> str:
        """Download one artifact of a run into ``dst_dir``; returns the local path."""
        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        return self._timed(self.client.download_artifacts, run_id, path, dst_dir)

    def download_uri(self, uri: str, dst_dir: str) -> str:
        """Download an artifact URI (``runs:/<run_id>/<path>``) from this tracking store; returns the local path."""
        import mlflow.artifacts

        Path(dst_dir).mkdir(parents=True, exist_ok=True)
        return self._timed(mlflow.artifacts.download_artifacts, artifact_uri=uri, dst_path=dst_dir,
                           tracking_uri=absolute_uri(self._uri))

    def download_json(self, run_id: str, name: str) -> Any:
        path = self._timed(self.client.download_artifacts, run_id, name, tempfile.mkdtemp())
        return json.loads(Path(path).read_text())


class BufferedRun:
    """Params and per-epoch metrics of one child run, sent in batches (see module docstring): a short
    run costs one ``log_batch`` in all, a long one shows up live every ``FLUSH_EVERY_S``."""

    def __init__(self, tracker: Tracker, run_id: str, params: dict[str, Any] | None = None):
        from mlflow.entities import Param

        self.tracker, self.run_id = tracker, run_id
        self.pending: list = []
        self.pending_params = [Param(k, _param_str(v)) for k, v in (params or {}).items()]
        self.last_flush = time.perf_counter()

    def log_epoch(self, record: dict[str, float]) -> None:
        from mlflow.entities import Metric

        step, now = int(record["epoch"]), int(time.time() * 1000)
        self.pending += [Metric(k, float(v), now, step) for k, v in record.items() if k != "epoch"]
        if time.perf_counter() - self.last_flush >= FLUSH_EVERY_S:
            self.flush()

    def flush(self, metrics: dict[str, float] | None = None, tags: dict[str, str] | None = None, step: int = 0) -> None:
        """Send the pending epoch metrics, plus any final ``metrics``/``tags``, in one batch."""
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        entities = self.pending + [Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if v is not None]
        run_tags = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if entities or run_tags or self.pending_params:
            self.tracker.log_entities(self.run_id, entities, params=self.pending_params, tags=run_tags)
        self.pending, self.pending_params = [], []
        self.last_flush = time.perf_counter()


def _param_str(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
