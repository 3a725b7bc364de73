"""What pruning buys a search, and what a trial costs in bookkeeping.

1. The same search (same space, TPE sampler seed, tuning seed) run twice — with the median pruner
   and without — on real MNIST (LeNet-5, 10,000 training images by default): the fraction of
   training epochs pruning saved, and the gap in best validation accuracy it cost.
2. Per-trial overhead of the storage alone (ask + report per epoch + user attrs + tell with a
   trivial objective) on the journal file cnnbench uses by default and on Optuna's SQLite storage,
   and of MLflow per trial (from the tracker's timed calls in the real searches above).

    python benchmarks/search_pruning.py [--trials 24] [--epochs 4] [--dataset mnist] [--limit-train 10000]
        [--pruners median:pruner_startup_trials=2,successive_halving] [--sampler-seed 0]

A pruner is ``name[:setting=value…]`` (settings of the suite's ``search:`` block). cnnbench's default pruner
settings are always measured; the last line is theirs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import optuna

from cnnbench.config import Experiment, SearchConfig, Suite
from cnnbench.events import Events
from cnnbench.optuna_storage import open_storage
from cnnbench.search import tune_variant
from cnnbench.tracking import Tracker


def default_pruner() -> str:
    """cnnbench's default pruner settings, as a ``name:setting=value…`` spec."""
    d = SearchConfig()
    return f"{d.pruner}:pruner_startup_trials={d.pruner_startup_trials}"


def make_suite(args, pruner: str) -> Suite:
    name, *settings = pruner.split(":")
    exp = Experiment.model_validate({
        "data": {"dataset": args.dataset, "batch_size": 128, "val_fraction": 0.1, "limit_train": args.limit_train},
        "model": {"name": "lenet5"},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": args.epochs},
        "device": "cpu",
    })
    search = SearchConfig.model_validate({
        "trials": args.trials, "sampler": "tpe", "sampler_seed": args.sampler_seed, "pruner": name,
        **{k: float(v) if "." in v else int(v) for k, v in (kv.split("=") for kv in settings)},
        "space": {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1.0, "log": True},
                  "optimizer.momentum": {"type": "float", "low": 0.0, "high": 0.99}},
    })
    suite = Suite(name=f"bench_{name}", question="pruning", base=exp, variants={"sgd": {}}, baseline="sgd",
                  search=search)
    suite.experiments["sgd"] = exp
    suite.search_spaces["sgd"] = dict(search.space)
    return suite


def run_search(args, pruner: str, tmp: Path) -> dict:
    import torch

    from cnnbench import data as datamod

    suite = make_suite(args, pruner)
    label = pruner.replace(":", "_").replace("=", "")
    tracker = Tracker(f"sqlite:///{tmp}/mlflow_{label}.db")
    storage = open_storage(str(tmp / f"{label}.journal"))
    exp_id = tracker.experiment_id(suite.name)
    parent = tracker.start_run(exp_id, "bench", {"cnnbench.suite": suite.name, "cnnbench.role": "suite"})
    mlflow_before = tracker.seconds

    def load_split(cfg):
        return datamod.split(datamod.load(cfg.data), cfg.data.val_fraction, cfg.data.limit_train)

    load_split(suite.experiments["sgd"])  # data load outside the timing
    t0 = time.perf_counter()
    result = tune_variant(suite, "sgd", tracker, exp_id, parent, storage, load_split, torch.device("cpu"), Events())
    wall = time.perf_counter() - t0
    study = optuna.load_study(study_name=result.study, storage=storage)
    epochs = sum(t.user_attrs.get("epochs_run", 0) for t in study.trials)
    return {"best": result.best_value, "epochs": epochs, "wall": wall, "counts": dict(result.counts),
            "mlflow_per_trial_ms": 1000 * (tracker.seconds - mlflow_before) / len(study.trials)}


def storage_overhead(url: str, trials: int, epochs: int) -> float:
    """Median ms per trial of pure storage work: ask, one report per epoch, two user attrs, tell."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(storage=open_storage(url), study_name="overhead", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=0))
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        trial = study.ask()
        x = trial.suggest_float("x", 0, 1)
        for step in range(1, epochs + 1):
            trial.report(x * step, step)
            trial.should_prune()
        trial.set_user_attr("mlflow_run_id", "0" * 32)
        trial.set_user_attr("epochs_run", epochs)
        study.tell(trial, x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=24)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--limit-train", type=int, default=10000)
    ap.add_argument("--pruners", default="", help="comma-separated pruners to compare with no pruning, besides the "
                                                 "default (name[:setting=value…])")
    ap.add_argument("--sampler-seed", type=int, default=0)
    args = ap.parse_args()
    default = default_pruner()
    candidates = [default] + [p for p in args.pruners.split(",") if p and p != default]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full = run_search(args, "none", tmp)
        pruned_runs = {p: run_search(args, p, tmp) for p in candidates}
        journal = storage_overhead(str(tmp / "overhead.journal"), 50, args.epochs)
        sqlite = storage_overhead(f"sqlite:///{tmp}/overhead.db", 50, args.epochs)
    print(f"search: {args.trials} trials × ≤{args.epochs} epochs, LeNet-5 on {args.dataset} "
          f"({args.limit_train} training images), TPE seed {args.sampler_seed}, lr (log) + momentum")
    for label, r in (("none", full), *pruned_runs.items()):
        print(f"  {label:<40}: best val acc {100 * r['best']:.2f}%, {r['epochs']:.2f} epochs trained, {r['wall']:.1f} s, "
              f"trials {r['counts']}, MLflow {r['mlflow_per_trial_ms']:.1f} ms/trial")
    for label, pruned in pruned_runs.items():
        saved = 1 - pruned["epochs"] / full["epochs"]
        gap_pp = 100 * (full["best"] - pruned["best"])
        print(f"{label}: epochs saved {saved:.1%} (target ≥ 50%), wall time saved {1 - pruned['wall'] / full['wall']:.1%}, "
              f"best validation accuracy gap {gap_pp:+.2f} pp (no pruning − pruning; target ≤ 0.3 pp)")
    print(f"storage per trial (ask + {args.epochs} reports + tell), median of 50: journal {journal:.1f} ms, "
          f"SQLite {sqlite:.1f} ms")
    d = pruned_runs[default]
    print(f"default pruner: {100 * (1 - d['epochs'] / full['epochs']):.0f}% epochs saved, "
          f"best-val gap {100 * (full['best'] - d['best']):.2f} pp")


if __name__ == "__main__":
    main()
