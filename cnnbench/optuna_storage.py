"""Optuna storages: where searches and shared queues keep their studies.

A journal file beside the SQLite MLflow store by default (``optuna.journal``: ~3.5 ms of storage work
per trial against ~32 ms on Optuna's SQLite storage, ``benchmarks/search_pruning.py``; no server; its
file lock makes it safe for several processes on one machine), or any Optuna RDB URL. An RDB URL makes
a process one worker of a shared queue (:mod:`cnnbench.workqueue`): its storage records heartbeats,
and :class:`StaleTrials` re-queues the work of a worker that stopped sending them.

Heartbeats: a worker records one every ``heartbeat_interval`` seconds for the trial it runs. A trial
whose heartbeat is older than ``grace_period`` is failed by the next worker that looks
(``optuna.storages.fail_stale_trials``); :class:`StaleTrials` then ends that worker's MLflow run as
FAILED and Optuna's ``RetryHeartbeatStaleTrialCallback`` enqueues a copy that another worker pops.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from cnnbench import redact
from cnnbench.sqlite_store import sqlite_path
from cnnbench.tracking import open_racing_schema

JOURNAL_NAME = "optuna.journal"


class StorageUnavailable(RuntimeError):
    """The Optuna storage cannot be opened."""


def default_storage(tracking_uri: str) -> str:
    """The journal file beside a SQLite MLflow store, else ``./optuna.journal``."""
    db = sqlite_path(tracking_uri)
    return str((db.parent if db is not None else Path.cwd()) / JOURNAL_NAME)


def open_storage(url: str):
    """An Optuna storage: an RDB URL (``sqlite:///…``, ``postgresql://…``) or a journal file path."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        if "://" in url:
            return optuna.storages.RDBStorage(url)
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(url))
    except Exception as e:  # noqa: BLE001 - SQLAlchemy/OS errors: all mean "cannot open it"
        raise StorageUnavailable(f"cannot open the Optuna storage {redact.text(url)}: {type(e).__name__}: "
                                 f"{redact.text(str(e))}") from None


@dataclass(frozen=True)
class QueueSettings:
    """How a shared queue behaves; the CLI fills it from ``--storage``, ``--heartbeat`` and ``--grace-period``."""

    url: str
    heartbeat_interval: int = 10  # seconds between a worker's heartbeats
    grace_period: int = 60  # seconds without a heartbeat before a trial is failed and re-queued
    max_retry: int = 3  # re-queues of one (variant, seed) after its worker died
    poll_s: float = 2.0  # how often an idle worker looks again while others still run


def is_shared(storage_url: str | None) -> bool:
    """An Optuna RDB URL (postgresql://, mysql://, sqlite:///): run as one of possibly many workers."""
    return storage_url is not None and "://" in storage_url


class StaleTrials:
    """``heartbeat_stale_trial_callback``: re-queue the stale trial (Optuna's own callback), then end
    the MLflow run its dead worker left RUNNING as FAILED, with the reason."""

    def __init__(self, max_retry: int, grace_period: int):
        import optuna
        from optuna.storages import RetryHeartbeatStaleTrialCallback

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
        self.max_retry, self.grace_period = max_retry, grace_period
        self.tracker = None  # set by the runner once the tracking store is open

    def __call__(self, study, trial) -> None:
        self.retry(study, trial)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and self.tracker is not None:
            worker = trial.user_attrs.get("worker", "its worker")
            retried = len(trial.system_attrs.get("retry_history", [])) < self.max_retry
            reason = (f"{worker} stopped sending heartbeats (grace period {self.grace_period} s); "
                      + ("re-queued for another worker" if retried else "not re-queued: retries exhausted"))
            self.tracker.log(run_id, tags={"cnnbench.status": "failed", "cnnbench.reason": reason})
            self.tracker.end_run(run_id, "FAILED")


def open_shared_storage(settings: QueueSettings):
    """An RDBStorage with heartbeats and :class:`StaleTrials` (its ``tracker`` is set later)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    callback = StaleTrials(settings.max_retry, settings.grace_period)

    def open_store():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(settings.url, heartbeat_interval=settings.heartbeat_interval,
                                              grace_period=settings.grace_period,
                                              heartbeat_stale_trial_callback=callback)

    try:
        return open_racing_schema(open_store)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy errors: all mean "cannot open it"
        raise StorageUnavailable(f"cannot open the Optuna storage {redact.text(settings.url)}: {type(e).__name__}: "
                                 f"{redact.text(str(e))}") from None


def stale_callback(storage) -> StaleTrials | None:
    cb = getattr(storage, "heartbeat_stale_trial_callback", None)
    return cb if isinstance(cb, StaleTrials) else None


def heartbeat_enabled(storage) -> bool:
    from optuna.storages._heartbeat import is_heartbeat_enabled

    return is_heartbeat_enabled(storage)


def heartbeat(study, trial):
    """A context manager that records ``trial``'s heartbeat in a thread while the block runs
    (Optuna does this inside ``Study.optimize`` only; cnnbench drives trials with ask/tell)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, study._storage)


def fail_stale(study) -> None:
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def ask(study):
    """``study.ask()`` without the warning that heartbeats are meant for ``optimize``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return study.ask()


def requeue(study, trial, reason: str) -> None:
    """End a popped trial as FAIL (``reason`` in its attrs) and put a copy at the back of the queue."""
    import optuna
    from optuna.trial import TrialState

    attrs = {k: v for k, v in trial.user_attrs.items() if k not in ("mlflow_run_id", "worker", "status")}
    trial.set_user_attr("requeued", reason)
    study.tell(trial, state=TrialState.FAIL)
    study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, user_attrs=attrs))
