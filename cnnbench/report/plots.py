"""The report's PNGs (matplotlib, Agg backend). Each ``plot_*`` returns False, writing nothing, when
there is nothing to draw."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from cnnbench import stats
from cnnbench.config import Suite
from cnnbench.metrics import metric
from cnnbench.report.selection import common, per_seed, primary_higher_is_better

TRADEOFFS = (("latency", "latency_bs64_p50_ms", "inference latency at batch 64, p50 (ms)"),
             ("size", "model_size_bytes", "model size (KiB, serialized deployed tensors)"))


@contextmanager
def figure(path: Path, figsize: tuple[float, float], nrows: int = 1, ncols: int = 1, dpi: int = 110,
           **subplots) -> Iterator[tuple]:
    """``(fig, axes)`` of a new figure on the Agg backend; on a clean exit it is laid out and saved to
    ``path``; closed in any case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=figsize, dpi=dpi, **subplots)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _axis_label(name: str) -> str:
    fmt = metric(name)
    return fmt.label + (" (%)" if fmt.fmt == "pct" else "")


def _scale(name: str) -> float:
    return 100 if metric(name).fmt == "pct" else 1


def plot_curves(suite: Suite, runs: pd.DataFrame, history: pd.DataFrame, path: Path) -> bool:
    """Validation accuracy per epoch and against training time, mean ± sd over seeds; and the training
    against the validation loss per epoch (mean over seeds): where they part, the model overfits."""
    if history.empty:
        return False
    wide = history.pivot_table(index=["run_id", "step"], columns="key", values="value").reset_index()
    wide = wide.merge(runs[["run_id", "variant", "seed"]], on="run_id")
    with figure(path, (16, 4), 1, 3) as (fig, (ax_e, ax_t, ax_l)):
        for i, variant in enumerate(suite.variants):
            sub = wide[wide["variant"] == variant]
            if sub.empty or "val_accuracy" not in sub:
                continue
            by_epoch = sub.groupby("step")
            mean, sd = by_epoch["val_accuracy"].mean() * 100, by_epoch["val_accuracy"].std(ddof=1).fillna(0) * 100
            color = f"C{i}"
            style = "-" if variant != suite.baseline else "--"
            ax_e.plot(mean.index, mean.values, style, color=color, label=variant, marker="o", ms=3)
            ax_e.fill_between(mean.index, mean - sd, mean + sd, color=color, alpha=0.2)
            if "train_time_cum_s" in sub:
                t = by_epoch["train_time_cum_s"].mean()
                ax_t.plot(t.values, mean.values, style, color=color, label=variant, marker="o", ms=3)
                ax_t.fill_between(t.values, mean - sd, mean + sd, color=color, alpha=0.2)
            if {"train_loss", "val_loss"} <= set(sub):
                ax_l.plot(mean.index, by_epoch["val_loss"].mean().values, "-", color=color, label=f"{variant} validation")
                ax_l.plot(mean.index, by_epoch["train_loss"].mean().values, ":", color=color, label=f"{variant} training")
        for ax, xlabel in ((ax_e, "epoch"), (ax_t, "training time (s, mean over seeds)")):
            ax.set_xlabel(xlabel)
            ax.set_ylabel("validation accuracy (%)")
            ax.grid(alpha=0.3)
        target = common(suite, lambda e: e.train.target_accuracy)
        if target:
            for ax in (ax_e, ax_t):
                ax.axhline(target * 100, color="grey", lw=0.8, ls=":")
        ax_e.legend(fontsize=8)
        ax_l.set_xlabel("epoch")
        ax_l.set_ylabel("loss (mean over seeds; log scale)")
        ax_l.set_title("training (dotted) vs validation (solid) loss: the gap is overfitting", fontsize=9)
        ax_l.grid(alpha=0.3)
        if ax_l.lines:
            ax_l.set_yscale("log")
        fig.suptitle(f"{suite.name}: validation accuracy (mean ± std over seeds); training vs validation loss")
    return True


def plot_bars(suite: Suite, runs: pd.DataFrame, path: Path) -> bool:
    """The primary metric per variant: mean ± sd bars with one dot per seed."""
    primary = suite.report.primary
    col = f"metrics.{primary}"
    fin = runs[runs["status"] == "finished"]
    if col not in fin or fin[col].dropna().empty:
        return False
    label, scale = metric(primary).label, _scale(primary)
    names = list(suite.variants)
    values = [pd.to_numeric(fin[fin["variant"] == v][col], errors="coerce").dropna() * scale for v in names]
    with figure(path, (max(4, 1.1 * len(names) + 2), 3.6)) as (_, ax):
        means = [v.mean() if len(v) else float("nan") for v in values]
        sds = [v.std(ddof=1) if len(v) > 1 else 0 for v in values]
        colors = ["grey" if n == suite.baseline else f"C{i}" for i, n in enumerate(names)]
        ax.bar(names, means, yerr=sds, color=colors, capsize=4, alpha=0.85)
        for i, v in enumerate(values):
            ax.scatter([i] * len(v), v, color="black", s=10, zorder=3)
        finite = [x for v in values for x in v]
        if finite and min(finite) >= 0:  # bars start at zero: a cut axis would exaggerate differences
            ax.set_ylim(0, max(finite) * 1.08)
        ax.set_ylabel(_axis_label(primary))
        ax.set_title(f"{suite.name}: {label} per variant (mean ± std, dots = seeds)", fontsize=9)
        ax.tick_params(axis="x", rotation=20)
    return True


def plot_tuning(suite: Suite, trials: pd.DataFrame, path: Path) -> bool:
    """Optimization history per variant: complete trials, pruned ones at their last value, best so far."""
    if trials.empty:
        return False
    name = suite.search.metric
    scale = _scale(name)
    names = [v for v in suite.variants if v in set(trials["variant"])]
    cols = min(4, len(names))
    nrows = math.ceil(len(names) / cols)
    with figure(path, (3.2 * cols + 1, 2.9 * nrows + 0.4), nrows, cols, sharey=True, squeeze=False) as (fig, axes):
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        for ax, variant in zip(axes.flat, names):
            t = trials[trials["variant"] == variant].sort_values("trial")
            state = t.get("tags.cnnbench.trial_state", pd.Series(dtype=str))
            done = t[state == "complete"]
            y = pd.to_numeric(done.get("metrics.objective"), errors="coerce") * scale
            ax.scatter(done["trial"], y, s=14, color="C0", label="complete", zorder=3)
            pruned = t[state == "pruned"]
            if not pruned.empty and f"metrics.{name}" in pruned:
                ax.scatter(pruned["trial"], pd.to_numeric(pruned[f"metrics.{name}"], errors="coerce") * scale,
                           s=14, marker="x", color="grey", label="pruned (last value)")
            if not y.empty:
                best = y.cummax() if suite.search.direction == "maximize" else y.cummin()
                ax.step(done["trial"], best, where="post", color="C3", label="best so far")
            ax.set_title(variant, fontsize=9)
            ax.set_xlabel("trial")
        for row in axes:
            row[0].set_ylabel(_axis_label(name))
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"{suite.name}: optimization history ({suite.search.sampler}, {suite.search.pruner} pruner)",
                     fontsize=9)
    return True


def plot_forest(suite: Suite, comps: dict, path: Path) -> bool:
    """Δ of the primary metric vs the baseline with its CI, one line per variant."""
    primary = suite.report.primary
    results = {v: r for v, r in comps[primary].items()
               if r.n >= 2 and r.method != "fact" and math.isfinite(r.low) and math.isfinite(r.high)}
    if not results:
        return False
    scale = _scale(primary)
    names = list(results)[::-1]
    colors = {"better": "C2", "worse": "C3", "equivalent": "C0"}
    with figure(path, (6.5, 0.45 * len(names) + 1.4)) as (_, ax):
        margin = next((r.margin for r in results.values() if r.margin), None)
        if margin:
            ax.axvspan(-margin * scale, margin * scale, color="C0", alpha=0.1, lw=0)
        for i, v in enumerate(names):
            r = results[v]
            ax.errorbar(r.delta * scale, i, xerr=[[(r.delta - r.low) * scale], [(r.high - r.delta) * scale]], fmt="o",
                        color=colors.get(r.verdict, "grey"), capsize=4)
            ax.annotate(r.verdict, (r.high * scale, i), xytext=(6, -3), textcoords="offset points", fontsize=7)
        ax.axvline(0, color="grey", lw=0.8, ls="--")
        ax.set_yticks(range(len(names)), [v if suite.reference(v) == suite.baseline else f"{v} vs {suite.reference(v)}"
                                          for v in names])
        unit = " (pp)" if metric(primary).fmt == "pct" else ""
        ax.set_xlabel(f"Δ {metric(primary).label} vs {suite.baseline}{unit}, simultaneous {1 - suite.report.alpha:.0%} CI")
        ax.set_title(f"{suite.name}: paired differences (green better, red worse, blue equivalent, grey inconclusive"
                     + ("; shaded: ±margin)" if margin else ")"), fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    return True


def _front(points: dict[str, tuple[float, float]], x_higher: bool, y_higher: bool) -> list[str]:
    """The Pareto-optimal keys of ``points`` (x, y): no other point is as good on both and better on one."""
    def as_good(a: float, b: float, higher: bool) -> bool:
        return a >= b if higher else a <= b

    return [v for v, (x, y) in points.items()
            if not any(as_good(x2, x, x_higher) and as_good(y2, y, y_higher) and (x2, y2) != (x, y)
                       for x2, y2 in points.values())]


def plot_pareto(suite: Suite, runs: pd.DataFrame, path: Path) -> bool:
    """Primary metric against training throughput (mean per variant); the Pareto front is joined."""
    primary = suite.report.primary
    points = {}
    for v in suite.variants:
        y, x = per_seed(runs, v, primary), per_seed(runs, v, "train_throughput")
        if y and x:
            points[v] = (sum(x.values()) / len(x), sum(y.values()) / len(y))
    if len(points) < 2:
        return False
    label, scale = metric(primary).label, _scale(primary)
    front = _front(points, x_higher=True, y_higher=primary_higher_is_better(suite))
    with figure(path, (6.5, 4)) as (_, ax):
        for i, (v, (x, y)) in enumerate(points.items()):
            ax.scatter(x, y * scale, color="grey" if v == suite.baseline else f"C{i}", zorder=3,
                       marker="*" if v in front else "o", s=80 if v in front else 30)
            ax.annotate(v, (x, y * scale), xytext=(5, 3), textcoords="offset points", fontsize=8)
        fx = sorted(points[v] for v in front)
        ax.plot([p[0] for p in fx], [p[1] * scale for p in fx], color="grey", lw=0.8, ls=":")
        ax.set_xlabel("training throughput (images/s, mean over seeds)")
        ax.set_ylabel(_axis_label(primary))
        ax.set_title(f"{suite.name}: {label} vs speed (stars: Pareto-optimal)", fontsize=9)
        ax.grid(alpha=0.3)
    return True


def _mean_sd(values: dict[int, float]) -> tuple[float, float]:
    v = list(values.values())
    mean = sum(v) / len(v)
    sd = (sum((x - mean) ** 2 for x in v) / (len(v) - 1)) ** 0.5 if len(v) > 1 else 0.0
    return mean, sd


def plot_tradeoff(suite: Suite, runs: pd.DataFrame, x_metric: str, xlabel: str, path: Path) -> bool:
    """Primary metric against ``x_metric`` (lower is better): mean over seeds with ± sd error bars on both
    axes; Pareto-optimal variants starred and joined."""
    primary = suite.report.primary
    points = {}
    for v in suite.variants:
        y, x = per_seed(runs, v, primary), per_seed(runs, v, x_metric)
        if y and x:
            points[v] = (_mean_sd(x), _mean_sd(y))
    if len(points) < 2:
        return False
    label, scale = metric(primary).label, _scale(primary)
    xscale = {"kib": 1 / 1024, "bytes": 1 / 2**20}.get(metric(x_metric).fmt, 1)
    means = {v: (x[0], y[0]) for v, (x, y) in points.items()}
    front = _front(means, x_higher=False, y_higher=primary_higher_is_better(suite))
    with figure(path, (6.5, 4)) as (_, ax):
        for i, (v, ((x, xs), (y, ys))) in enumerate(points.items()):
            ax.errorbar(x * xscale, y * scale, xerr=xs * xscale, yerr=ys * scale, fmt="*" if v in front else "o",
                        ms=11 if v in front else 5, color="grey" if v == suite.baseline else f"C{i}", capsize=3,
                        zorder=3)
            ax.annotate(v, (x * xscale, y * scale), xytext=(5, 3), textcoords="offset points", fontsize=8)
        fx = sorted(means[v] for v in front)
        ax.plot([p[0] * xscale for p in fx], [p[1] * scale for p in fx], color="grey", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel + ", log scale")
        ax.set_ylabel(_axis_label(primary))
        ax.set_title(f"{suite.name}: {label} vs {x_metric} (mean ± sd over seeds; stars: Pareto-optimal)", fontsize=8)
        ax.grid(alpha=0.3)
    return True


def compression_plots(suite: Suite, runs: pd.DataFrame, reports_dir: Path) -> dict[str, Path]:
    """Issue 6: the primary metric against latency and against size, where there are two variants to show."""
    out = {}
    for name, x_metric, label in TRADEOFFS:
        path = reports_dir / f"{suite.name}_{name}.png"
        if plot_tradeoff(suite, runs, x_metric, label, path):
            out[name] = path
    return out


def plot_profiles(metas: list[dict], path: Path) -> bool:
    """One panel per suite with a time-to-target record; one line per variant, τ in [1, 4]."""
    import numpy as np

    panels = []
    for meta in metas:
        ttt = meta.get("time_to_target") or {}
        seeds = sorted({s for per in ttt.values() for s in per}, key=int)
        if not seeds or not any(t is not None for per in ttt.values() for t in per.values()):
            continue
        times = {v: [math.inf if per.get(s) is None else per[s] for s in seeds] for v, per in ttt.items() if per}
        panels.append((meta["name"], times))
    if not panels:
        return False
    taus = np.linspace(1, 4, 121)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    with figure(path, (4.2 * cols, 3.2 * nrows), nrows, cols, dpi=100, squeeze=False, sharey=True) as (_, axes):
        for ax, (name, times) in zip(axes.flat, panels):
            for i, (variant, rho) in enumerate(stats.performance_profile(times, taus).items()):
                ax.step(taus, rho, where="post", label=variant, color=f"C{i}", lw=1.2)
            ax.set_title(name, fontsize=9)
            ax.set_xlabel("τ (× fastest time to target)")
            ax.set_ylim(-0.02, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        for row in axes:
            row[0].set_ylabel("fraction of cases")
    return True
