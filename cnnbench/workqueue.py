"""Many workers, one suite: Optuna's RDB storage is the shared work queue (no home-made scheduler).

``cnnbench run suite.yaml --storage postgresql://… --tracking-uri http://mlflow:5000`` started on N
machines makes each process a worker. The (variant, seed) runs of a suite are enqueued once as
fixed trials of a *queue study*; workers pop them (``Study.ask`` pops a WAITING trial atomically on
an RDB), train, and ``tell`` them COMPLETE with the run's status. Search trials use the same storage
and the same heartbeats (:mod:`cnnbench.search`).

Heartbeats, stale trials and the storage itself: :mod:`cnnbench.optuna_storage`.

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

from cnnbench.config import RunSpec, Suite
from cnnbench.interrupts import raise_if_interrupted
from cnnbench.optuna_storage import QueueSettings, ask, fail_stale

ATTR_PARENT, ATTR_FILLED = "cnnbench.parent_run_id", "cnnbench.filled"


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

        while time.monotonic() < deadline:
            value = self.study.user_attrs.get(key)
            if value is not None:
                return value
            raise_if_interrupted()
            time.sleep(min(self.settings.poll_s, 0.5))
        return None

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
