"""Fair tuning: every variant gets the same Optuna budget before its seeded runs (DeepOBS / AlgoPerf style).

One study per (suite, variant), named ``<suite>.<variant>.<search fingerprint>`` so that a changed
config or space starts a new study while the same one resumes (only missing trials run; raising
``search.trials`` adds trials to the same study). Every study uses the same sampler seed and the
same tuning seeds, and trials see the validation split only — :func:`cnnbench.train.train` is
called with ``evaluate_test=False``.

Trials are driven with ask/tell so each is an MLflow run nested under its variant's search run
(Optuna's MLflowCallback cannot nest). A trial that raises, or whose loss goes NaN, is FAILED and
the search goes on; an interrupted trial is FAILED with ``interrupted`` set and does not count
toward the budget, so a resumed search runs it again.

Storage: :mod:`cnnbench.optuna_storage` (a journal beside the SQLite MLflow store by default).
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import yaml

from cnnbench.config import (
    TUNING_SEED_BASE,
    Experiment,
    ParamSpec,
    RunSpec,
    SearchConfig,
    Suite,
    flatten,
    set_dotted,
    study_name,
)
from cnnbench.interrupts import Interrupted, interruptible, raise_if_interrupted
from cnnbench.optuna_storage import ask, fail_stale, heartbeat, heartbeat_enabled
from cnnbench.tracking import ROLE_SEARCH, ROLE_TRIAL, BufferedRun, Tracker, worker_id

POLL_S = 2.0  # how often a worker looks again while other workers' trials run


# ───────────────────────────── sampler, pruner ─────────────────────────────


def make_sampler(search: SearchConfig, space: dict[str, ParamSpec], resumed_at: int = 0):
    """The study's sampler; its seed is offset by the trials the study already holds (``resumed_at``): a seeded
    sampler re-created on resume — or by a second worker — would otherwise draw the first trials' values again."""
    import optuna.samplers as s

    seed = search.sampler_seed + resumed_at
    if search.sampler == "tpe":
        return s.TPESampler(seed=seed)
    if search.sampler == "random":
        return s.RandomSampler(seed=seed)
    if search.sampler == "cmaes":  # categorical parameters fall back to the seeded random sampler
        return s.CmaEsSampler(seed=seed, independent_sampler=s.RandomSampler(seed=seed), warn_independent_sampling=False)
    if search.sampler == "qmc":
        return s.QMCSampler(seed=seed, scramble=True, independent_sampler=s.RandomSampler(seed=seed),
                            warn_independent_sampling=False)

    class AskTellGridSampler(s.GridSampler):
        """GridSampler calls ``study.stop()`` once the grid is covered, which only works inside
        ``study.optimize``; cnnbench drives trials with ask/tell and counts them itself."""

        def after_trial(self, study, trial, state, values) -> None:
            return None

    return AskTellGridSampler({key: spec.grid() for key, spec in space.items()}, seed=seed)


def make_pruner(search: SearchConfig, epochs: int):
    """Pruners act on the validation metric reported ``reports_per_epoch`` times an epoch: the step is
    that fraction of an epoch (step 1 = the first report, epoch e ends at step e·reports_per_epoch)."""
    import optuna.pruners as p

    if search.pruner == "none":
        return p.NopPruner()
    if search.pruner == "median":
        return p.MedianPruner(n_startup_trials=search.pruner_startup_trials, n_warmup_steps=1)
    if search.pruner == "hyperband":
        return p.HyperbandPruner(min_resource=1, max_resource=epochs * search.reports_per_epoch)
    if search.pruner == "successive_halving":
        return p.SuccessiveHalvingPruner(min_resource=1)
    return p.WilcoxonPruner(p_threshold=0.1, n_startup_steps=2)  # report steps stand in for its instances


def suggest(trial, space: dict[str, ParamSpec]) -> dict[str, Any]:
    out = {}
    for key, spec in space.items():
        if spec.type == "float":
            out[key] = trial.suggest_float(key, spec.low, spec.high, log=spec.log, step=spec.step)
        elif spec.type == "int":
            out[key] = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log, step=int(spec.step or 1))
        else:
            out[key] = trial.suggest_categorical(key, spec.choices)
    return out


def configure(exp: Experiment, params: dict[str, Any]) -> Experiment:
    """``exp`` with each dotted ``params`` key set (re-validated: a bad combination raises)."""
    config = exp.model_dump(mode="json")
    for key, value in params.items():
        config = set_dotted(config, key, value)
    return Experiment.model_validate(config)


# ───────────────────────────── one variant's search ─────────────────────────────


@dataclass
class TuningResult:
    variant: str
    study: str
    best_params: dict[str, Any] | None  # None when no trial completed
    best_value: float | None
    counts: Counter = field(default_factory=Counter)  # complete / pruned / failed (interrupted ones not counted)
    ran: int = 0  # trials run in this invocation


def _counted(trial, trials=()) -> bool:
    """Finished, and neither interrupted nor failed for lack of heartbeats and re-queued (a copy in
    ``trials`` names it in its retry history): those do not use up the budget."""
    from optuna.trial import TrialState

    finished = trial.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    if not finished or trial.user_attrs.get("interrupted", False) or trial.user_attrs.get("surplus", False):
        return False
    return trial.state != TrialState.FAIL or not any(trial.number in t.system_attrs.get("retry_history", ())
                                                     for t in trials)


def over_budget(study, trial, budget: int) -> bool:
    """Whether ``trial``, just asked, is one too many: two workers that saw room for one more trial at the same
    moment both ask, and the one the storage numbered later (numbers are assigned atomically) is ended unrun as
    FAIL with ``surplus`` set — not counted, never trained."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    ahead = sum(1 for t in trials if t.number < trial.number
                and (_counted(t, trials) or t.state in (TrialState.RUNNING, TrialState.WAITING)))
    if ahead < budget:
        return False
    trial.set_user_attr("surplus", True)
    study.tell(trial, state=TrialState.FAIL)
    return True


def _state_name(state) -> str:
    """A TrialState in the words the reports use."""
    return {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}.get(state.name, state.name.lower())


def tune_variant(suite: Suite, variant: str, tracker: Tracker, exp_id: str, parent_id: str, storage,
                 load_split, device, events) -> TuningResult:
    """Run the missing trials of ``variant``'s study; log trials nested under its search run."""
    import optuna
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search, space, exp = suite.search, suite.search_space(variant), suite.experiments[variant]
    name = study_name(suite, variant)
    study = optuna.create_study(storage=storage, study_name=name, direction=search.direction, load_if_exists=True,
                                sampler=make_sampler(search, space), pruner=make_pruner(search, exp.train.epochs))
    study.sampler = make_sampler(search, space, resumed_at=len(study.get_trials(deepcopy=False)))
    study.set_user_attr("cnnbench.suite", suite.name)
    study.set_user_attr("cnnbench.variant", variant)
    search_run = _search_run(tracker, exp_id, parent_id, suite, variant, name, exp, space)
    result = TuningResult(variant, name, None, None)
    shared = heartbeat_enabled(storage)  # several workers may tune this study at once (cnnbench.workqueue)
    try:
        while True:
            raise_if_interrupted()
            if shared:
                fail_stale(study)  # a dead worker's trial: failed, its MLflow run ended, a copy re-queued
            trials = study.get_trials(deepcopy=False)
            done = sum(_counted(t, trials) for t in trials)
            waiting = sum(t.state == TrialState.WAITING for t in trials)
            running = sum(t.state == TrialState.RUNNING for t in trials) if shared else 0
            if done + running + waiting >= search.trials and not waiting:
                if not running:
                    break
                time.sleep(POLL_S)  # the budget is taken: wait for the other workers' trials
                continue
            trial = ask(study)  # pops a re-queued trial first
            if shared and over_budget(study, trial, search.trials):
                continue
            spec = RunSpec(suite.name, variant, TUNING_SEED_BASE, exp, study=name, trial=trial.number)
            events.trial_start(spec, done, search.trials)
            with heartbeat(study, trial):
                trial.set_user_attr("worker", worker_id())
                state, value, message = _run_trial(suite, variant, exp, space, trial, study, tracker, exp_id,
                                                   search_run, load_split, device, events, spec)
            result.ran += 1
            events.trial_end(spec, state, value, message)
    except (KeyboardInterrupt, Interrupted):
        if not shared:  # other workers may still be tuning it: the last one ends the search run
            tracker.log(search_run, tags={"cnnbench.status": "killed"})
            tracker.end_run(search_run, "KILLED")  # reused, and finished, when the search resumes
        raise

    all_trials = study.get_trials(deepcopy=False)
    trials = [t for t in all_trials if _counted(t, all_trials)]
    result.counts = Counter(_state_name(t.state) for t in trials)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        result.best_params, result.best_value = dict(best.params), best.value
    _finish_search_run(tracker, search_run, study, trials, result, space, search, exp.train.epochs)
    return result


def _search_run(tracker: Tracker, exp_id: str, parent_id: str, suite: Suite, variant: str, name: str,
                exp: Experiment, space: dict[str, ParamSpec]) -> str:
    """The variant's search run: created once per study and reused when the search resumes."""
    found = tracker.search(exp_id, f"tags.`cnnbench.study` = '{name}' and tags.`cnnbench.role` = '{ROLE_SEARCH}'")
    if found:
        return sorted(found, key=lambda r: r.info.start_time)[0].info.run_id
    run_id = tracker.start_run(
        exp_id, f"{variant}/search",
        {"cnnbench.suite": suite.name, "cnnbench.variant": variant, "cnnbench.role": ROLE_SEARCH,
         "cnnbench.study": name, "cnnbench.status": "running"},
        parent_id,
    )
    params = {f"search.{k}": v for k, v in suite.search.model_dump(mode="json", exclude={"space", "trials"}).items()}
    params |= {f"space.{k}": v.model_dump(mode="json", exclude_none=True) for k, v in space.items()}
    tracker.log(run_id, params=params | flatten(exp.model_dump(mode="json")))
    return run_id


def _run_trial(suite, variant, exp, space, trial, study, tracker, exp_id, search_run, load_split, device, events,
               spec: RunSpec):
    """Train one trial on the tuning seeds; tell Optuna how it ended. Returns (state, value, message)."""
    import optuna
    from optuna.trial import TrialState

    from cnnbench.train import train

    search = suite.search
    run_id = tracker.start_run(
        exp_id, f"{variant}/trial{trial.number}",
        {"cnnbench.suite": suite.name, "cnnbench.variant": variant, "cnnbench.role": ROLE_TRIAL,
         "cnnbench.trial": str(trial.number), "cnnbench.study": study.study_name, "cnnbench.status": "running",
         "cnnbench.worker": worker_id()},
        search_run,
    )
    trial.set_user_attr("mlflow_run_id", run_id)
    params = suggest(trial, space)
    buffered = BufferedRun(tracker, run_id, params=params | {"tuning_seeds": search.tuning_seeds})
    epochs_run, values = 0.0, []  # epochs trained, fractions of one included (a trial pruned mid-epoch)

    def finish(state: TrialState, value: float | None, mlflow_status: str, reason: str = "") -> tuple[str, float | None, str]:
        trial.set_user_attr("epochs_run", round(epochs_run, 4))
        if reason:
            trial.set_user_attr("reason", reason[:2000])
        study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        metrics = {"epochs_run": epochs_run} | ({"objective": value} if value is not None else {})
        tags = {"cnnbench.trial_state": _state_name(state), "cnnbench.status": "finished"}
        if reason:
            tags["cnnbench.reason"] = reason[:5000]
        buffered.flush(metrics=metrics, tags=tags, step=math.ceil(epochs_run))  # MLflow steps are integers
        tracker.end_run(run_id, mlflow_status)
        return tags["cnnbench.trial_state"], value, reason

    try:
        cfg = configure(exp, params)
        split = load_split(cfg)
        per_epoch = search.reports_per_epoch if search.pruner != "none" else 1  # no pruner: nobody reads them
        for k in range(search.tuning_seeds):
            before = epochs_run  # epochs of the earlier tuning seeds

            def report(epochs: float, value: float) -> None:  # the first seed's validation drives pruning
                trial.report(value, round(epochs * per_epoch))  # step: 1/reports_per_epoch of an epoch
                if trial.should_prune():
                    raise optuna.TrialPruned()

            def on_check(epochs: float, record: dict, before: float = before) -> None:
                nonlocal epochs_run
                epochs_run = before + epochs
                report(epochs, record[search.metric])
                raise_if_interrupted()

            def on_epoch(record: dict, first: bool = k == 0, before: float = before) -> None:
                nonlocal epochs_run
                epochs_run = before + record["epoch"]
                if first:  # the first tuning seed's curve is logged and drives pruning
                    buffered.log_epoch(record)
                    events.epoch(spec, record)
                    report(record["epoch"], record[search.metric])
                raise_if_interrupted()

            run = train(cfg, TUNING_SEED_BASE + k, split, device, on_epoch=on_epoch, evaluate_test=False,
                        on_batch=interruptible(events.batch), on_check=on_check if k == 0 else None,
                        checks_per_epoch=per_epoch)
            if run.status == "diverged":
                return finish(TrialState.FAIL, None, "FINISHED", run.message)
            values.append(run.history[-1][search.metric])
    except optuna.TrialPruned:
        return finish(TrialState.PRUNED, None, "FINISHED", f"pruned after {epochs_run:g} epochs")
    except (KeyboardInterrupt, Interrupted):
        trial.set_user_attr("interrupted", True)
        finish(TrialState.FAIL, None, "KILLED", "interrupted")
        raise
    except Exception as e:  # noqa: BLE001 - a trial that raises is FAILED and the search goes on
        tracker.log_artifacts(run_id, {"traceback.txt": traceback.format_exc()})
        return finish(TrialState.FAIL, None, "FAILED", f"{type(e).__name__}: {e}")
    value = sum(values) / len(values)
    if not math.isfinite(value):
        return finish(TrialState.FAIL, None, "FINISHED", f"objective is {value}")
    state, value, _ = finish(TrialState.COMPLETE, value, "FINISHED")
    return state, value, ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _finish_search_run(tracker, run_id, study, trials, result: TuningResult, space, search: SearchConfig,
                       epochs: int) -> None:
    """Best params and value, trial counts, epochs saved by pruning, importances and the trials table."""
    import optuna

    full = epochs * search.tuning_seeds
    epochs_run = sum(t.user_attrs.get("epochs_run", 0) for t in trials)
    saved = sum(full - t.user_attrs.get("epochs_run", full) for t in trials if _state_name(t.state) == "pruned")
    metrics = {f"trials_{k}": result.counts.get(k, 0) for k in ("complete", "pruned", "failed")}
    metrics |= {"trials_budget": search.trials, "epochs_run": epochs_run, "epochs_saved_by_pruning": saved,
                "epochs_saved_fraction": saved / (full * len(trials)) if trials else 0.0}
    tags = {"cnnbench.status": "finished" if result.best_params is not None else "failed"}
    if result.best_params is not None:
        metrics["best_value"] = result.best_value
        metrics["best_trial"] = study.best_trial.number
        tags |= {f"best.{k}": str(v) for k, v in result.best_params.items()}
        if len(space) >= 2 and result.counts.get("complete", 0) >= 2:
            try:  # pinned: Optuna 5 changed the default evaluator to PED-ANOVA
                evaluator = optuna.importance.FanovaImportanceEvaluator(seed=search.sampler_seed)
                importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
                metrics |= {f"importance.{k}": v for k, v in importances.items()}
            except (RuntimeError, ValueError) as e:
                logging.getLogger(__name__).warning("param importances not computed: %s", e)
    else:
        tags["cnnbench.reason"] = f"no trial completed ({dict(result.counts)})"
    tracker.log(run_id, metrics=metrics, tags=tags)
    table = study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration"))
    tracker.log_artifacts(run_id, {"trials.csv": table.to_csv(index=False),
                                   "best_params.yaml": yaml.safe_dump(result.best_params or {}, sort_keys=False)})
    tracker.end_run(run_id, "FINISHED")
