"""The report's sentences: the answer to the suite's question, repeatability, how comparisons are paired,
and the text of the compression and tuning sections."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from cnnbench import techniques
from cnnbench.config import TUNING_SEED_BASE, Suite
from cnnbench.metrics import metric
from cnnbench.report.selection import per_seed
from cnnbench.report.tables import (
    delta_ci,
    importance_table,
    mean_ci,
    n_of,
    p_text,
    ratio,
    to_markdown,
    tuning_table,
)
from cnnbench.tracking import ROLE_RUN


def answer(suite: Suite, runs: pd.DataFrame, comps: dict) -> str:
    """The suite's question answered in a sentence or two, with the numbers behind it."""
    primary, alpha = suite.report.primary, suite.report.alpha
    fmt = metric(primary)
    base = list(per_seed(runs, suite.baseline, primary).values())
    if len(suite.variants) == 1:
        return describe_runs(suite, runs)
    if not base:
        return f"The baseline `{suite.baseline}` has no finished runs yet, so no variant can be compared with it."
    results = comps[primary]

    def cite(v: str) -> str:
        r = results[v]
        return f"`{v}` ({delta_ci(r, fmt).replace(f' (n={r.n})', '')}, p = {p_text(r.p_holm)})"

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
        text += ", ".join(cite(v).replace(f", p = {p_text(results[v].p_holm)}", "") for v in unclear) + ". "
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
    return text + (f"(Paired t-tests over n = {n} seeds, Holm-corrected across {n_of(len(results), 'variant')}, "
                   f"α = {alpha:g}; Δ is in {fmt.label} with its {1 - alpha:.0%} interval for that comparison alone — "
                   "verdicts use the Holm-adjusted p, so an interval can exclude 0 without a verdict.)")


def describe_runs(suite: Suite, runs: pd.DataFrame) -> str:
    """A one-variant suite compares nothing: what its runs reached, with the spread over seeds."""
    variant, primary, alpha = suite.baseline, suite.report.primary, suite.report.alpha
    fmt = metric(primary)
    values = list(per_seed(runs, variant, primary).values())
    if not values:
        return f"`{variant}` has no finished runs yet."
    text = (f"`{variant}` reaches {mean_ci(values, fmt, alpha)} {fmt.label} over {n_of(len(values), 'finished seed')} "
            f"(mean, with its {1 - alpha:.0%} t-interval when there are two seeds or more). ")
    speed = list(per_seed(runs, variant, "train_throughput").values())
    if speed and primary != "train_throughput":
        text += f"It trains at {sum(speed) / len(speed):,.0f} img/s. "
    problems = runs[runs["status"].isin(["diverged", "failed", "skipped"])]
    if not problems.empty:
        text += ", ".join(f"{c} {s}" for s, c in problems["status"].value_counts().items()) + f" of {len(runs)} seeds. "
    return text + "(One variant: the suite describes its runs and compares nothing.)"


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


def pairing(suite: Suite) -> str:
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
        if how is None:  # trained from scratch: what its training-time techniques say of themselves
            exp = suite.experiments[v]
            how = "; ".join(t.describe(exp) for t in techniques.active(exp, "training")) or "trained"
        where = next((x for x in sub.get("tags.cnnbench.inference", pd.Series(dtype=object)) if isinstance(x, str)), "–")
        lines.append(f"| `{v}` | {how} | {where} | {ratio(runs, suite, v, 'model_size_bytes')} | "
                     f"{ratio(runs, suite, v, 'latency_bs1_p50_ms')} | {ratio(runs, suite, v, 'latency_bs64_p50_ms')} |")
    lines.append("")
    for name, path in plots.items():
        lines += [f"![{suite.report.primary} against {name}]({path.name})", ""]
    return lines


def tuning_lines(suite: Suite, searches: pd.DataFrame, trials: pd.DataFrame, plot: Path | None) -> list[str]:
    """The report's Tuning section: what each variant's equal-budget search found."""
    sc = suite.search
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
    lines += [to_markdown(tuning_table(suite, searches)), ""]
    imp = importance_table(searches)
    if imp is not None:
        lines += ["Parameter importances (fANOVA, seed pinned; share of the validation metric's variance):", "",
                  to_markdown(imp), ""]
    if plot is not None:
        lines += [f"![optimization history]({plot.name})", ""]
    return lines
