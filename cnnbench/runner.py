"""Execute a plan: for each (variant, seed) train, and record the result in MLflow.

Failure is a result: a diverged run is recorded as ``diverged``, a missing device as ``skipped``
with the reason, an exception as ``failed`` with its traceback — and the suite goes on.
Ctrl-C / SIGTERM end the run in flight as KILLED (its metrics flushed first) and propagate.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import yaml

from cnnbench import __version__
from cnnbench.checkpoint_store import CHECKPOINT_EVERY_S, LOCAL, CheckpointStore
from cnnbench.checkpoints import CheckpointError
from cnnbench.config import RunSpec, Suite, flatten, plan, source_of
from cnnbench.interrupts import Interrupted, interruptible, raise_if_interrupted
from cnnbench.tracking import ROLE_RUN, ROLE_SUITE, BufferedRun, Tracker, TrackingLost, worker_id


class Events:
    """Progress hooks; the CLI subclasses this with a rich display. All no-ops here."""

    def suite_start(self, suite: Suite, specs: list[RunSpec], reused: int) -> None: ...
    def run_start(self, spec: RunSpec, index: int, total: int) -> None: ...
    def batch(self, done: int, total: int) -> None: ...
    def epoch(self, spec: RunSpec, record: dict) -> None: ...
    def run_end(self, spec: RunSpec, status: str, metrics: dict, message: str) -> None: ...
    def trial_start(self, spec: RunSpec, done: int, total: int) -> None: ...
    def trial_end(self, spec: RunSpec, state: str, value: float | None, message: str) -> None: ...
    def search_end(self, result) -> None: ...
    def info(self, message: str) -> None: ...
    def warning(self, message: str) -> None: ...


@dataclass
class SuiteOutcome:
    parent_run_id: str
    counts: Counter = field(default_factory=Counter)  # status → number of runs (this invocation)
    reused: int = 0
    wall_s: float = 0.0
    mlflow_s: float = 0.0

    @property
    def exit_code(self) -> int:
        return 1 if self.counts.get("failed") else 0


def preload_data(suite: Suite, data_dir: str | None) -> None:
    """Load every dataset the suite needs before anything is written (raises DataNotFoundError)."""
    from cnnbench import data

    for exp in suite.experiments.values():
        data.load(exp.data, data_dir)


def run_suite(
    suite: Suite,
    tracker: Tracker,
    *,
    data_dir: str | None = None,
    rerun: bool = False,
    device: str | None = None,
    events: Events | None = None,
    command: str | None = None,
    search: bool = True,
    storage: str | None = None,
    queue=None,
    checkpoints: str = LOCAL,
    checkpoint_every: float = CHECKPOINT_EVERY_S,
) -> SuiteOutcome:
    """Tune each variant (when the suite has a ``search`` and ``search`` is true), then run every planned
    (variant, seed) not already done; ``command`` is recorded as the way to reproduce.

    ``storage``: the Optuna storage URL or journal path (default: a journal beside the MLflow store).
    ``queue``: a :class:`cnnbench.workqueue.QueueSettings` — this process is one of possibly many
    workers sharing the suite's runs through that RDB storage (:func:`run_worker`).
    ``checkpoints``: where per-epoch training state goes (:mod:`cnnbench.checkpoint_store`), saved at most
    every ``checkpoint_every`` seconds of a run.
    """
    if queue is not None:
        return run_worker(suite, tracker, queue, data_dir=data_dir, device=device, events=events, command=command,
                          search=search, checkpoints=checkpoints, checkpoint_every=checkpoint_every)
    from cnnbench.environment import capsule

    events = events or Events()
    t_start = time.perf_counter()
    _start_devices(suite, device)
    mlflow_before = tracker.seconds
    searching = (suite.search is not None or suite.architecture_search is not None) and search
    optuna_storage = storage_url = None
    if searching:  # opened before anything is written: a bad URL fails fast
        from cnnbench.optuna_storage import default_storage, open_storage

        storage_url = storage or default_storage(tracker.uri)
        optuna_storage = open_storage(storage_url)
    exp_id = tracker.experiment_id(suite.name, question=suite.question)
    env = capsule(command=command)
    parent = _create_parent(tracker, exp_id, suite, env, searching, storage_url)
    outcome = SuiteOutcome(parent)

    try:
        tuned = (_tune_all(suite, tracker, exp_id, parent, optuna_storage, data_dir, device, events)
                 if searching and suite.search is not None else None)
        if suite.architecture_search is not None:  # the front's members join as variants nas_1, …
            suite = _architecture_front(suite, tracker, exp_id, parent, optuna_storage if searching else None,
                                        data_dir, device, events)
        specs = plan(suite, tuned)
        done = {} if rerun else tracker.done_runs(exp_id, suite.name)
        todo = [s for s in specs if s.fingerprint not in done or s.skip_reason]
        from cnnbench.sidebyside import SideBySide
        from cnnbench.upstream import Upstream

        upstream = Upstream(suite, tracker, exp_id)  # sources/teachers first, their weights kept
        todo = upstream.order(specs, todo, done)
        outcome.reused = len(specs) - len(todo)
        events.suite_start(suite, specs, outcome.reused)
        abandoned = tracker.running_fingerprints(exp_id, suite.name)  # left RUNNING by a process that died
        side = SideBySide(suite)
        store = CheckpointStore(checkpoints, tracker, suite.name, exp_id, checkpoint_every)
        seeds, counts = suite.seed_list(), suite.looks().counts
        index = first = 0
        for k, count in enumerate(counts):  # one round for a fixed seed list; adaptive: until decided
            for spec in [s for s in todo if first <= seeds.index(s.seed) < count]:
                raise_if_interrupted()
                events.run_start(spec, index, len(todo))
                index += 1
                status, metrics, message = _run_one(spec, tracker, exp_id, parent, env, data_dir, device, events,
                                                    upstream, store, side=side, abandoned=abandoned)
                outcome.counts[status] += 1
                events.run_end(spec, status, metrics, message)
            first = count
            if side.ready():
                events.info(side.record(tracker, exp_id, parent))
            if suite.adaptive:
                stop, message = _round_verdict(suite, tracker, k, count)
                events.info(message)
                if stop:
                    break
    except (KeyboardInterrupt, Interrupted) as exc:
        code = exc.exit_code if isinstance(exc, Interrupted) else 130
        tracker.log(parent, tags={"cnnbench.status": "killed"})
        tracker.end_run(parent, "KILLED")
        raise Interrupted(code) from None
    except Exception:  # a bug or a lost store: end the parent (with its wall time) if the store still answers
        try:
            tracker.log(parent, metrics={"suite_wall_s": time.perf_counter() - t_start})
            tracker.end_run(parent, "FAILED")
        except Exception:  # noqa: BLE001 - the original error is the one to show
            pass
        raise

    outcome.wall_s = time.perf_counter() - t_start
    outcome.mlflow_s = tracker.seconds - mlflow_before
    _close_parent(tracker, parent, outcome.counts, outcome.reused, outcome.wall_s, outcome.mlflow_s)
    return outcome


def _round_verdict(suite: Suite, tracker: Tracker, k: int, count: int) -> tuple[bool, str]:
    """After round ``k`` of an adaptive suite: whether every comparison it waits for is decided, read from
    the tracking store as the report reads it, at the α this look spends."""
    from cnnbench.report.selection import comparisons, decided, select_runs, waited_for

    runs = select_runs(suite, tracker.runs_frame(suite.name))
    comps = comparisons(suite, runs, metrics=waited_for(suite), detail=False)  # verdicts only: no Wilcoxon
    left = [v for v, r in comps[suite.report.primary].items() if not r.decided]
    last = k == len(suite.looks().counts) - 1
    if decided(suite, comps):
        return True, f"round {k + 1}: every comparison decided after {count} seeds — stopping"
    if last:
        return True, f"round {k + 1}: {count} seeds (max) reached; still inconclusive: {', '.join(left)}"
    nxt = suite.looks().counts[k + 1]
    return False, f"round {k + 1}: {len(left)} comparison(s) undecided after {count} seeds ({', '.join(left)}) — going on to {nxt}"


def _create_parent(tracker: Tracker, exp_id: str, suite: Suite, env: dict, searching: bool,
                   storage_url: str | None) -> str:
    """The suite's parent run (one per invocation, or per round of a shared queue) with the environment."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    parent = tracker.start_run(
        exp_id,
        f"{suite.name} @ {stamp}",
        {"cnnbench.suite": suite.name, "cnnbench.role": ROLE_SUITE, "cnnbench.version": __version__,
         "cnnbench.command": env["command"], "cnnbench.source": suite.source, "cnnbench.git_commit": env["git_commit"],
         "cnnbench.worker": worker_id()},
    )
    tracker.log(parent, params={f"env.{k}": v for k, v in env.items()} | {"seeds": suite.seed_list()}
                | ({"optuna_storage": storage_url} if storage_url else {}),
                tags={"cnnbench.searched": str(searching).lower()})
    tracker.log_artifacts(parent, {"suite.yaml": yaml.safe_dump(suite.model_dump(mode="json"), sort_keys=False),
                                   "environment.json": env})
    return parent


def _close_parent(tracker: Tracker, parent: str, counts: Counter, reused: int, wall_s: float, mlflow_s: float) -> None:
    tracker.log(
        parent,
        metrics={f"runs_{k}": v for k, v in counts.items()}
        | {"runs_reused": reused, "suite_wall_s": wall_s, "mlflow_overhead_s": mlflow_s},
        tags={"cnnbench.status": "failed" if counts.get("failed") else "finished"},
    )
    tracker.end_run(parent, "FINISHED")


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
    _start_devices(suite, device)
    storage = optuna_storage.open_shared_storage(settings)  # before anything is written: a bad URL fails fast
    optuna_storage.stale_callback(storage).tracker = tracker
    searching = suite.search is not None and search
    exp_id = tracker.experiment_id(suite.name, question=suite.question)
    env = capsule(command=command)
    queue = wq.RunQueue(storage, suite, settings)
    if queue.join():  # the leader: the round's parent run and search runs, once
        parent = _create_parent(tracker, exp_id, suite, env, searching, settings.url)
        if searching:
            _prepare_searches(suite, tracker, exp_id, parent, storage, device)
        queue.publish_parent(parent)
    elif (parent := queue.wait_for_attr(wq.ATTR_PARENT)) is None:  # the leader died before publishing it
        parent = _create_parent(tracker, exp_id, suite, env, searching, settings.url)
        queue.publish_parent(parent)
    tracker.log(parent, tags={f"cnnbench.worker.{worker_id()}": "joined"})
    outcome = SuiteOutcome(parent)

    tuned = _tune_all(suite, tracker, exp_id, parent, storage, data_dir, device, events) if searching else None
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
        _close_parent(tracker, parent, counts, outcome.reused, outcome.wall_s, outcome.mlflow_s)
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
            status, metrics, message = _run_one(spec, tracker, exp_id, parent, env, data_dir, device, events, upstream,
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


def _start_devices(suite: Suite, device_override: str | None) -> None:
    """Start every device the suite names before anything trains: torch's autograd engine sizes its
    per-device queues at the first backward pass, so an XLA device started after a CPU run has trained
    fails inside backward ("device_ready_queues_" assertion). Absent devices are skipped later, per run."""
    from cnnbench import devices

    for exp in suite.experiments.values():
        try:
            devices.resolve(device_override or exp.device)
        except devices.DeviceUnavailable:
            pass


def _split_loader(data_dir):
    """cfg → its train/validation split, as a search trial trains on it."""
    from cnnbench import data as datamod

    def load_split(cfg):
        return datamod.split(datamod.load(cfg.data, data_dir), cfg.data.val_fraction, cfg.data.limit_train)

    return load_split


def _architecture_front(suite: Suite, tracker: Tracker, exp_id: str, parent: str, storage, data_dir, device_override,
                        events: Events) -> Suite:
    """Run the architecture search (``storage`` None: ``--no-search``, use what is recorded); ``suite`` with
    the retrained front as variants, read back from MLflow as the report reads it."""
    from cnnbench import devices
    from cnnbench.architecture_search import recorded_front, search_architectures, with_front

    if storage is not None:
        exp = suite.experiments[suite.search_start()]
        try:
            device = devices.resolve(device_override or exp.device)
        except devices.DeviceUnavailable as e:
            events.warning(f"architecture search not run: {e}")
        else:
            search_architectures(suite, tracker, exp_id, parent, storage, _split_loader(data_dir), device, events)
    return with_front(suite, recorded_front(suite, tracker.runs_frame(suite.name)))


def _tune_all(suite: Suite, tracker: Tracker, exp_id: str, parent: str, storage, data_dir, device_override,
              events: Events) -> dict:
    """Search every variant with the same budget; variant → experiment with its best values (None: no trial completed)."""
    from cnnbench import devices
    from cnnbench.search import configure, tune_variant
    from cnnbench.train import check_supported

    load_split = _split_loader(data_dir)
    tuned = {}
    for name, exp in suite.experiments.items():
        try:
            device = devices.resolve(device_override or exp.device)
            check_supported(exp, device)
        except devices.DeviceUnavailable:
            continue  # not tuned: its seeded runs are recorded as skipped with the reason
        result = tune_variant(suite, name, tracker, exp_id, parent, storage, load_split, device, events)
        tuned[name] = configure(exp, result.best_params) if result.best_params is not None else None
        events.search_end(result)
    return tuned


def _run_one(spec: RunSpec, tracker: Tracker, exp_id: str, parent: str, env: dict, data_dir, device_override,
             events: Events, upstream=None, checkpoints: CheckpointStore | None = None,
             started=None, side=None, abandoned: set[str] | None = None) -> tuple[str, dict, str]:
    """Train one (variant, seed) and record it; returns (status, final metrics, message).
    ``started(run_id)`` is called once its MLflow run exists (a shared queue notes it on the trial);
    ``side`` (:class:`cnnbench.sidebyside.SideBySide`) keeps the trained model for the timing protocol.
    The machine's load average and CPU steal over the run are recorded with it.

    Training state is checkpointed per epoch in ``checkpoints`` (:class:`CheckpointStore`): kept when the
    run is interrupted (the next ``run``, on this machine or — travelling — another, continues from it),
    removed once the run has an outcome.

    ``abandoned``: fingerprints of the suite's runs left RUNNING by a process that died, looked up once per
    suite by a single process (None, on a shared queue: look this run's up as it starts)."""
    from cnnbench import data as datamod
    from cnnbench import devices, techniques
    from cnnbench.deployment import measure_deployed
    from cnnbench.distributed import train_distributed
    from cnnbench.posttraining import run_post_training
    from cnnbench.timing import LoadMonitor
    from cnnbench.train import check_supported, train
    from cnnbench.upstream import Missing

    exp = spec.experiment
    tags = {
        "cnnbench.suite": spec.suite,
        "cnnbench.role": ROLE_RUN,
        "cnnbench.variant": spec.variant,
        "cnnbench.seed": str(spec.seed),
        "cnnbench.baseline": str(spec.is_baseline).lower(),
        "cnnbench.fingerprint": spec.fingerprint,
        "cnnbench.plan_key": spec.plan_key,
        "cnnbench.status": "running",
        "cnnbench.worker": worker_id(),
    }
    if spec.study:
        tags |= {"cnnbench.study": spec.study, "cnnbench.tuned": "true"}
    config_yaml = yaml.safe_dump({"seed": spec.seed, **exp.model_dump(mode="json")}, sort_keys=False)
    skip = spec.skip_reason
    if skip is None:
        try:
            device = devices.resolve(device_override or exp.device)
            check_supported(exp, device)  # e.g. a precision the device cannot do
        except devices.DeviceUnavailable as e:
            skip = str(e)
    if skip is not None:  # not trained: recorded as skipped with the reason
        run_id = tracker.start_run(exp_id, spec.run_name, tags | {"cnnbench.device": exp.device}, parent)
        tracker.log(run_id, params=flatten(exp.model_dump(mode="json")) | {"seed": spec.seed},
                    tags={"cnnbench.status": "skipped", "cnnbench.reason": skip})
        tracker.end_run(run_id, "FINISHED")
        return "skipped", {}, skip

    if abandoned is None or spec.fingerprint in abandoned:
        tracker.end_abandoned(exp_id, spec.fingerprint, "its process stopped before ending it (killed, or the "
                                                         "tracking server stopped answering); the run was started again")
    run_id = tracker.start_run(exp_id, spec.run_name, tags | {"cnnbench.device": device.type}, parent)
    if started is not None:
        started(run_id)
    buffered = BufferedRun(tracker, run_id, params=flatten(exp.model_dump(mode="json")) | {"seed": spec.seed})
    run_env = env | devices.describe(device)

    def on_epoch(record: dict) -> None:
        buffered.log_epoch(record)
        events.epoch(spec, record)
        raise_if_interrupted()

    monitor = LoadMonitor().start()  # the machine's load over the run, recorded with it
    try:
        split = datamod.split(datamod.load(exp.data, data_dir), exp.data.val_fraction, exp.data.limit_train)
        weights, models = upstream.weights(spec) if upstream is not None else ({}, {})  # sources, teachers
        if exp.compresses:  # quantize / prune / factorize the source's trained weights
            result = run_post_training(exp, spec.seed, split, device, weights[source_of(upstream.suite, spec.variant)],
                                       on_epoch, interruptible(events.batch))
        else:
            context = techniques.TrainingContext(weights, models, split.data, device)
            losses = [f for t in techniques.active(exp, "training") if (f := t.loss(exp, context)) is not None]
            ckpt = None
            if checkpoints is not None:
                ckpt, resumed = checkpoints.open(spec.fingerprint, run_id)
                if resumed:
                    tracker.log(run_id, tags=resumed)
            if exp.train.processes > 1:  # one run over N processes (no mid-run checkpoint: it restarts whole)
                result = train_distributed(exp, spec.seed, split, device, on_epoch=on_epoch,
                                           on_batch=interruptible(events.batch))
            else:
                result = train(exp, spec.seed, split, device, on_epoch=on_epoch, on_batch=interruptible(events.batch),
                               loss_fn=losses[0] if losses else None, checkpoint=ckpt)
            if ckpt is not None and ckpt.on_saved is not None:  # what travelling checkpoints cost this run
                result.metrics["checkpoint_upload_s"] = ckpt.on_saved.seconds
        measure_deployed(result, exp, split, device)  # test a compressed model; inference metrics of every run
        if upstream is not None and result.status == "finished":
            upstream.save(spec.variant, spec.seed, run_id, result.model)
    except (KeyboardInterrupt, Interrupted):
        buffered.flush(tags={"cnnbench.status": "killed"})
        tracker.end_run(run_id, "KILLED")
        raise
    except TrackingLost:  # fail loudly: the checkpoint stays, the next `run` redoes what was not recorded
        raise
    except Missing as e:  # its source or teacher did not finish
        buffered.flush(tags={"cnnbench.status": "skipped", "cnnbench.reason": str(e)})
        tracker.end_run(run_id, "FINISHED")
        return "skipped", {}, str(e)
    except Exception as e:  # noqa: BLE001 - any error in a run is recorded, and the suite goes on
        if checkpoints is not None and not isinstance(e, CheckpointError):  # a refused one stays for the user
            checkpoints.discard(spec.fingerprint, run_id)
        message = f"{type(e).__name__}: {e}"
        buffered.flush(tags={"cnnbench.status": "failed", "cnnbench.reason": message[:5000]})
        tracker.log_artifacts(run_id, {"traceback.txt": traceback.format_exc(), "config.yaml": config_yaml,
                                       "environment.json": run_env})
        tracker.end_run(run_id, "FAILED")
        return "failed", {}, message

    load = monitor.stop()
    result.metrics |= load.metrics()
    tags = {"cnnbench.status": result.status} | result.tags
    if load.loaded:
        tags["cnnbench.loaded"] = "true"
    if result.message:
        tags["cnnbench.reason"] = result.message
    buffered.flush(metrics=result.metrics, tags=tags, step=len(result.history))
    artifacts = {"config.yaml": config_yaml, "environment.json": run_env} | result.artifacts
    if result.confusion is not None:
        artifacts["confusion_matrix.json"] = result.confusion
    tracker.log_artifacts(run_id, artifacts)
    tracker.end_run(run_id, "FINISHED")
    if checkpoints is not None:  # only once the result is recorded: a lost tracking server leaves it for the redo
        checkpoints.finished(spec.fingerprint)
    if side is not None:
        side.keep(spec, run_id, result, device, tuple(split.data.shape))
    return result.status, result.metrics, result.message
