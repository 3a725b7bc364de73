"""Render a suite's markdown report from MLflow alone (no torch): query → DataFrame → tables + PNGs.

Which runs belong to a report: for each (variant, seed) of the suite as it is now, the newest
run with the same plan key — so editing a variant retires its old runs from the report. When the
suite searches, the runs of its current studies' best values are preferred; untuned runs
(``--no-search``) are shown when there are none, and the table says which.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from cnnbench import stats
from cnnbench.config import CENSORED_METRICS, TUNING_SEED_BASE, Suite, plan, study_name
from cnnbench.tracking import DONE_STATUSES, ROLE_RUN, ROLE_SEARCH, ROLE_SUITE, ROLE_TRIAL, Tracker

META_PREFIX = "<!-- cnnbench-report "


# ───────────────────────────── formatting ─────────────────────────────


@dataclass(frozen=True)
class MetricFormat:
    label: str
    fmt: str  # pct | float | seconds | rate | bytes | int

    def __call__(self, v: float) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return {
            "pct": lambda: f"{100 * v:.2f}%",
            "float": lambda: f"{v:.4f}",
            "seconds": lambda: f"{v:.2f} s",
            "rate": lambda: f"{v:,.0f}/s",
            "bytes": lambda: f"{v / 2**20:.1f} MiB",
            "int": lambda: f"{v:,.0f}",
            "ms": lambda: f"{v:.2f} ms",
            "kib": lambda: f"{v / 1024:,.1f} KiB",
        }[self.fmt]()

    def delta(self, v: float) -> str:
        if v is None or math.isnan(v):
            return "–"
        if self.fmt == "pct":
            return f"{100 * v:+.2f} pp"
        return {"seconds": f"{v:+.2f} s", "rate": f"{v:+,.0f}/s", "bytes": f"{v / 2**20:+.1f} MiB",
                "int": f"{v:+,.0f}", "ms": f"{v:+.2f} ms", "kib": f"{v / 1024:+,.1f} KiB"}.get(self.fmt, f"{v:+.4f}")


METRICS = {
    "test_accuracy": MetricFormat("test acc", "pct"),
    "val_accuracy": MetricFormat("val acc", "pct"),
    "precision_macro": MetricFormat("precision (macro)", "pct"),
    "recall_macro": MetricFormat("recall (macro)", "pct"),
    "f1_macro": MetricFormat("F1 (macro)", "pct"),
    "test_loss": MetricFormat("test loss", "float"),
    "train_time_s": MetricFormat("train time", "seconds"),
    "time_to_target_s": MetricFormat("time to target", "seconds"),
    "epochs_to_target": MetricFormat("epochs to target", "float"),
    "train_throughput": MetricFormat("train img/s", "rate"),
    "peak_memory_bytes": MetricFormat("peak memory", "bytes"),
    "params": MetricFormat("params", "int"),
    # inference and compression (issue 6)
    "latency_bs1_p50_ms": MetricFormat("latency bs1 p50", "ms"),
    "latency_bs1_p95_ms": MetricFormat("latency bs1 p95", "ms"),
    "latency_bs64_p50_ms": MetricFormat("latency bs64 p50", "ms"),
    "latency_bs64_p95_ms": MetricFormat("latency bs64 p95", "ms"),
    "inference_throughput": MetricFormat("inference img/s", "rate"),
    "model_size_bytes": MetricFormat("model size", "kib"),
    "nonzero_params": MetricFormat("non-zero params", "int"),
    "flops": MetricFormat("FLOPs/sample", "int"),
    "sparsity": MetricFormat("sparsity", "pct"),
    "compress_time_s": MetricFormat("compression time", "seconds"),
}


def metric_format(name: str) -> MetricFormat:
    return METRICS.get(name, MetricFormat(name, "float"))


def mean_std(values: pd.Series, fmt: MetricFormat) -> str:
    """``mean ± sd`` over seeds (sample std), or the single value."""
    values = values.dropna()
    if values.empty:
        return "–"
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return fmt(values.mean()) if sd == 0 else f"{fmt(values.mean())} ± {fmt(sd)}"


# ───────────────────────────── selecting runs ─────────────────────────────


def select_runs(suite: Suite, frame: pd.DataFrame) -> pd.DataFrame:
    """One row per planned (variant, seed): the newest matching run, preferring a finished/diverged one,
    and a tuned run (``tuned`` column) over an untuned one when the suite searches."""
    rows = []
    runs = frame[frame.get("tags.cnnbench.role", pd.Series(dtype=str)) == ROLE_RUN] if not frame.empty else frame
    keys = pd.Series(dtype=str)
    if not runs.empty:  # runs from before plan keys existed are matched on their fingerprint
        keys = runs["tags.cnnbench.fingerprint"]
        if "tags.cnnbench.plan_key" in runs:
            keys = runs["tags.cnnbench.plan_key"].fillna(keys)
    untuned = plan(suite)
    tuned = plan(suite, {v: e for v, e in suite.experiments.items()}) if suite.search is not None else untuned
    for spec, tuned_spec in zip(untuned, tuned):
        row = {"variant": spec.variant, "seed": spec.seed, "status": "missing", "run_id": None, "tuned": False}
        for key, is_tuned in ((tuned_spec.plan_key, suite.search is not None), (spec.plan_key, False)):
            match = runs[keys == key] if not runs.empty else runs
            if match.empty:
                continue
            match = match.sort_values("start_time", ascending=False)
            done = match[match["tags.cnnbench.status"].isin(DONE_STATUSES) & (match["status"] == "FINISHED")]
            best = done.iloc[0] if not done.empty else match.iloc[0]
            status = best["tags.cnnbench.status"]
            row.update(best.to_dict(), status="failed" if status == "running" else status, tuned=is_tuned)
            row["variant"], row["seed"] = spec.variant, spec.seed
            break
        rows.append(row)
    return pd.DataFrame(rows)


def tuning_frame(suite: Suite, frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The search run of each variant's current study (one row per variant) and all of its trials."""
    if suite.search is None or frame.empty or "tags.cnnbench.study" not in frame:
        return pd.DataFrame(), pd.DataFrame()
    studies = {study_name(suite, v): v for v in suite.variants}
    current = frame[frame["tags.cnnbench.study"].isin(list(studies))]
    searches = current[current["tags.cnnbench.role"] == ROLE_SEARCH].sort_values("start_time").drop_duplicates(
        "tags.cnnbench.study")
    trials = current[current["tags.cnnbench.role"] == ROLE_TRIAL].copy()
    searches = searches.assign(variant=searches["tags.cnnbench.study"].map(studies))
    trials = trials.assign(variant=trials["tags.cnnbench.study"].map(studies),
                           trial=pd.to_numeric(trials.get("tags.cnnbench.trial"), errors="coerce"))
    return searches, trials


# ───────────────────────────── tables ─────────────────────────────


def per_seed(runs: pd.DataFrame, variant: str, metric: str) -> dict[int, float]:
    """seed → value of ``metric`` for the variant's finished runs."""
    col = f"metrics.{metric}"
    fin = runs[(runs["variant"] == variant) & (runs["status"] == "finished")]
    if col not in fin:
        return {}
    values = pd.to_numeric(fin[col], errors="coerce")
    return {int(s): float(v) for s, v in zip(fin["seed"], values) if pd.notna(v)}


def comparisons(suite: Suite, runs: pd.DataFrame) -> dict[str, dict[str, stats.Paired]]:
    """metric → variant → paired comparison with the baseline (Holm across variants, per metric)."""
    metrics = list(dict.fromkeys([suite.report.primary, *suite.report.metrics]))
    # time to target is censored: compared through the Kaplan–Meier median, not as a paired mean
    metrics = [m for m in metrics if m not in CENSORED_METRICS]
    out = {}
    for m in metrics:
        values = {v: per_seed(runs, v, m) for v in suite.variants}
        out[m] = stats.compare_all(values, suite.baseline, suite.report.alpha, suite.report.is_higher_better(m))
    return out


def time_to_target(runs: pd.DataFrame, variant: str) -> stats.TimeToTarget:
    """Censored at the run's training time when a finished or diverged run never reached the target."""
    sub = runs[(runs["variant"] == variant) & runs["status"].isin(["finished", "diverged"])]
    if "metrics.time_to_target_s" not in sub:
        return stats.TimeToTarget(0, 0, math.inf)
    t = pd.to_numeric(sub["metrics.time_to_target_s"], errors="coerce")
    total = pd.to_numeric(sub.get("metrics.train_time_s"), errors="coerce")
    return stats.time_to_target(t.dropna().tolist(), total[t.isna()].dropna().tolist())


def mean_ci(values: list[float], fmt: MetricFormat, alpha: float) -> str:
    """``mean [low, high]`` (t-interval of the mean), or the single value."""
    from scipy import stats as st

    v = [x for x in values if math.isfinite(x)]
    if not v:
        return "–"
    mean = sum(v) / len(v)
    if len(v) < 2 or len(set(v)) == 1:
        return fmt(mean)
    lo, hi = st.t.interval(1 - alpha, len(v) - 1, loc=mean, scale=st.sem(v))
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def delta_ci(r: stats.Paired | None, fmt: MetricFormat) -> str:
    if r is None or r.n == 0:
        return "–"
    if r.n < 2 or math.isnan(r.low):
        return f"{fmt.delta(r.delta)} (n={r.n})"
    if r.method == "exact":
        return f"{fmt.delta(r.delta)} (exact, n={r.n})"
    return f"{fmt.delta(r.delta)} [{fmt.delta(r.low)}, {fmt.delta(r.high)}] (n={r.n})"


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'s' * (k != 1)}"


def _p(p: float) -> str:
    return "–" if p is None or math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _counts(runs: pd.DataFrame, variant: str) -> str:
    counts = runs[runs["variant"] == variant]["status"].value_counts()
    text = "/".join(str(int(counts.get(s, 0))) for s in ("finished", "diverged", "failed", "skipped"))
    extra = [f"{int(counts[s])} {s}" for s in ("killed", "missing") if counts.get(s, 0)]
    return text + (" (" + ", ".join(extra) + ")" if extra else "")


def verdict_table(suite: Suite, runs: pd.DataFrame, comps: dict) -> pd.DataFrame:
    """One row per variant: the primary metric with its CI, the paired Δ, Holm p, verdict and costs."""
    primary, alpha = suite.report.primary, suite.report.alpha
    fmt = metric_format(primary)
    rows = []
    for variant in suite.variants:
        r = comps[primary].get(variant)
        row = {
            "variant": f"**{variant}** (baseline)" if variant == suite.baseline else variant,
            f"{fmt.label} [{1 - alpha:.0%} CI]": mean_ci(list(per_seed(runs, variant, primary).values()), fmt, alpha),
            f"Δ vs baseline [{1 - alpha:.0%} CI]": "–" if r is None else delta_ci(r, fmt),
            "p (Holm)": "–" if r is None else _p(r.p_holm),
            "verdict": "baseline" if r is None else r.verdict,
            "time to target (KM median)": str(time_to_target(runs, variant)),
        }
        for m in ("train_throughput", "params"):
            vals = list(per_seed(runs, variant, m).values())
            row[metric_format(m).label] = metric_format(m)(sum(vals) / len(vals)) if vals else "–"
        row["seeds fin/div/fail/skip"] = _counts(runs, variant)
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_table(suite: Suite, runs: pd.DataFrame, comps: dict) -> pd.DataFrame:
    """Every reported metric: mean ± sd per variant and, vs the baseline, Δ [CI], p, Holm p, Wilcoxon p, verdict."""
    rows = []
    for m, by_variant in comps.items():
        fmt = metric_format(m)
        for variant in suite.variants:
            vals = list(per_seed(runs, variant, m).values())
            r = by_variant.get(variant)
            rows.append({
                "metric": fmt.label, "variant": variant,
                "mean ± sd": mean_std(pd.Series(vals, dtype=float), fmt),
                "Δ vs baseline [CI]": "–" if r is None else delta_ci(r, fmt),
                "p": "–" if r is None else _p(r.p),
                "p (Holm)": "–" if r is None else _p(r.p_holm),
                "p Wilcoxon": "–" if r is None else _p(r.p_wilcoxon),
                "verdict": "baseline" if r is None else r.verdict,
            })
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True)


# ───────────────────────────── plots ─────────────────────────────


def plot_curves(suite: Suite, runs: pd.DataFrame, history: pd.DataFrame, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if history.empty:
        return False
    wide = history.pivot_table(index=["run_id", "step"], columns="key", values="value").reset_index()
    wide = wide.merge(runs[["run_id", "variant", "seed"]], on="run_id")
    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(11, 4), dpi=110)
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
    for ax, xlabel in ((ax_e, "epoch"), (ax_t, "training time (s, mean over seeds)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
    target = _common(suite, lambda e: e.train.target_accuracy)
    if target:
        for ax in (ax_e, ax_t):
            ax.axhline(target * 100, color="grey", lw=0.8, ls=":")
    ax_e.legend(fontsize=8)
    fig.suptitle(f"{suite.name}: validation accuracy (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_bars(suite: Suite, runs: pd.DataFrame, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col = f"metrics.{suite.report.primary}"
    fin = runs[runs["status"] == "finished"]
    if col not in fin or fin[col].dropna().empty:
        return False
    fmt = metric_format(suite.report.primary)
    scale = 100 if fmt.fmt == "pct" else 1
    names = list(suite.variants)
    values = [pd.to_numeric(fin[fin["variant"] == v][col], errors="coerce").dropna() * scale for v in names]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(names) + 2), 3.6), dpi=110)
    means = [v.mean() if len(v) else float("nan") for v in values]
    sds = [v.std(ddof=1) if len(v) > 1 else 0 for v in values]
    colors = ["grey" if n == suite.baseline else f"C{i}" for i, n in enumerate(names)]
    ax.bar(names, means, yerr=sds, color=colors, capsize=4, alpha=0.85)
    for i, v in enumerate(values):
        ax.scatter([i] * len(v), v, color="black", s=10, zorder=3)
    finite = [x for v in values for x in v]
    if finite and min(finite) >= 0:  # bars start at zero: a cut axis would exaggerate differences
        ax.set_ylim(0, max(finite) * 1.08)
    ax.set_ylabel(fmt.label + (" (%)" if fmt.fmt == "pct" else ""))
    ax.set_title(f"{suite.name}: {fmt.label} per variant (mean ± std, dots = seeds)", fontsize=9)
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_tuning(suite: Suite, trials: pd.DataFrame, path: Path) -> bool:
    """Optimization history per variant: complete trials, pruned ones at their last value, best so far."""
    if trials.empty:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = suite.search.metric
    fmt = metric_format(metric)
    scale = 100 if fmt.fmt == "pct" else 1
    names = [v for v in suite.variants if v in set(trials["variant"])]
    cols = min(4, len(names))
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(nrows, cols, sharey=True, figsize=(3.2 * cols + 1, 2.9 * nrows + 0.4), dpi=110,
                             squeeze=False)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax, variant in zip(axes.flat, names):
        t = trials[trials["variant"] == variant].sort_values("trial")
        state = t.get("tags.cnnbench.trial_state", pd.Series(dtype=str))
        done = t[state == "complete"]
        y = pd.to_numeric(done.get("metrics.objective"), errors="coerce") * scale
        ax.scatter(done["trial"], y, s=14, color="C0", label="complete", zorder=3)
        pruned = t[state == "pruned"]
        if not pruned.empty and f"metrics.{metric}" in pruned:
            ax.scatter(pruned["trial"], pd.to_numeric(pruned[f"metrics.{metric}"], errors="coerce") * scale,
                       s=14, marker="x", color="grey", label="pruned (last value)")
        if not y.empty:
            best = y.cummax() if suite.search.direction == "maximize" else y.cummin()
            ax.step(done["trial"], best, where="post", color="C3", label="best so far")
        ax.set_title(variant, fontsize=9)
        ax.set_xlabel("trial")
    for row in axes:
        row[0].set_ylabel(fmt.label + (" (%)" if fmt.fmt == "pct" else ""))
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{suite.name}: optimization history ({suite.search.sampler}, {suite.search.pruner} pruner)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def tuning_lines(suite: Suite, searches: pd.DataFrame, trials: pd.DataFrame, plot: Path | None) -> list[str]:
    """The report's Tuning section: what each variant's equal-budget search found."""
    sc = suite.search
    fmt = metric_format(sc.metric)
    seeds = ", ".join(str(TUNING_SEED_BASE + k) for k in range(sc.tuning_seeds))
    lines = [
        "## Tuning", "",
        f"Every variant got the same budget: {sc.trials} trials of the `{sc.sampler}` sampler (seed {sc.sampler_seed}) "
        f"with the `{sc.pruner}` pruner, {sc.direction} {sc.metric} on the validation split after "
        f"{sorted({e.train.epochs for e in suite.experiments.values()})[0]} epochs, tuning seed(s) {seeds}. "
        "Trials never see the test set. The seeded runs above use each variant's best values.", "",
    ]
    if searches.empty:
        return lines + ["No search has been recorded for the current suite yet (or it ran with `--no-search`).", ""]

    def num(row, key, default=0.0):
        v = pd.to_numeric(row.get(f"metrics.{key}"), errors="coerce")
        return default if pd.isna(v) else v

    rows = []
    for _, r in searches.set_index("variant").reindex(list(suite.variants)).dropna(how="all").iterrows():
        best = {k.removeprefix("tags.best."): v for k, v in r.items() if k.startswith("tags.best.") and isinstance(v, str)}
        best_txt = ", ".join(f"{k} = {_short(v)}" for k, v in best.items()) or "–"
        counts = "/".join(str(int(num(r, f"trials_{k}"))) for k in ("complete", "pruned", "failed"))
        rows.append({
            "variant": r.name, "best values": best_txt,
            f"best {fmt.label}": fmt(num(r, "best_value", float("nan"))) if best else "–",
            "trials complete/pruned/failed": counts,
            "epochs trained": f"{int(num(r, 'epochs_run'))}",
            "epochs saved by pruning": f"{int(num(r, 'epochs_saved_by_pruning'))} ({num(r, 'epochs_saved_fraction'):.0%})",
            "search run": f"`{r['run_id']}`",
        })
    lines += [to_markdown(pd.DataFrame(rows)), ""]
    imp_cols = [c for c in searches if c.startswith("metrics.importance.")]
    if imp_cols:
        imp = searches.set_index("variant")[imp_cols].rename(columns=lambda c: c.removeprefix("metrics.importance."))
        imp = imp.dropna(how="all").apply(lambda col: col.map(lambda v: "–" if pd.isna(v) else f"{v:.2f}"))
        lines += ["Parameter importances (fANOVA, seed pinned; share of the validation metric's variance):", "",
                  to_markdown(imp.reset_index()), ""]
    if plot is not None:
        lines += [f"![optimization history]({plot.name})", ""]
    return lines


def _short(v: str) -> str:
    try:
        return f"{float(v):.4g}"
    except ValueError:
        return v


# ───────────────────────────── the report ─────────────────────────────


def _common(suite: Suite, get) -> object:
    values = {json.dumps(get(e), default=str) for e in suite.experiments.values()}
    return get(next(iter(suite.experiments.values()))) if len(values) == 1 else None


def answer(suite: Suite, runs: pd.DataFrame, comps: dict) -> str:
    """The suite's question answered in a sentence or two, with the numbers behind it."""
    primary, alpha = suite.report.primary, suite.report.alpha
    fmt = metric_format(primary)
    base = list(per_seed(runs, suite.baseline, primary).values())
    if not base:
        return f"The baseline `{suite.baseline}` has no finished runs yet, so no variant can be compared with it."
    results = comps[primary]

    def cite(v: str) -> str:
        r = results[v]
        return f"`{v}` ({delta_ci(r, fmt).replace(f' (n={r.n})', '')}, p = {_p(r.p_holm)})"

    better = [v for v, r in results.items() if r.verdict == "better"]
    worse = [v for v, r in results.items() if r.verdict == "worse"]
    unclear = [v for v, r in results.items() if r.verdict == "no evidence of a difference"]
    few = [v for v, r in results.items() if r.verdict.startswith("too few")]
    n = max((r.n for r in results.values()), default=0)
    text = f"The baseline `{suite.baseline}` reaches {fmt(sum(base) / len(base))} {fmt.label}. "
    if better:
        text += "Better than it: " + "; ".join(cite(v) for v in better) + ". "
    if worse:
        text += "Worse: " + "; ".join(cite(v) for v in worse) + ". "
    if unclear:
        if not better and not worse:
            text += "No variant differs detectably from it: "
        else:
            text += "No evidence of a difference for "
        text += ", ".join(cite(v).replace(f", p = {_p(results[v].p_holm)}", "") for v in unclear) + ". "
    if few:
        text += "Too few paired seeds to judge " + ", ".join(f"`{v}`" for v in few) + ". "
    speed = comps.get("train_throughput", {})
    base_speed = list(per_seed(runs, suite.baseline, "train_throughput").values())
    if base_speed and primary != "train_throughput":
        base_rate = sum(base_speed) / len(base_speed)
        moved = [(v, r) for v, r in speed.items() if r.verdict in ("better", "worse")]
        text += f"Training throughput: baseline {base_rate:,.0f} img/s" + (
            "; " + ", ".join(f"`{v}` {100 * r.delta / base_rate:+.0f}%" for v, r in moved) + " (significant)"
            if moved else ", no significant change") + ". "
    problems = runs[runs["status"].isin(["diverged", "failed", "skipped"])]
    for variant, sub in problems.groupby("variant", sort=False):
        total = int((runs["variant"] == variant).sum())
        text += f"`{variant}`: {', '.join(f'{c} {s}' for s, c in sub['status'].value_counts().items())} of {total} seeds. "
    return text + (f"(Paired t-tests over n = {n} seeds, Holm-corrected across {_n(len(results), 'variant')}, "
                   f"α = {alpha:g}; Δ is in {fmt.label} with its {1 - alpha:.0%} interval for that comparison alone — "
                   "verdicts use the Holm-adjusted p, so an interval can exclude 0 without a verdict.)")


def determinism(frame: pd.DataFrame) -> str:
    """What re-runs of an identical config (same fingerprint) say about repeatability."""
    if frame.empty or "tags.cnnbench.fingerprint" not in frame:
        return ""
    done = frame[(frame.get("tags.cnnbench.role") == ROLE_RUN) & (frame.get("tags.cnnbench.status") == "finished")]
    cols = [c for c in ("metrics.test_accuracy", "metrics.test_loss") if c in done]
    groups = [g for _, g in done.groupby("tags.cnnbench.fingerprint") if len(g) > 1]
    if not groups or not cols:
        return ("No configuration has been run twice, so repeatability is not shown here; on the CPU, cnnbench "
                "runs with the same config and seed are bit-for-bit identical (tested).")
    same = sum(bool((g[cols].nunique(dropna=False) == 1).all()) for g in groups)
    if same == len(groups):
        return (f"Deterministic: {len(groups)} configuration(s) run more than once gave identical "
                f"test accuracy and loss every time.")
    worst = max(float(pd.to_numeric(g[cols[0]]).max() - pd.to_numeric(g[cols[0]]).min()) for g in groups)
    return (f"Not deterministic: {len(groups) - same} of {len(groups)} configuration(s) run more than once differed "
            f"(test accuracy by up to {100 * worst:.2f} pp).")


def _pairing(suite: Suite) -> str:
    """Which comparisons share initial weights too: parameter shapes are the same when only the
    activation or dropout differ (the model is built right after seeding)."""
    def shape_key(exp):
        return exp.model.model_dump(exclude={"activation", "dropout", "dropout2d"})

    base = shape_key(suite.experiments[suite.baseline])
    full = [v for v in suite.variants if v != suite.baseline and shape_key(suite.experiments[v]) == base]
    order = [v for v in suite.variants if v != suite.baseline and v not in full]
    text = ""
    if full:
        text += "Fully paired (same data order and initial weights): " + ", ".join(f"`{v}`" for v in full) + ". "
    if order:
        text += ("Paired by data order only (the architecture differs, so initial weights do): "
                 + ", ".join(f"`{v}`" for v in order) + ". ")
    return text.strip()


def _ttt_by_seed(suite: Suite, runs: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    """variant → seed → time to target (None: not reached), for the profiles in the index."""
    out = {}
    for variant in suite.variants:
        sub = runs[(runs["variant"] == variant) & runs["status"].isin(["finished", "diverged"])]
        col = sub.get("metrics.time_to_target_s", pd.Series(index=sub.index, dtype=float))
        out[variant] = {str(int(s)): (None if pd.isna(t) else round(float(t), 4)) for s, t in zip(sub["seed"], col)}
    return out


def plot_forest(suite: Suite, comps: dict, path: Path) -> bool:
    """Δ of the primary metric vs the baseline with its CI, one line per variant."""
    results = {v: r for v, r in comps[suite.report.primary].items() if r.n >= 2 and not math.isnan(r.low)}
    if not results:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = metric_format(suite.report.primary)
    scale = 100 if fmt.fmt == "pct" else 1
    names = list(results)[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.4), dpi=110)
    colors = {"better": "C2", "worse": "C3"}
    for i, v in enumerate(names):
        r = results[v]
        ax.errorbar(r.delta * scale, i, xerr=[[(r.delta - r.low) * scale], [(r.high - r.delta) * scale]], fmt="o",
                    color=colors.get(r.verdict, "C0"), capsize=4)
        ax.annotate(f"p={_p(r.p_holm)}", (r.high * scale, i), xytext=(6, -3), textcoords="offset points", fontsize=7)
    ax.axvline(0, color="grey", lw=0.8, ls="--")
    ax.set_yticks(range(len(names)), names)
    unit = " (pp)" if fmt.fmt == "pct" else ""
    ax.set_xlabel(f"Δ {fmt.label} vs {suite.baseline}{unit}, {1 - suite.report.alpha:.0%} CI")
    ax.set_title(f"{suite.name}: paired differences (green better, red worse, blue no evidence; Holm p)", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = metric_format(primary)
    scale = 100 if fmt.fmt == "pct" else 1
    higher = suite.report.primary_higher_is_better()
    front = [v for v, (x, y) in points.items()
             if not any(x2 >= x and (y2 >= y if higher else y2 <= y) and (x2, y2) != (x, y) for x2, y2 in points.values())]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for i, (v, (x, y)) in enumerate(points.items()):
        ax.scatter(x, y * scale, color="grey" if v == suite.baseline else f"C{i}", zorder=3,
                   marker="*" if v in front else "o", s=80 if v in front else 30)
        ax.annotate(v, (x, y * scale), xytext=(5, 3), textcoords="offset points", fontsize=8)
    fx = sorted(points[v] for v in front)
    ax.plot([p[0] for p in fx], [p[1] * scale for p in fx], color="grey", lw=0.8, ls=":")
    ax.set_xlabel("training throughput (images/s, mean over seeds)")
    ax.set_ylabel(fmt.label + (" (%)" if fmt.fmt == "pct" else ""))
    ax.set_title(f"{suite.name}: {fmt.label} vs speed (stars: Pareto-optimal)", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# ───────────────────────────── compression (issue 6) ─────────────────────────────

TRADEOFFS = (("latency", "latency_bs64_p50_ms", "inference latency at batch 64, p50 (ms)"),
             ("size", "model_size_bytes", "model size (KiB, serialized deployed tensors)"))


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fmt = metric_format(primary)
    scale = 100 if fmt.fmt == "pct" else 1
    xscale = 1 / 1024 if x_metric.endswith("bytes") else 1
    higher = suite.report.primary_higher_is_better()
    means = {v: (x[0], y[0]) for v, (x, y) in points.items()}
    front = [v for v, (x, y) in means.items()
             if not any(x2 <= x and (y2 >= y if higher else y2 <= y) and (x2, y2) != (x, y) for x2, y2 in means.values())]
    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=110)
    for i, (v, ((x, xs), (y, ys))) in enumerate(points.items()):
        ax.errorbar(x * xscale, y * scale, xerr=xs * xscale, yerr=ys * scale, fmt="*" if v in front else "o",
                    ms=11 if v in front else 5, color="grey" if v == suite.baseline else f"C{i}", capsize=3, zorder=3)
        ax.annotate(v, (x * xscale, y * scale), xytext=(5, 3), textcoords="offset points", fontsize=8)
    fx = sorted(means[v] for v in front)
    ax.plot([p[0] * xscale for p in fx], [p[1] * scale for p in fx], color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel + ", log scale")
    ax.set_ylabel(fmt.label + (" (%)" if fmt.fmt == "pct" else ""))
    ax.set_title(f"{suite.name}: {fmt.label} vs {x_metric} (mean ± sd over seeds; stars: Pareto-optimal)", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def compression_plots(suite: Suite, runs: pd.DataFrame, reports_dir: Path) -> dict[str, Path]:
    out = {}
    for name, metric, label in TRADEOFFS:
        path = reports_dir / f"{suite.name}_{name}.png"
        if plot_tradeoff(suite, runs, metric, label, path):
            out[name] = path
    return out


def _ratio(runs: pd.DataFrame, suite: Suite, variant: str, metric: str) -> str:
    """Mean over paired seeds of baseline / variant (× smaller or × faster), with the range over seeds."""
    base, mine = per_seed(runs, suite.baseline, metric), per_seed(runs, variant, metric)
    ratios = [base[s] / mine[s] for s in base.keys() & mine.keys() if mine[s] > 0]
    if not ratios:
        return "–"
    mean = sum(ratios) / len(ratios)
    return f"{mean:.2f}×" + (f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else "")


def compression_lines(suite: Suite, runs: pd.DataFrame, plots: dict[str, Path]) -> list[str]:
    """The Compression section: how each variant was made and measured, ratios vs the baseline, plots."""
    if "metrics.model_size_bytes" not in runs:
        return []
    lines = ["## Inference and compression", "",
             "Measured after training on every run: latency of one forward pass at batch 1 and 64 (p50 over "
             "repeats after warm-up, device synchronized), serialized size of the tensors that would be deployed "
             "(int8 tensors for quantized models, without the fp32 copies a PT2E graph keeps), parameters and "
             "non-zero parameters. Ratios are the baseline's value over the variant's, paired by seed (mean, and "
             "range over seeds): above 1 is smaller or faster.", "",
             "| variant | how | measured on | size ratio | speed-up bs1 | speed-up bs64 |", "|---|---|---|---|---|---|"]
    for v in suite.variants:
        sub = runs[(runs["variant"] == v) & (runs["status"] == "finished")]
        how = next((x for x in sub.get("tags.cnnbench.compression", pd.Series(dtype=object)) if isinstance(x, str) and x),
                   None)
        exp = suite.experiments[v]
        if how is None:
            how = (f"distilled from `{exp.distill.teacher}` (T = {exp.distill.temperature:g}, α = {exp.distill.alpha:g})"
                   if exp.distill else "trained")
        where = next((x for x in sub.get("tags.cnnbench.inference", pd.Series(dtype=object)) if isinstance(x, str)), "–")
        lines.append(f"| `{v}` | {how} | {where} | {_ratio(runs, suite, v, 'model_size_bytes')} | "
                     f"{_ratio(runs, suite, v, 'latency_bs1_p50_ms')} | {_ratio(runs, suite, v, 'latency_bs64_p50_ms')} |")
    lines.append("")
    for name, path in plots.items():
        lines += [f"![{suite.report.primary} against {name}]({path.name})", ""]
    return lines


def build_report(suite: Suite, tracker: Tracker, reports_dir: str | Path = "reports") -> Path:
    """Write ``<reports_dir>/<suite>.md`` and its PNGs from the runs in MLflow; refresh the index."""
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    frame = tracker.runs_frame(suite.name)
    runs = select_runs(suite, frame)
    finished = runs[runs["status"] == "finished"]
    history = tracker.history(finished["run_id"].tolist(), ["val_accuracy", "train_time_cum_s"])
    curves, bars = reports_dir / f"{suite.name}_curves.png", reports_dir / f"{suite.name}_bars.png"
    has_curves = plot_curves(suite, runs, history, curves)
    has_bars = plot_bars(suite, runs, bars)
    comps = comparisons(suite, runs)
    table = verdict_table(suite, runs, comps)
    forest, pareto = reports_dir / f"{suite.name}_forest.png", reports_dir / f"{suite.name}_pareto.png"
    has_forest = plot_forest(suite, comps, forest)
    has_pareto = plot_pareto(suite, runs, pareto)
    tradeoffs = compression_plots(suite, runs, reports_dir)  # issue 6: accuracy vs latency / size
    searches, trials = tuning_frame(suite, frame)
    tuning_png = reports_dir / f"{suite.name}_tuning.png"
    has_tuning_plot = suite.search is not None and plot_tuning(suite, trials, tuning_png)

    parents = frame[frame["tags.cnnbench.role"] == ROLE_SUITE].sort_values("start_time") if not frame.empty else frame
    used_parents = set(runs.get("tags.mlflow.parentRunId", pd.Series(dtype=str)).dropna())
    last = parents.iloc[-1] if not parents.empty else None
    env = {k.removeprefix("params.env."): v for k, v in (last.to_dict() if last is not None else {}).items()
           if k.startswith("params.env.") and isinstance(v, str)}
    devices = ", ".join(sorted(set(runs.get("tags.cnnbench.device", pd.Series(dtype=str)).dropna()))) or "–"
    exp0 = suite.experiments[suite.baseline]
    datasets = ", ".join(sorted({e.data.dataset for e in suite.experiments.values()}))
    epochs = sorted({e.train.epochs for e in suite.experiments.values()})
    total_train = pd.to_numeric(runs.get("metrics.train_time_s", pd.Series(dtype=float)), errors="coerce").sum()
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    last_run = (datetime.fromtimestamp(last["start_time"] / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
                if last is not None else "–")
    summary = answer(suite, runs, comps)
    meta = {"name": suite.name, "question": suite.question, "generated": generated, "primary": suite.report.primary,
            "answer": summary, "time_to_target": _ttt_by_seed(suite, runs)}

    lines = [
        f"{META_PREFIX}{json.dumps(meta)} -->",
        f"# {suite.name}",
        "",
        f"**Question.** {suite.question}",
        "",
        f"**Answer.** {summary}",
        "",
    ]
    if suite.description:
        lines += [suite.description.strip(), ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| dataset | {datasets} (batch {exp0.data.batch_size}, validation {exp0.data.val_fraction:.0%} of train"
        + (f", first {exp0.data.limit_train} training images" if exp0.data.limit_train else "") + ") |",
        f"| budget | {len(suite.variants)} variants × {len(suite.seed_list())} seeds × {'/'.join(map(str, epochs))} epochs"
        f" = {len(runs)} runs, {total_train:.1f} s of training in all |",
        f"| baseline | `{suite.baseline}`: {exp0.model.name}, {exp0.optimizer.name} lr {exp0.optimizer.lr:g}, "
        f"{exp0.schedule.name} schedule |",
        f"| primary metric | {suite.report.primary} ({'higher' if suite.report.primary_higher_is_better() else 'lower'} is better) |",
        f"| runs from | {last_run} (newest suite run); report generated {generated} |",
        f"| device | {devices}; {env.get('cpu', '?')}, {env.get('torch_threads', '?')} threads |",
        "",
        "## Results",
        "",
        f"Each variant against the baseline, paired by seed. {_pairing(suite)} The {suite.report.primary} column "
        f"is the mean over finished seeds with a t-interval; Δ is the mean paired difference with a t-interval on "
        f"the differences; p is the paired t-test, Holm-corrected across the {_n(len(suite.variants) - 1, 'variant')}; the "
        f"verdict is at α = {suite.report.alpha:g}. Time to target is the Kaplan–Meier median of the training time "
        "until validation accuracy first reaches the target: runs that never reach it count as censored at their "
        "training time, not dropped. Diverged, failed and skipped runs are counted in the last column and left out "
        "of the means.",
        "",
        to_markdown(table),
        "",
        determinism(frame),
        "",
        "<details><summary>Every metric: paired Δ, p, Holm p, Wilcoxon p (n ≥ 6), verdict</summary>",
        "",
        to_markdown(metrics_table(suite, runs, comps)),
        "",
        "</details>",
        "",
    ]
    if suite.search is not None:
        present = runs[runs["status"] != "missing"]
        plain = sorted(set(present[~present["tuned"].astype(bool)]["variant"]), key=list(suite.variants).index)
        lines += [("Runs of " + ", ".join(f"`{v}`" for v in plain) + " use the values written in the suite, not tuned "
                   "ones (they ran with `--no-search`).") if plain else
                  "Every run uses its variant's tuned values (see Tuning).", ""]
    problems = runs[runs["status"].isin(["diverged", "failed", "skipped", "killed"])]
    if not problems.empty:
        lines += ["Runs that did not finish:", ""]
        for _, r in problems.iterrows():
            reason = r.get("tags.cnnbench.reason") if isinstance(r.get("tags.cnnbench.reason"), str) else ""
            lines.append(f"- `{r['variant']}/seed{r['seed']}`: {r['status']}{' — ' + reason if reason else ''}")
        lines.append("")
    lines += compression_lines(suite, runs, tradeoffs)
    if has_curves or has_bars or has_forest or has_pareto:
        lines += ["## Plots", ""]
        if has_forest:
            lines += [f"![paired differences with confidence intervals]({forest.name})", ""]
        if has_curves:
            lines += [f"![learning curves]({curves.name})", ""]
        if has_bars:
            lines += [f"![{suite.report.primary} per variant]({bars.name})", ""]
        if has_pareto:
            lines += [f"![{suite.report.primary} against training throughput]({pareto.name})", ""]
    if suite.search is not None:
        lines += tuning_lines(suite, searches, trials, tuning_png if has_tuning_plot else None)
    lines += ["## Variants", "", "Each variant changes the baseline by:", ""]
    for name, override in suite.variants.items():
        lines.append(f"- `{name}`: " + (f"`{json.dumps(override, separators=(', ', ': '))}`" if override else "baseline"))
    lines += ["", "## Environment", ""]
    env_keys = ["cnnbench", "git_commit", "python", "torch", "torchvision", "mlflow", "platform", "cpu", "cpu_count",
                "torch_threads"]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {env[k]} |" for k in env_keys if k in env] + [""]
    lines += ["## Reproduce", "", "```", env.get("command") or f"cnnbench run {suite.source}", "```", ""]
    if not runs["run_id"].dropna().empty:
        lines += [
            f"MLflow experiment `{suite.name}` at `{tracker.uri}`; suite runs "
            + ", ".join(f"`{p}`" for p in sorted(used_parents)) + ".",
            "",
            "<details><summary>Run ids</summary>",
            "",
            to_markdown(runs[["variant", "seed", "status", "run_id"]].fillna("–")),
            "",
            "</details>",
            "",
        ]
    path = reports_dir / f"{suite.name}.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    write_index(reports_dir)
    return path


def write_index(reports_dir: str | Path) -> Path:
    """``reports/README.md``: one line per report with its answer, read from each report's metadata
    comment, and the performance profiles of time-to-target across suites."""
    reports_dir = Path(reports_dir)
    rows, metas = [], []
    for md in sorted(reports_dir.glob("*.md")):
        if md.name == "README.md":
            continue
        first = md.read_text().split("\n", 1)[0]
        if not first.startswith(META_PREFIX):
            continue
        meta = json.loads(re.sub(r"\s*-->\s*$", "", first.removeprefix(META_PREFIX)))
        metas.append(meta)
        rows.append(f"| [{meta['name']}]({md.name}) | {meta['question']} | {meta.get('answer', '–')} | {meta['generated']} |")
    lines = [
        "# Reports",
        "",
        "Generated by `cnnbench run` / `cnnbench report` from the runs recorded in MLflow. Do not edit by hand.",
        "",
        "| report | question | answer | generated |",
        "|---|---|---|---|",
        *rows,
        "",
    ]
    profile = reports_dir / "profiles.png"
    if plot_profiles(metas, profile):
        lines += [
            "## Performance profiles (time to target)",
            "",
            "AlgoPerf-style: for each suite, a case is one seed; a variant's curve at τ is the fraction of cases "
            "in which it reached the suite's validation target within τ× the training time of the fastest variant "
            "of that case. Higher and further left is better; a curve that stays below 1 did not reach the target "
            "in some cases (or was never fastest enough).",
            "",
            f"![performance profiles]({profile.name})",
            "",
        ]
    index = reports_dir / "README.md"
    index.write_text("\n".join(lines))
    return index


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    taus = np.linspace(1, 4, 121)
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), dpi=100, squeeze=False, sharey=True)
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
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
