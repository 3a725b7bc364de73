"""The report's Architecture search section: the Pareto front of the trials, and what its retrained members
cost and score against the hand-designed models."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from cnnbench.architecture_search import PREFIX, RUN_METRIC, study_name
from cnnbench.config import TUNING_SEED_BASE, Suite
from cnnbench.metrics import metric
from cnnbench.report.plots import figure
from cnnbench.report.selection import per_seed
from cnnbench.report.tables import delta_ci, n_of, ratio
from cnnbench.tracking import ROLE_TRIAL

COST_LABEL = {"params": "parameters", "flops": "FLOPs per image (forward)", "latency_bs1_ms": "latency at batch 1, p50 (ms)"}


def trials_frame(suite: Suite, frame: pd.DataFrame) -> pd.DataFrame:
    """The current study's completed trials: ``trial``, ``val_accuracy``, ``cost`` and ``front`` (Pareto-optimal)."""
    cost = suite.architecture_search.cost
    if frame.empty or "tags.cnnbench.study" not in frame:
        return pd.DataFrame(columns=["trial", "val_accuracy", "cost", "front"])
    sub = frame[(frame["tags.cnnbench.study"] == study_name(suite)) & (frame["tags.cnnbench.role"] == ROLE_TRIAL)
                & (frame.get("tags.cnnbench.trial_state") == "complete")]
    out = pd.DataFrame({"trial": pd.to_numeric(sub["tags.cnnbench.trial"], errors="coerce"),
                        "val_accuracy": pd.to_numeric(sub.get("metrics.val_accuracy"), errors="coerce"),
                        "cost": pd.to_numeric(sub.get(f"metrics.{cost}"), errors="coerce")}).dropna()
    out["front"] = [not ((out["val_accuracy"] >= a) & (out["cost"] <= c) & ((out["val_accuracy"] > a) | (out["cost"] < c))).any()
                    for a, c in zip(out["val_accuracy"], out["cost"])]
    return out.sort_values("trial")


def _mean(runs: pd.DataFrame, variant: str, name: str) -> float:
    values = list(per_seed(runs, variant, name).values())
    return sum(values) / len(values) if values else math.nan


def plot_architecture_search(suite: Suite, trials: pd.DataFrame, front_members: list[dict], runs: pd.DataFrame,
                             path: Path) -> bool:
    """Left: every trial's validation accuracy against its cost, the front joined. Right: each variant's test
    accuracy over the suite's seeds (mean ± sd) against its cost — front members and hand-designed models."""
    if trials.empty:
        return False
    cost, primary = suite.architecture_search.cost, suite.report.primary
    run_cost = RUN_METRIC[cost]
    with figure(path, (13, 4.5), 1, 2) as (fig, (ax_s, ax_r)):
        rest, front = trials[~trials["front"]], trials[trials["front"]].sort_values("cost")
        ax_s.scatter(rest["cost"], 100 * rest["val_accuracy"], color="0.6", s=18, label="trial")
        ax_s.plot(front["cost"], 100 * front["val_accuracy"], "o-", color="C3", ms=5, label="Pareto front")
        for m in front_members:  # the retrained ones, by name
            ax_s.annotate(m["name"], (m["cost"], 100 * m["val_accuracy"]), textcoords="offset points", xytext=(4, -10),
                          fontsize=8)
        ax_s.set(xscale="log", xlabel=COST_LABEL[cost], ylabel="validation accuracy (%)",
                 title=f"search: {len(trials)} complete trials ({suite.architecture_search.sampler})")
        ax_s.legend(fontsize=8)
        scale = 100 if metric(primary).fmt == "pct" else 1
        for v in suite.compared():
            xs, ys = list(per_seed(runs, v, run_cost).values()), list(per_seed(runs, v, primary).values())
            if not xs or not ys:
                continue
            y = pd.Series(ys) * scale
            found = v.startswith(PREFIX)
            ax_r.errorbar(sum(xs) / len(xs), y.mean(), yerr=y.std(ddof=1) if len(y) > 1 else 0, fmt="o",
                          color="C3" if found else "C0", capsize=3)
            ax_r.annotate(v, (sum(xs) / len(xs), y.mean()), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax_r.set(xscale="log", xlabel=COST_LABEL[cost] + " (as run)", ylabel=metric(primary).label + (" (%)" if scale == 100 else ""),
                 title="retrained over the suite's seeds: found (red), hand-designed (blue)")
        from matplotlib.ticker import FuncFormatter, NullFormatter

        for ax in (ax_s, ax_r):
            low, high = ax.get_xlim()
            if high < 10 * low:  # less than a decade: a log axis would show no labelled tick
                ax.set_xscale("linear")
            else:
                ax.xaxis.set_minor_formatter(NullFormatter())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}" if x >= 10 else f"{x:g}"))
            ax.margins(x=0.12)
    return True


def architecture_lines(suite: Suite, frame: pd.DataFrame, runs: pd.DataFrame, comps: dict, reports_dir: Path,
                       front: list[dict]) -> list[str]:
    """The Architecture search section."""
    nas = suite.architecture_search
    if nas is None:
        return []
    trials = trials_frame(suite, frame)
    path = reports_dir / f"{suite.name}_architectures.png"
    seeds = ", ".join(str(TUNING_SEED_BASE + k) for k in range(nas.tuning_seeds))
    start = suite.search_start()
    lines = [
        "## Architecture search", "",
        f"A multi-objective search ({nas.trials} trials of the `{nas.sampler}` sampler, seed {nas.sampler_seed}"
        + (f", population {nas.population_size}" if nas.sampler == "nsga2" else "")
        + f") over {', '.join(f'`{k}`' for k in nas.space)} of `{start}`: validation accuracy up and "
        f"{COST_LABEL[nas.cost]} down, each trial trained as `{start}` is ("
        f"{n_of(suite.experiments[start].train.epochs, 'epoch')}) on tuning seed(s) {seeds}, never on the test set. "
        f"Up to {nas.retrain} members of the Pareto front, spread along it by cost"
        + (f" and at least {nas.min_accuracy:.1%} validation accuracy" if nas.min_accuracy is not None else "")
        + ", are retrained over the suite's seeds as `nas_1` (cheapest) … and compared with the baseline above.", "",
    ]
    if trials.empty:
        return lines + ["No architecture search has been recorded for the current suite yet.", ""]
    cost, primary = nas.cost, suite.report.primary
    fmt, cost_fmt = metric(primary), metric(RUN_METRIC[cost])
    on_front = trials[trials["front"]]
    floor = (f", {int((on_front['val_accuracy'] >= nas.min_accuracy).sum())} of them at or above the "
             f"{nas.min_accuracy:.1%} floor" if nas.min_accuracy is not None else "")
    lines += [f"{len(trials)} trials completed; {len(on_front)} are on the Pareto front{floor}; "
              f"{len(front)} retrained.", "",
              f"| variant | knobs | {COST_LABEL[cost]} | {cost} ratio (baseline / variant) | {primary} | "
              f"Δ vs baseline | verdict |", "|---|---|---|---|---|---|---|"]
    knobs = {m["name"]: ", ".join(f"{k.split('.')[-1]}={v}" for k, v in m["params"].items()) for m in front}
    for v in suite.compared():
        r = comps.get(primary, {}).get(v)
        mean, spent = _mean(runs, v, primary), _mean(runs, v, RUN_METRIC[cost])
        lines.append(f"| `{v}`{' (baseline)' if v == suite.baseline else ''} | {knobs.get(v, 'hand-designed')} | "
                     f"{cost_fmt(spent) if not math.isnan(spent) else '–'} | "
                     f"{ratio(runs, suite, v, RUN_METRIC[cost]) if v != suite.baseline else '1×'} | "
                     f"{fmt(mean) if not math.isnan(mean) else '–'} | {delta_ci(r, fmt) if r is not None else '–'} | "
                     f"{r.verdict if r is not None else '–'} |")
    lines.append("")
    if plot_architecture_search(suite, trials, front, runs, path):
        lines += [f"![architecture search: Pareto front and retrained models]({path.name})", ""]
    return lines
