"""Execute a suite in one process: tune each variant, then run every planned (variant, seed) in adaptive
rounds (:mod:`cnnbench.single_run` trains and records each), under one parent run in MLflow.
:mod:`cnnbench.worker` is the same over a shared queue of many processes.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone

import yaml

from cnnbench import __version__
from cnnbench.checkpoint_store import CHECKPOINT_EVERY_S, LOCAL, CheckpointStore
from cnnbench.config import Suite, plan
from cnnbench.events import Events
from cnnbench.interrupts import Interrupted, raise_if_interrupted
from cnnbench.single_run import run_one
from cnnbench.tracking import ROLE_SUITE, Tracker, worker_id


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
    checkpoints: str = LOCAL,
    checkpoint_every: float = CHECKPOINT_EVERY_S,
) -> SuiteOutcome:
    """Tune each variant (when the suite has a ``search`` and ``search`` is true), then run every planned
    (variant, seed) not already done; ``command`` is recorded as the way to reproduce.

    ``storage``: the Optuna storage URL or journal path (default: a journal beside the MLflow store).
    ``checkpoints``: where per-epoch training state goes (:mod:`cnnbench.checkpoint_store`), saved at most
    every ``checkpoint_every`` seconds of a run.
    """
    from cnnbench.environment import capsule

    events = events or Events()
    t_start = time.perf_counter()
    start_devices(suite, device)
    mlflow_before = tracker.seconds
    searching = (suite.search is not None or suite.architecture_search is not None) and search
    optuna_storage = storage_url = None
    if searching:  # opened before anything is written: a bad URL fails fast
        from cnnbench.optuna_storage import default_storage, open_storage

        storage_url = storage or default_storage(tracker.uri)
        optuna_storage = open_storage(storage_url)
    exp_id = tracker.experiment_id(suite.name, question=suite.question)
    env = capsule(command=command)
    parent = create_parent(tracker, exp_id, suite, env, searching, storage_url)
    outcome = SuiteOutcome(parent)

    try:
        tuned = (tune_all(suite, tracker, exp_id, parent, optuna_storage, data_dir, device, events)
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
        active = set(suite.variants)  # seeds.drop_decided: later rounds run only what undecided comparisons need
        for k, count in enumerate(counts):  # one round for a fixed seed list; adaptive: until decided
            round_specs = [s for s in todo if first <= seeds.index(s.seed) < count and s.variant in active]
            planned = index + len(round_specs)
            events.round_start(planned)
            for spec in round_specs:
                raise_if_interrupted()
                events.run_start(spec, index, planned)
                index += 1
                status, metrics, message = run_one(spec, tracker, exp_id, parent, env, data_dir, device, events,
                                                   upstream, store, side=side, abandoned=abandoned)
                outcome.counts[status] += 1
                events.run_end(spec, status, metrics, message)
            first = count
            if side.ready():
                events.info(side.record(tracker, exp_id, parent))
            if suite.adaptive:
                stop, message, left = _round_verdict(suite, tracker, k, count)
                if not stop and suite.drops_decided:
                    active = still_needed(suite, left)
                    message += f" with {', '.join(v for v in suite.variants if v in active)}"
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
    close_parent(tracker, parent, outcome.counts, outcome.reused, outcome.wall_s, outcome.mlflow_s)
    return outcome


def _round_verdict(suite: Suite, tracker: Tracker, k: int, count: int) -> tuple[bool, str, list[str]]:
    """After round ``k`` of an adaptive suite: whether every comparison it waits for is decided, read from
    the tracking store as the report reads it, at the α this look spends; and the undecided variants."""
    from cnnbench.report.selection import comparisons, decided, select_runs, waited_for

    runs = select_runs(suite, tracker.runs_frame(suite.name))
    comps = comparisons(suite, runs, metrics=waited_for(suite), detail=False)  # verdicts only: no Wilcoxon
    left = [v for v in suite.variants if any(v in comps[m] and not comps[m][v].decided for m in comps)]
    last = k == len(suite.looks().counts) - 1
    if decided(suite, comps):
        return True, f"round {k + 1}: every comparison decided after {count} seeds — stopping", []
    if last:
        return True, f"round {k + 1}: {count} seeds (max) reached; still inconclusive: {', '.join(left)}", left
    nxt = suite.looks().counts[k + 1]
    return (False, f"round {k + 1}: {len(left)} comparison(s) undecided after {count} seeds ({', '.join(left)}) "
                   f"— going on to {nxt}", left)


def still_needed(suite: Suite, undecided: list[str]) -> set[str]:
    """The variants the next round runs when decided ones drop out: the undecided, the variants they are
    compared with, and the sources/teachers whose trained weights they need (transitively)."""
    from cnnbench.config import upstream_variants

    need, todo = set(undecided), list(undecided)
    while todo:
        variant = todo.pop()
        for other in [suite.reference(variant), *upstream_variants(suite, variant)]:
            if other not in need:
                need.add(other)
                todo.append(other)
    return need


def create_parent(tracker: Tracker, exp_id: str, suite: Suite, env: dict, searching: bool,
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


def close_parent(tracker: Tracker, parent: str, counts: Counter, reused: int, wall_s: float, mlflow_s: float) -> None:
    tracker.log(
        parent,
        metrics={f"runs_{k}": v for k, v in counts.items()}
        | {"runs_reused": reused, "suite_wall_s": wall_s, "mlflow_overhead_s": mlflow_s},
        tags={"cnnbench.status": "failed" if counts.get("failed") else "finished"},
    )
    tracker.end_run(parent, "FINISHED")


def start_devices(suite: Suite, device_override: str | None) -> None:
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


def tune_all(suite: Suite, tracker: Tracker, exp_id: str, parent: str, storage, data_dir, device_override,
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
