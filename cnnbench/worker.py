"""One worker of a shared queue (:mod:`cnnbench.workqueue`): many processes, on one machine or many,
share a suite's runs through an Optuna RDB storage, and record them in one MLflow store."""

from __future__ import annotations

import time
from collections import Counter

from cnnbench.checkpoint_store import CHECKPOINT_EVERY_S, LOCAL, CheckpointStore
from cnnbench.config import RunSpec, Suite, plan
from cnnbench.events import Events
from cnnbench.interrupts import Interrupted, raise_if_interrupted
from cnnbench.runner import SuiteOutcome, close_parent, create_parent, start_devices, tune_all
from cnnbench.single_run import run_one
from cnnbench.tracking import Tracker, TrackingLost, worker_id


def run_worker(suite: Suite, tracker: Tracker, settings, *, data_dir: str | None = None, device: str | None = None,
               events: Events | None = None, command: str | None = None, search: bool = True,
               checkpoints: str = LOCAL, checkpoint_every: float = CHECKPOINT_EVERY_S) -> SuiteOutcome:
    """One worker of a shared queue (:mod:`cnnbench.workqueue`): help with the searches, then pop and run
    (variant, seed) runs until none is waiting or running. Interrupting a worker puts its run back in the
    queue (its MLflow run ends KILLED); the others go on. ``outcome.counts`` are this worker's runs."""
    from optuna.trial import TrialState

    from cnnbench import optuna_storage
    from cnnbench import workqueue as wq
    from cnnbench.environment import capsule
    from cnnbench.upstream import Upstream

    events = events or Events()
    t_start = time.perf_counter()
    mlflow_before = tracker.seconds
    start_devices(suite, device)
    storage = optuna_storage.open_shared_storage(settings)  # before anything is written: a bad URL fails fast
    optuna_storage.stale_callback(storage).tracker = tracker
    searching = suite.search is not None and search
    exp_id = tracker.experiment_id(suite.name, question=suite.question)
    env = capsule(command=command)
    queue = wq.RunQueue(storage, suite, settings)
    if queue.join():  # the leader: the round's parent run and search runs, once
        parent = create_parent(tracker, exp_id, suite, env, searching, settings.url)
        if searching:
            _prepare_searches(suite, tracker, exp_id, parent, storage, device)
        queue.publish_parent(parent)
    elif (parent := queue.wait_for_attr(wq.ATTR_PARENT)) is None:  # the leader died before publishing it
        parent = create_parent(tracker, exp_id, suite, env, searching, settings.url)
        queue.publish_parent(parent)
    tracker.log(parent, tags={f"cnnbench.worker.{worker_id()}": "joined"})
    outcome = SuiteOutcome(parent)

    tuned = tune_all(suite, tracker, exp_id, parent, storage, data_dir, device, events) if searching else None
    specs = plan(suite, tuned)
    upstream = Upstream(suite, tracker, exp_id)
    if queue.leader or queue.wait_for_attr(wq.ATTR_FILLED) is None:
        done = tracker.done_runs(exp_id, suite.name)
        queue.fill(upstream.order(specs, [s for s in specs if s.fingerprint not in done or s.skip_reason], done))
    by_key = {s.plan_key: s for s in specs}
    queued = len({t.user_attrs.get("plan_key") for t in queue.study.get_trials(deepcopy=False)} - {None})
    outcome.reused = len(specs) - queued
    events.suite_start(suite, specs, outcome.reused)
    store = CheckpointStore(checkpoints, tracker, suite.name, exp_id, checkpoint_every)
    while True:
        raise_if_interrupted()
        trial = queue.pop()
        if trial is None:
            if not queue.counts()["running"]:
                break
            time.sleep(settings.poll_s)  # others still run: stay, to pick up a dead worker's run
            continue
        spec = by_key.get(trial.user_attrs["plan_key"])
        if spec is None:  # enqueued from another plan (a different suite file under the same name)
            trial.set_user_attr("status", "failed")
            queue.study.tell(trial, state=TrialState.FAIL)
            continue
        status = _work_on(trial, spec, queue, by_key, tracker, exp_id, parent, env, data_dir, device, events,
                          upstream, store, sum(outcome.counts.values()), queued)
        if status is not None:
            outcome.counts[status] += 1

    outcome.wall_s = time.perf_counter() - t_start
    outcome.mlflow_s = tracker.seconds - mlflow_before
    if queue.drained() and tracker.run_status(parent) == "RUNNING":  # the last worker out
        counts = Counter(queue.results().values())
        close_parent(tracker, parent, counts, outcome.reused, outcome.wall_s, outcome.mlflow_s)
    return outcome


def _work_on(trial, spec: RunSpec, queue, by_key: dict, tracker: Tracker, exp_id: str, parent: str, env: dict,
             data_dir, device, events: Events, upstream, checkpoints: CheckpointStore, index: int,
             total: int) -> str | None:
    """Run one popped queue trial while its heartbeat beats; returns the run's status, or None when the
    trial went back to the queue (its source/teacher is still running elsewhere)."""
    from optuna.exceptions import UpdateFinishedTrialError

    from cnnbench.config import upstream_variants
    from cnnbench.optuna_storage import heartbeat, requeue

    with heartbeat(queue.study, trial):
        trial.set_user_attr("worker", worker_id())
        if tracker.done_runs(exp_id, spec.suite, spec.fingerprint):  # at-least-once queue, exactly-once results: a
            trial.set_user_attr("status", "reused")  # worker declared dead too early may still have finished it
            queue.study.tell(trial, 0.0)
            return None
        for up in upstream_variants(queue.suite, spec.variant):
            src = next((s for s in by_key.values() if s.variant == up and s.seed == spec.seed), None)
            if src is not None and queue.state_of(src.plan_key) == "pending":
                requeue(queue.study, trial, f"waiting for {up} seed {spec.seed}")
                time.sleep(queue.settings.poll_s)
                return None
        _warn_if_oversubscribed(queue, spec, device, events)

        def started(run_id: str) -> None:
            trial.set_user_attr("mlflow_run_id", run_id)

        events.run_start(spec, index, total)
        try:
            status, metrics, message = run_one(spec, tracker, exp_id, parent, env, data_dir, device, events, upstream,
                                               checkpoints, started)
        except (KeyboardInterrupt, Interrupted):
            requeue(queue.study, trial, "interrupted")
            raise
        except TrackingLost:
            requeue(queue.study, trial, "tracking server lost")
            raise
        trial.set_user_attr("status", status)
        try:
            queue.study.tell(trial, 0.0)
        except UpdateFinishedTrialError:  # declared stale meanwhile (no heartbeat for the grace period): re-queued
            pass
        events.run_end(spec, status, metrics, message)
        return status


_warned_oversubscribed = False  # said once per worker process


def _warn_if_oversubscribed(queue, spec: RunSpec, device_override, events: Events) -> None:
    """Once per worker: several local workers whose CPU runs together ask for more threads than there are cores."""
    import os
    import socket

    import torch

    from cnnbench import devices
    from cnnbench.workqueue import oversubscription

    global _warned_oversubscribed
    if _warned_oversubscribed:
        return
    try:
        if devices.resolve(device_override or spec.experiment.device).type != "cpu":
            return
    except devices.DeviceUnavailable:
        return
    threads = spec.experiment.train.threads or torch.get_num_threads()
    message = oversubscription(queue.colocated(socket.gethostname()), threads, os.cpu_count() or 1)
    if message:
        _warned_oversubscribed = True
        events.warning(message)


def _prepare_searches(suite: Suite, tracker: Tracker, exp_id: str, parent: str, storage, device_override) -> None:
    """The leader creates every variant's study and search run before other workers start tuning,
    so each exists once."""
    import optuna

    from cnnbench import devices
    from cnnbench.config import study_name
    from cnnbench.search import _search_run

    for name, exp in suite.experiments.items():
        try:
            devices.resolve(device_override or exp.device)
        except devices.DeviceUnavailable:
            continue
        optuna.create_study(storage=storage, study_name=study_name(suite, name), direction=suite.search.direction,
                            load_if_exists=True)
        _search_run(tracker, exp_id, parent, suite, name, study_name(suite, name), exp, suite.search_space(name))
