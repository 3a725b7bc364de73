"""Multi-objective architecture search: validation accuracy up, a cost (parameters, FLOPs or latency) down.

One Optuna study per suite (``<suite>.architecture.<fingerprint>``: a changed space, sampler or start
experiment starts a new one; more ``trials`` resume it), driven with ask/tell so that each trial is an MLflow
run nested under the search run, as in :mod:`cnnbench.search`. Trials train the start variant with the
sampled knobs on the tuning seeds (10000, …) for that variant's epochs and see the validation split only.
Multi-objective studies cannot prune in Optuna, so every trial trains in full.

When the budget is spent, the Pareto front (Optuna's ``best_trials``) is written on the search run
(tag ``cnnbench.front``). :func:`with_front` reads it back from MLflow — for the runner and for
``cnnbench report`` alike — and adds up to ``retrain`` of its members as variants ``nas_1`` (cheapest) … that
train over the suite's seeds and are compared with the hand-designed baseline like any variant.
"""

from __future__ import annotations

import hashlib
import json
import math
import traceback
import warnings
from collections import Counter
from typing import Any

import yaml

from cnnbench.config import FINGERPRINT_VERSION, TUNING_SEED_BASE, RunSpec, Suite, flatten, set_dotted
from cnnbench.config.schema import ArchitectureSearch
from cnnbench.interrupts import Interrupted, interruptible, raise_if_interrupted
from cnnbench.optuna_storage import ask
from cnnbench.search import _counted, _state_name, configure, suggest
from cnnbench.tracking import ROLE_SEARCH, ROLE_TRIAL, BufferedRun, Tracker, worker_id

PREFIX = "nas_"
FRONT_TAG = "cnnbench.front"
RUN_METRIC = {"params": "params", "flops": "flops", "latency_bs1_ms": "latency_bs1_p50_ms"}  # cost → run metric


def study_name(suite: Suite) -> str:
    """``<suite>.architecture.<fingerprint of the search and of the experiment it varies>``."""
    nas = suite.architecture_search
    blob = json.dumps({"v": FINGERPRINT_VERSION,
                       "search": nas.model_dump(mode="json", exclude={"trials", "retrain", "min_accuracy"}),
                       "config": suite.experiments[suite.search_start()].identity()}, sort_keys=True)
    return f"{suite.name}.architecture.{hashlib.sha256(blob.encode()).hexdigest()[:10]}"


def make_sampler(nas: ArchitectureSearch, resumed_at: int = 0):
    """The sampler, its seed offset by the trials the study already holds: a seeded sampler re-created on
    resume would otherwise draw the first trials' architectures again."""
    import optuna.samplers as s

    seed = nas.sampler_seed + resumed_at
    if nas.sampler == "nsga2":
        return s.NSGAIISampler(population_size=nas.population_size, seed=seed)
    if nas.sampler == "tpe":
        return s.TPESampler(seed=seed)
    return s.RandomSampler(seed=seed)


def measure_cost(cost: str, model, input_shape: tuple[int, ...], device) -> float:
    """The trial's cost: parameters, FLOPs of one sample's forward pass, or batch-1 latency (p50, ms)."""
    from cnnbench import measure

    model.eval()
    if cost == "params":
        return float(sum(p.numel() for p in model.parameters()))
    if cost == "flops":
        return float(measure.flops_per_sample(model, input_shape))
    return measure.latency_ms(model, input_shape, 1, device)[0]


def pick_front(members: list[dict], retrain: int, min_accuracy: float | None) -> list[dict]:
    """Up to ``retrain`` front members spread evenly by cost (cheapest and most accurate included), after
    dropping those below ``min_accuracy``; named ``nas_1`` (cheapest) …"""
    kept = sorted((m for m in members if min_accuracy is None or m["val_accuracy"] >= min_accuracy),
                  key=lambda m: (m["cost"], -m["val_accuracy"]))
    if len(kept) > retrain:
        if retrain == 1:
            kept = [max(kept, key=lambda m: m["val_accuracy"])]
        else:
            kept = [kept[round(i * (len(kept) - 1) / (retrain - 1))] for i in range(retrain)]
    return [m | {"name": f"{PREFIX}{i + 1}"} for i, m in enumerate(kept)]


# ───────────────────────────── the search ─────────────────────────────


def search_architectures(suite: Suite, tracker: Tracker, exp_id: str, parent_id: str, storage, load_split, device,
                         events) -> list[dict]:
    """Run the missing trials of the suite's architecture study; record and return the retrained front."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    nas, start = suite.architecture_search, suite.search_start()
    exp, name = suite.experiments[start], study_name(suite)
    study = optuna.create_study(storage=storage, study_name=name, directions=["maximize", "minimize"],
                                load_if_exists=True, sampler=make_sampler(nas))
    study.sampler = make_sampler(nas, resumed_at=len(study.trials))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["val_accuracy", nas.cost])  # what the Optuna dashboard labels the axes with
    study.set_user_attr("cnnbench.suite", suite.name)
    search_run = _search_run(tracker, exp_id, parent_id, suite, name)
    try:
        while True:
            raise_if_interrupted()
            trials = study.get_trials(deepcopy=False)
            done = sum(_counted(t, trials) for t in trials)
            if done >= nas.trials:
                break
            trial = ask(study)
            spec = RunSpec(suite.name, "architecture", TUNING_SEED_BASE, exp, study=name, trial=trial.number)
            events.trial_start(spec, done, nas.trials)
            state, values, message = _run_trial(suite, exp, trial, study, tracker, exp_id, search_run, load_split,
                                                device, events, spec)
            events.trial_end(spec, state, values[0] if values else None, message)
    except (KeyboardInterrupt, Interrupted):
        tracker.log(search_run, tags={"cnnbench.status": "killed"})
        tracker.end_run(search_run, "KILLED")  # reused, and finished, when the search resumes
        raise

    all_trials = study.get_trials(deepcopy=False)
    counted = [t for t in all_trials if _counted(t, all_trials)]
    members, seen = [], set()
    for t in study.best_trials if any(t.state == TrialState.COMPLETE for t in counted) else []:
        key = json.dumps(t.params, sort_keys=True)
        if key not in seen:  # NSGA-II may sample a configuration twice
            seen.add(key)
            members.append({"trial": t.number, "params": dict(t.params), "val_accuracy": t.values[0], "cost": t.values[1]})
    front = pick_front(members, nas.retrain, nas.min_accuracy)
    counts = Counter(_state_name(t.state) for t in counted)
    metrics = {f"trials_{k}": counts.get(k, 0) for k in ("complete", "failed")}
    metrics |= {"trials_budget": nas.trials, "front_size": len(members), "front_retrained": len(front)}
    tags = {"cnnbench.status": "finished" if members else "failed", FRONT_TAG: json.dumps(front)}
    if not members:
        tags["cnnbench.reason"] = f"no trial completed ({dict(counts)})"
    tracker.log(search_run, metrics=metrics, tags=tags)
    table = study.trials_dataframe(attrs=("number", "values", "state", "params", "user_attrs", "duration"))
    tracker.log_artifacts(search_run, {"trials.csv": table.to_csv(index=False),
                                       "front.yaml": yaml.safe_dump({"pareto_front": members, "retrained": front},
                                                                    sort_keys=False)})
    tracker.end_run(search_run, "FINISHED")
    return front


def _search_run(tracker: Tracker, exp_id: str, parent_id: str, suite: Suite, name: str) -> str:
    """The search run: created once per study and reused when the search resumes."""
    found = tracker.search(exp_id, f"tags.`cnnbench.study` = '{name}' and tags.`cnnbench.role` = '{ROLE_SEARCH}'")
    if found:
        return sorted(found, key=lambda r: r.info.start_time)[0].info.run_id
    start = suite.search_start()
    run_id = tracker.start_run(
        exp_id, "architecture/search",
        {"cnnbench.suite": suite.name, "cnnbench.variant": start, "cnnbench.role": ROLE_SEARCH,
         "cnnbench.study": name, "cnnbench.architecture_search": "true", "cnnbench.status": "running"},
        parent_id,
    )
    nas = suite.architecture_search
    params = {f"architecture_search.{k}": v for k, v in nas.model_dump(mode="json", exclude={"space"}).items()}
    params |= {f"space.{k}": v.model_dump(mode="json", exclude_none=True) for k, v in nas.space.items()}
    tracker.log(run_id, params=params | flatten(suite.experiments[start].model_dump(mode="json")))
    return run_id


def _run_trial(suite: Suite, exp, trial, study, tracker: Tracker, exp_id: str, search_run: str, load_split, device,
               events, spec: RunSpec) -> tuple[str, list[float] | None, str]:
    """Train one sampled architecture on the tuning seeds; tell Optuna (accuracy, cost). Returns (state, values, message)."""
    from optuna.trial import TrialState

    from cnnbench.train import train

    nas = suite.architecture_search
    run_id = tracker.start_run(
        exp_id, f"architecture/trial{trial.number}",
        {"cnnbench.suite": suite.name, "cnnbench.variant": "architecture", "cnnbench.role": ROLE_TRIAL,
         "cnnbench.trial": str(trial.number), "cnnbench.study": study.study_name, "cnnbench.status": "running",
         "cnnbench.worker": worker_id()},
        search_run,
    )
    trial.set_user_attr("mlflow_run_id", run_id)
    params = suggest(trial, nas.space)
    buffered = BufferedRun(tracker, run_id, params=params | {"tuning_seeds": nas.tuning_seeds})
    epochs_run = 0

    def finish(state: TrialState, values: list[float] | None, status: str, reason: str = "") -> tuple:
        trial.set_user_attr("epochs_run", epochs_run)
        if reason:
            trial.set_user_attr("reason", reason[:2000])
        study.tell(trial, values if state == TrialState.COMPLETE else None, state=state)
        metrics = {"epochs_run": epochs_run}
        if values is not None:
            metrics |= {"val_accuracy": values[0], nas.cost: values[1]}
        tags = {"cnnbench.trial_state": _state_name(state), "cnnbench.status": "finished"}
        if reason:
            tags["cnnbench.reason"] = reason[:5000]
        buffered.flush(metrics=metrics, tags=tags, step=epochs_run)
        tracker.end_run(run_id, status)
        return tags["cnnbench.trial_state"], values, reason

    try:
        cfg = configure(exp, params)
        split = load_split(cfg)
        accuracies, model = [], None
        for k in range(nas.tuning_seeds):
            def on_epoch(record: dict, first: bool = k == 0) -> None:
                nonlocal epochs_run
                epochs_run += 1
                if first:  # the first tuning seed's curve is logged
                    buffered.log_epoch(record)
                    events.epoch(spec, record)
                raise_if_interrupted()

            run = train(cfg, TUNING_SEED_BASE + k, split, device, on_epoch=on_epoch, evaluate_test=False,
                        on_batch=interruptible(events.batch))
            if run.status == "diverged":
                return finish(TrialState.FAIL, None, "FINISHED", run.message)
            accuracies.append(run.history[-1]["val_accuracy"])
            model = model or run.model
        values = [sum(accuracies) / len(accuracies), measure_cost(nas.cost, model, split.data.shape, device)]
    except (KeyboardInterrupt, Interrupted):
        trial.set_user_attr("interrupted", True)
        finish(TrialState.FAIL, None, "KILLED", "interrupted")
        raise
    except Exception as e:  # noqa: BLE001 - a trial that raises (e.g. a knob combination the model refuses) is FAILED
        tracker.log_artifacts(run_id, {"traceback.txt": traceback.format_exc()})
        return finish(TrialState.FAIL, None, "FAILED", f"{type(e).__name__}: {e}")
    if not all(math.isfinite(v) for v in values):
        return finish(TrialState.FAIL, None, "FINISHED", f"objectives are {values}")
    finish(TrialState.COMPLETE, values, "FINISHED")
    return "complete", values, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# ───────────────────────────── the front as variants ─────────────────────────────


def recorded_front(suite: Suite, frame) -> list[dict]:
    """The retrained front written on the current study's search run (empty: not searched yet)."""
    col = f"tags.{FRONT_TAG}"
    if suite.architecture_search is None or frame.empty or col not in frame or "tags.cnnbench.study" not in frame:
        return []
    runs = frame[(frame["tags.cnnbench.study"] == study_name(suite)) & (frame["tags.cnnbench.role"] == ROLE_SEARCH)]
    fronts = [json.loads(v) for v in runs.sort_values("start_time")[col] if isinstance(v, str) and v]
    return fronts[-1] if fronts else []


def with_front(suite: Suite, front: list[dict]) -> Suite:
    """``suite`` with each front member as a variant: the start variant with the member's knobs."""
    if not front:
        return suite
    start = suite.search_start()
    variants, experiments = dict(suite.variants), dict(suite.experiments)
    for member in front:
        override: dict[str, Any] = json.loads(json.dumps(suite.variants[start] or {}))
        for key, value in member["params"].items():
            override = set_dotted(override, key, value)
        variants[member["name"]] = override
        experiments[member["name"]] = configure(suite.experiments[start], member["params"])
    out = suite.model_copy()
    out.variants, out.experiments = variants, experiments
    return out
