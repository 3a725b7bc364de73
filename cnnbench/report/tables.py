"""The report's tables (verdicts, every metric, tuning) and the small formatters they share."""

from __future__ import annotations

import math

import pandas as pd

from cnnbench import stats
from cnnbench.config import Suite
from cnnbench.metrics import Metric, metric
from cnnbench.report.selection import per_seed, time_to_target


def to_markdown(df: pd.DataFrame) -> str:
    return df.to_markdown(index=False, disable_numparse=True)


def n_of(k: int, word: str) -> str:
    """``1 variant``, ``2 variants``."""
    return f"{k} {word}{'s' * (k != 1)}"


def p_text(p: float) -> str:
    return "–" if p is None or math.isnan(p) else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def short(v: str) -> str:
    """A tuned value as text: numbers to 4 significant digits, anything else as it is."""
    try:
        return f"{float(v):.4g}"
    except ValueError:
        return v


def mean_std(values: pd.Series, fmt: Metric) -> str:
    """``mean ± sd`` over seeds (sample std), or the single value."""
    values = values.dropna()
    if values.empty:
        return "–"
    sd = values.std(ddof=1) if len(values) > 1 else 0.0
    return fmt(values.mean()) if sd == 0 else f"{fmt(values.mean())} ± {fmt(sd)}"


def mean_ci(values: list[float], fmt: Metric, alpha: float) -> str:
    """``mean [low, high]`` (t-interval of the mean, inside the metric's range), or the single value."""
    from scipy import stats as st

    v = [x for x in values if math.isfinite(x)]
    if not v:
        return "–"
    mean = sum(v) / len(v)
    if len(v) < 2 or len(set(v)) == 1:
        return fmt(mean)
    lo, hi = st.t.interval(1 - alpha, len(v) - 1, loc=mean, scale=st.sem(v))
    if fmt.bounds is not None:
        lo, hi = max(lo, fmt.bounds[0]), min(hi, fmt.bounds[1])
    return f"{fmt(mean)} [{fmt(lo)}, {fmt(hi)}]"


def delta_ci(r: stats.Paired | None, fmt: Metric) -> str:
    """Δ with its simultaneous interval and n; a deterministic metric's Δ with its relative change."""
    if r is None or r.n == 0:
        return "–"
    if r.method == "fact":
        rel = "" if math.isnan(r.relative) else f" ({r.relative:+.1%})"
        return f"{fmt.delta(r.delta)}{rel}"
    if r.n < 2 or math.isnan(r.low):
        return f"{fmt.delta(r.delta)} (n={r.n})"
    return f"{fmt.delta(r.delta)} [{bound(r.low, fmt)}, {bound(r.high, fmt)}] (n={r.n})"


def bound(v: float, fmt: Metric) -> str:
    return "−∞" if v == -math.inf else "+∞" if v == math.inf else fmt.delta(v)


def magnitude(v: float | None, fmt: Metric) -> str:
    """An unsigned size in the metric's unit (a margin, a detectable effect)."""
    return "–" if v is None or not math.isfinite(v) else fmt.delta(abs(v)).lstrip("+")


def verdict_text(r: stats.Paired | None, fmt: Metric) -> str:
    """The verdict as the table shows it: ``equivalent (±0.20 pp)``, ``inconclusive``, ``better``…"""
    if r is None:
        return "baseline"
    if r.verdict == "equivalent":
        return f"equivalent (±{magnitude(r.margin, fmt)})"
    return r.verdict


def detectable_text(r: stats.Paired | None, fmt: Metric) -> str:
    """The smallest difference this comparison finds with 80% power, or why there is none."""
    if r is None or r.method == "fact":
        return "–"
    if r.method == "sign-flip":
        return f"— (no spread; {r.seeds_needed} seeds)" if r.seeds_needed else "— (no spread)"
    if r.method == "sign":
        return f"— (sign test; {r.above} up, {r.below} down)"
    if not math.isfinite(r.mde):
        return "–"
    span = fmt.bounds[1] - fmt.bounds[0] if fmt.bounds is not None else math.inf
    return "none within range" if r.mde > span else "≥ " + magnitude(r.mde, fmt)


def ratio(runs: pd.DataFrame, suite: Suite, variant: str, name: str) -> str:
    """Mean over paired seeds of baseline / variant (× smaller or × faster), with the range over seeds."""
    base, mine = per_seed(runs, suite.baseline, name), per_seed(runs, variant, name)
    ratios = [base[s] / mine[s] for s in base.keys() & mine.keys() if mine[s] > 0]
    if not ratios:
        return "–"
    mean = sum(ratios) / len(ratios)
    return f"{mean:.2f}×" + (f" ({min(ratios):.2f}–{max(ratios):.2f})" if len(ratios) > 1 else "")


def counts(runs: pd.DataFrame, variant: str) -> str:
    """``finished/diverged/failed/skipped`` seeds, and killed or missing ones when there are any."""
    by_status = runs[runs["variant"] == variant]["status"].value_counts()
    text = "/".join(str(int(by_status.get(s, 0))) for s in ("finished", "diverged", "failed", "skipped"))
    extra = [f"{int(by_status[s])} {s}" for s in ("killed", "missing") if by_status.get(s, 0)]
    return text + (" (" + ", ".join(extra) + ")" if extra else "")


def variant_label(suite: Suite, variant: str) -> str:
    """The variant as a table row names it: the baseline in bold, a variant with its own reference with it."""
    if variant == suite.baseline:
        return f"**{variant}** (baseline)"
    if variant in suite.report.not_compared:
        return f"{variant} (not compared)"
    return variant if suite.reference(variant) == suite.baseline else f"{variant} (vs `{suite.reference(variant)}`)"


def verdict_table(suite: Suite, runs: pd.DataFrame, comps: dict) -> pd.DataFrame:
    """One row per variant: the primary metric with its CI, the paired Δ, adjusted p, verdict, detectable effect, costs."""
    primary, alpha = suite.report.primary, suite.report.alpha
    fmt = metric(primary)
    rows = []
    for variant in suite.variants:
        r = comps[primary].get(variant)
        row = {
            "variant": variant_label(suite, variant),
            f"{fmt.label} [{1 - alpha:.0%} CI]": mean_ci(list(per_seed(runs, variant, primary).values()), fmt, alpha),
            f"Δ vs {'reference' if suite.report.against else 'baseline'} [simultaneous {1 - alpha:.0%} CI]":
                "–" if r is None else delta_ci(r, fmt),
            "p (adj.)": "–" if r is None else p_text(r.p_adj),
            "verdict": "–" if variant in suite.report.not_compared else verdict_text(r, fmt),
            "detectable (80% power)": detectable_text(r, fmt),
            "time to target (KM median)": str(time_to_target(runs, variant)),
        }
        for m in ("train_throughput", "params"):
            vals = list(per_seed(runs, variant, m).values())
            row[metric(m).label] = metric(m)(sum(vals) / len(vals)) if vals else "–"
        row["seeds fin/div/fail/skip"] = counts(runs, variant)
        rows.append(row)
    return pd.DataFrame(rows)


def metrics_table(suite: Suite, runs: pd.DataFrame, comps: dict) -> pd.DataFrame:
    """Every reported metric: mean ± sd per variant and, vs the baseline, Δ [CI], p, adjusted p, Wilcoxon p,
    verdict and detectable effect (deterministic metrics: the difference, stated)."""
    rows = []
    for m, by_variant in comps.items():
        fmt = metric(m)
        for variant in suite.variants:
            vals = list(per_seed(runs, variant, m).values())
            r = by_variant.get(variant)
            rows.append({
                "metric": fmt.label, "variant": variant_label(suite, variant).replace(" (baseline)", "").strip("*"),
                "mean ± sd": mean_std(pd.Series(vals, dtype=float), fmt),
                f"Δ vs {'reference' if suite.report.against else 'baseline'} [CI]": "–" if r is None else delta_ci(r, fmt),
                "p": "–" if r is None else p_text(r.p),
                "p (adj.)": "–" if r is None else p_text(r.p_adj),
                "p Wilcoxon": "–" if r is None else p_text(r.p_wilcoxon),
                "verdict": verdict_text(r, fmt),
                "detectable": detectable_text(r, fmt),
            })
    return pd.DataFrame(rows)


def tuning_table(suite: Suite, searches: pd.DataFrame) -> pd.DataFrame:
    """One row per variant's search run: best values and metric, trial counts, epochs and pruning savings."""
    fmt = metric(suite.search.metric)

    def num(row, key, default=0.0):
        v = pd.to_numeric(row.get(f"metrics.{key}"), errors="coerce")
        return default if pd.isna(v) else v

    rows = []
    for _, r in searches.set_index("variant").reindex(list(suite.variants)).dropna(how="all").iterrows():
        best = {k.removeprefix("tags.best."): v for k, v in r.items() if k.startswith("tags.best.") and isinstance(v, str)}
        best_txt = ", ".join(f"{k} = {short(v)}" for k, v in best.items()) or "–"
        trials = "/".join(str(int(num(r, f"trials_{k}"))) for k in ("complete", "pruned", "failed"))
        rows.append({
            "variant": r.name, "best values": best_txt,
            f"best {fmt.label}": fmt(num(r, "best_value", float("nan"))) if best else "–",
            "trials complete/pruned/failed": trials,
            "epochs trained": f"{num(r, 'epochs_run'):.4g}",  # fractions: trials pruned inside an epoch
            "epochs saved by pruning": f"{num(r, 'epochs_saved_by_pruning'):.4g} ({num(r, 'epochs_saved_fraction'):.0%})",
            "search run": f"`{r['run_id']}`",
        })
    return pd.DataFrame(rows)


def importance_table(searches: pd.DataFrame) -> pd.DataFrame | None:
    """Parameter importances per variant (rows) and parameter (columns), or None when none were logged."""
    imp_cols = [c for c in searches if c.startswith("metrics.importance.")]
    if not imp_cols:
        return None
    imp = searches.set_index("variant")[imp_cols].rename(columns=lambda c: c.removeprefix("metrics.importance."))
    imp = imp.dropna(how="all").apply(lambda col: col.map(lambda v: "–" if pd.isna(v) else f"{v:.2f}"))
    return imp.reset_index()
