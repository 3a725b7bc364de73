"""Many workers, one suite: Optuna's RDB storage is the shared work queue (no home-made scheduler).

``cnnbench run suite.yaml --storage postgresql://… --tracking-uri http://mlflow:5000`` started on N
machines makes each process a worker. The (variant, seed) runs of a suite are enqueued once as
fixed trials of a *queue study*; workers pop them (``Study.ask`` pops a WAITING trial atomically on
an RDB), train, and ``tell`` them COMPLETE with the run's status. Search trials use the same storage
and the same heartbeats (:mod:`cnnbench.search`).

Heartbeats: a worker records one every ``heartbeat_interval`` seconds for the trial it runs. A trial
whose heartbeat is older than ``grace_period`` is failed by the next worker that looks
(``optuna.storages.fail_stale_trials``); :class:`StaleTrials` then ends that worker's MLflow run as
FAILED and Optuna's ``RetryHeartbeatStaleTrialCallback`` enqueues a copy that another worker pops.

Rounds ("generations"): one queue study per invocation round, named
``<suite>.queue.<suite hash>.<generation>``. Workers join the newest round while it still holds work;
the first worker to find it drained creates the next round (``create_study`` succeeds for exactly
one of them: the election). That worker — the leader — creates the round's MLflow parent run (and
every variant's search run) and enqueues the runs not already done in MLflow, so the experiment's
parent run exists once however many workers start together. Others wait until it has.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass

from cnnbench.config import RunSpec, Suite

ATTR_PARENT, ATTR_FILLED = "cnnbench.parent_run_id", "cnnbench.filled"


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
        self.seen: list[int] = []  # numbers of the trials this process found stale

    def __call__(self, study, trial) -> None:
        self.retry(study, trial)
        self.seen.append(trial.number)
        run_id = trial.user_attrs.get("mlflow_run_id")
        if run_id and self.tracker is not None:
            worker = trial.user_attrs.get("worker", "its worker")
            retried = len(trial.system_attrs.get("retry_history", [])) < self.max_retry
            reason = (f"{worker} stopped sending heartbeats (grace period {self.grace_period} s); "
                      + ("re-queued for another worker" if retried else "not re-queued: retries exhausted"))
            self.tracker.log(run_id, tags={"cnnbench.status": "failed", "cnnbench.reason": reason})
            self.tracker.end_run(run_id, "FAILED")


def open_storage(settings: QueueSettings):
    """An RDBStorage with heartbeats and :class:`StaleTrials` (its ``tracker`` is set later)."""
    import optuna

    from cnnbench.search import StorageUnavailable

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    callback = StaleTrials(settings.max_retry, settings.grace_period)
    from cnnbench.tracking import open_racing_schema

    def open_store():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(settings.url, heartbeat_interval=settings.heartbeat_interval,
                                              grace_period=settings.grace_period,
                                              heartbeat_stale_trial_callback=callback)

    try:
        return open_racing_schema(open_store)
    except Exception as e:  # noqa: BLE001 - SQLAlchemy errors: all mean "cannot open it"
        raise StorageUnavailable(f"cannot open the Optuna storage {settings.url}: {type(e).__name__}: {e}") from None


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


# ───────────────────────────── the queue of (variant, seed) runs ─────────────────────────────


def suite_hash(suite: Suite) -> str:
    blob = json.dumps(suite.model_dump(mode="json"), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


class RunQueue:
    """One round of a suite's (variant, seed) runs in an Optuna study; see the module docstring."""

    def __init__(self, storage, suite: Suite, settings: QueueSettings):
        self.storage, self.suite, self.settings = storage, suite, settings
        self.prefix = f"{suite.name}.queue.{suite_hash(suite)}."
        self.study = None
        self.leader = False

    # ── joining a round ──

    def join(self) -> bool:
        """Join the newest round that still holds work, else create the next one. True when this
        process created it (it is then the leader: it makes the parent run and fills the queue)."""
        import optuna

        rounds = sorted(s.study_name for s in self.storage.get_all_studies() if s.study_name.startswith(self.prefix))
        if rounds:
            study = optuna.load_study(study_name=rounds[-1], storage=self.storage)
            if not self._drained(study):
                self.study, self.leader = study, False
                return False
        generation = int(rounds[-1].rsplit(".", 1)[1]) + 1 if rounds else 0
        name = f"{self.prefix}{generation:04d}"
        try:
            self.study = optuna.create_study(study_name=name, storage=self.storage)
            self.leader = True
        except optuna.exceptions.DuplicatedStudyError:  # another worker won the election
            self.study, self.leader = optuna.load_study(study_name=name, storage=self.storage), False
        return self.leader

    def _drained(self, study) -> bool:
        from optuna.trial import TrialState

        attrs = study.user_attrs
        if not attrs.get(ATTR_FILLED):
            return False
        return not study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))

    def wait_for_attr(self, key: str):
        """Wait for the leader to publish ``key``; after a grace period without it, None (take over)."""
        deadline = time.monotonic() + self.settings.grace_period
        from cnnbench.runner import raise_if_interrupted

        while time.monotonic() < deadline:
            value = self.study.user_attrs.get(key)
            if value is not None:
                return value
            raise_if_interrupted()
            time.sleep(min(self.settings.poll_s, 0.5))
        return None

    @property
    def parent_run_id(self) -> str | None:
        return self.study.user_attrs.get(ATTR_PARENT)

    def publish_parent(self, run_id: str) -> None:
        self.study.set_user_attr(ATTR_PARENT, run_id)

    # ── filling ──

    def fill(self, todo: list[RunSpec]) -> int:
        """Enqueue the runs of ``todo`` not already queued in this round (idempotent: a worker that
        takes over from a leader that died half-way adds only what is missing). Returns how many."""
        queued = {t.user_attrs.get("plan_key") for t in self.study.get_trials(deepcopy=False)}
        added = 0
        for spec in todo:
            if spec.plan_key in queued:
                continue
            self.study.enqueue_trial({}, user_attrs={"plan_key": spec.plan_key, "variant": spec.variant,
                                                     "seed": spec.seed, "fingerprint": spec.fingerprint})
            added += 1
        self.study.set_user_attr(ATTR_FILLED, True)
        return added

    # ── working ──

    def counts(self) -> dict[str, int]:
        from optuna.trial import TrialState

        trials = [t for t in self.study.get_trials(deepcopy=False) if "plan_key" in t.user_attrs]
        return {"waiting": sum(t.state == TrialState.WAITING for t in trials),
                "running": sum(t.state == TrialState.RUNNING for t in trials)}

    def _fail_unclaimed(self) -> None:
        """A worker that died between popping a trial and its first heartbeat left it RUNNING with no
        heartbeat, which Optuna never calls stale: fail and re-queue it once it is a grace period old."""
        import datetime

        import optuna
        from optuna.trial import TrialState

        now = datetime.datetime.now()
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            age = (now - t.datetime_start).total_seconds() if t.datetime_start else 0
            if "worker" not in t.user_attrs and age > self.settings.grace_period:
                try:
                    if not self.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                        continue
                except Exception:  # noqa: BLE001 - another worker failed it first (UpdateFinishedTrialError)
                    continue
                if "plan_key" in t.user_attrs:
                    self.study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, user_attrs=t.user_attrs))

    def pop(self):
        """The next queued run as a RUNNING trial, or None when nothing is waiting."""
        from optuna.trial import TrialState

        fail_stale(self.study)  # dead workers' runs: failed, their MLflow runs ended, re-queued
        self._fail_unclaimed()
        while self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial = ask(self.study)
            if "plan_key" in trial.user_attrs:
                return trial
            # another worker popped the last waiting run between our look and our ask: ask made a new empty trial
            trial.set_user_attr("empty", True)
            self.study.tell(trial, state=TrialState.FAIL)
        return None

    def state_of(self, plan_key: str) -> str:
        """``done``, ``pending`` (waiting or running) or ``absent`` for a planned run in this round."""
        from optuna.trial import TrialState

        states = {t.state for t in self.study.get_trials(deepcopy=False) if t.user_attrs.get("plan_key") == plan_key}
        if TrialState.COMPLETE in states:
            return "done"
        if states & {TrialState.WAITING, TrialState.RUNNING}:
            return "pending"
        return "absent"

    def results(self) -> dict[str, str]:
        """plan_key → status of every run this round completed (what the parent run's counts say)."""
        from optuna.trial import TrialState

        return {t.user_attrs["plan_key"]: t.user_attrs.get("status", "finished")
                for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if "plan_key" in t.user_attrs}

    def drained(self) -> bool:
        return self._drained(self.study)

    def colocated(self, host: str) -> int:
        """How many runs workers on ``host`` hold right now (this worker's included)."""
        from optuna.trial import TrialState

        return sum(str(t.user_attrs.get("worker", "")).rsplit(":", 1)[0] == host
                   for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))


def oversubscription(workers: int, threads: int, cores: int) -> str | None:
    """The warning for ``workers`` local workers of ``threads`` threads each on ``cores`` cores, if too many."""
    if workers < 2 or workers * threads <= cores:
        return None
    return (f"{workers} workers on this machine train at once with {threads} threads each on {cores} cores: the CPU is "
            f"oversubscribed and every run slows down (README: Scale out); give each worker "
            f"--set base.train.threads={max(1, cores // workers)}")
