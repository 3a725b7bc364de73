"""The report's sentences: the answer to the suite's question, repeatability, how comparisons are paired,
and the text of the compression and tuning sections."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from cnnbench import stats, techniques
from cnnbench.config import TUNING_SEED_BASE, Suite
from cnnbench.metrics import metric
from cnnbench.report.selection import per_seed, seeds_by_variant
from cnnbench.report.tables import (
    bound,
    delta_ci,
    importance_table,
    magnitude,
    mean_ci,
    n_of,
    ratio,
    to_markdown,
    tuning_table,
)
from cnnbench.tracking import ROLE_RUN


def answer(suite: Suite, runs: pd.DataFrame, comps: dict, timing=None) -> str:
    """The suite's question answered: each variant better, worse, equivalent within the margin or
    inconclusive (with what the suite could have detected), with the numbers behind it."""
    primary = suite.report.primary
    fmt = metric(primary)
    base = list(per_seed(runs, suite.baseline, primary).values())
    if len(suite.variants) == 1:
        return describe_runs(suite, runs)
    if not base:
        return f"The baseline `{suite.baseline}` has no finished runs yet, so no variant can be compared with it."
    results = comps[primary]

    def cite(v: str) -> str:
        if results[v].n == 0 and results[v].notes:  # it trained where its reference diverged
            return f"`{v}` ({results[v].notes[-1]})"
        against = "" if suite.reference(v) == suite.baseline else f"vs `{suite.reference(v)}` "
        return f"`{v}` ({against}{delta_ci(results[v], fmt).replace(f' (n={results[v].n})', '')})"

    def group(word: str) -> list[str]:
        return [v for v, r in results.items() if r.verdict == word]

    text = f"The baseline `{suite.baseline}` reaches {fmt(sum(base) / len(base))} {fmt.label}. "
    for word, lead in (("better", "Better than it"), ("worse", "Worse"), ("higher", "Higher"), ("lower", "Lower")):
        if group(word):
            text += f"{lead}: " + "; ".join(cite(v) for v in group(word)) + ". "
    equivalent = group("equivalent")
    if equivalent:
        text += (f"Equivalent to it within ±{magnitude(results[equivalent[0]].margin, fmt)}: "
                 + "; ".join(cite(v) for v in equivalent) + ". ")
    for v in group("inconclusive") + group(stats.NOT_JUDGED):
        text += f"Inconclusive for {cite(v)}: {could_detect(results[v], fmt)}. "
    diverged = group(stats.DIVERGED)
    if diverged:
        text += "Diverged on every seed it ran (it does not train at this setting): " + ", ".join(
            f"`{v}`" + ("" if suite.reference(v) == suite.baseline else f" (vs `{suite.reference(v)}`)")
            for v in diverged) + ". "
    few = [v for v, r in results.items() if r.verdict.startswith("too few")]
    if few:
        text += "Too few paired seeds to judge " + ", ".join(f"`{v}`" for v in few) + ". "
    text += did_not_learn(suite, runs)
    if primary != "train_throughput":
        text += speed_sentence(suite, runs, comps, timing)
    problems = runs[runs["status"].isin(["diverged", "failed", "skipped"])]
    for variant, sub in problems.groupby("variant", sort=False):
        total = int((runs["variant"] == variant).sum())
        text += f"`{variant}`: {', '.join(f'{c} {s}' for s, c in sub['status'].value_counts().items())} of {total} seeds. "
    return text + "(" + method_sentence(suite, results, seeds_by_variant(suite, runs)) + ")"


CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def did_not_learn(suite: Suite, runs: pd.DataFrame) -> str:
    """The seeds whose finished run stayed within twice chance test accuracy: a collapse (dead units, a
    step size too large) that a mean and its interval hide; it also explains an interval too wide to decide."""
    if suite.report.primary != "test_accuracy" or runs.empty:
        return ""
    counts = []
    for v in suite.variants:
        data = suite.experiments[v].data
        k = (len(data.classes) if data.classes else data.synthetic.num_classes if data.dataset == "synthetic"
             else CLASSES.get(data.dataset))
        values = list(per_seed(runs, v, "test_accuracy").values())
        low = sum(a <= 2 / k for a in values) if k else 0
        if low:
            counts.append(f"`{v}` on {low} of {len(values)}")
    if not counts:
        return ""
    return "Did not learn (test accuracy at most twice chance) " + ", ".join(counts) + " seeds. "


def headline(suite: Suite, comps: dict) -> str:
    """The answer in one line, for the index of reports: each verdict with its variants and their Δ."""
    results = comps.get(suite.report.primary, {})
    if len(suite.variants) == 1 or not results:
        return "–"
    fmt = metric(suite.report.primary)
    parts = []
    for word in ("better", "worse", "higher", "lower", stats.DIVERGED, "equivalent", "inconclusive", stats.NOT_JUDGED):
        named = [v for v, r in results.items() if r.verdict == word]
        if not named:
            continue
        label = f"equivalent (±{magnitude(results[named[0]].margin, fmt)})" if word == "equivalent" else word
        cited = ", ".join(f"`{v}`" + ("" if word == stats.DIVERGED else " (its reference diverged)"
                                      if results[v].n == 0 else f" {fmt.delta(results[v].delta)}")
                          + ("" if suite.reference(v) == suite.baseline else f" vs `{suite.reference(v)}`")
                          for v in named)
        if word in ("inconclusive", stats.NOT_JUDGED):
            smallest = min((results[v].mde for v in named if math.isfinite(results[v].mde)), default=math.nan)
            if math.isfinite(smallest):
                cited += f" (detects ≥ {magnitude(smallest, fmt)} at best)"
        parts.append(f"{label}: {cited}")
    few = [v for v, r in results.items() if r.verdict.startswith("too few")]
    if few:
        parts.append("not judged (too few seeds): " + ", ".join(f"`{v}`" for v in few))
    return "; ".join(parts)


def decided_count(suite: Suite, comps: dict) -> tuple[int, int]:
    """(decided, made) comparisons of the primary metric. A variant with no paired seed at all (a device
    this machine lacks, every run skipped) is a comparison this machine could not make: not counted."""
    results = comps.get(suite.report.primary, {})
    judged = [r for r in results.values() if r.n > 0 or r.verdict == stats.DIVERGED]
    return sum(r.decided for r in judged), len(judged)


def could_detect(r: stats.Paired, fmt) -> str:
    """Why an inconclusive comparison did not decide, and what would."""
    if r.verdict == stats.NOT_JUDGED:
        return "no A/A noise floor was measured, so a timing difference is not judged"
    if r.method == "sign-flip":
        return f"all {r.n} paired differences are equal, and the exact sign-flip test needs {r.seeds_needed} seeds"
    if r.method == "sign":
        side = stats.sign_test_side(r.n, r.level)
        return (f"{r.above} of {r.n} paired differences are above 0 and {r.below} below; the sign test's interval "
                f"of the median is [{bound(r.low, fmt)}, {bound(r.high, fmt)}]"
                + (f"; it excludes 0 once {side} of {r.n} lie on one side" if side else "")
                + (f", and it cannot exclude 0 with fewer than {r.seeds_needed} seeds"
                   if r.seeds_needed and r.n < r.seeds_needed else ""))
    span = fmt.bounds[1] - fmt.bounds[0] if fmt.bounds is not None else math.inf
    if not math.isfinite(r.mde):
        text = "no spread to plan from"
    elif r.mde > span:  # e.g. two seeds, one of which collapsed: no difference the metric can show is detectable
        text = f"at these seeds no difference {fmt.label} can show is detectable"
    else:
        text = f"this suite can detect ≥ {magnitude(r.mde, fmt)}"
    if r.seeds_needed and r.seeds_needed <= r.n:  # a fixed-seed plan calls n enough: Δ sits between 0 and the margin
        crosses = "0" + (f" and ±{magnitude(r.margin, fmt)}" if r.margin else "")
        text += (f"; at this Δ its interval still crosses {crosses}: "
                 + (f"about {r.seeds_to_decide} seeds would decide it if Δ and the spread stayed as they are"
                    if r.seeds_to_decide else f"more than {stats.MAX_PLANNED_SEEDS} seeds would be needed to decide it"))
    elif r.seeds_needed:
        text += f"; about {r.seeds_needed} seeds would detect {magnitude(r.seeds_for, fmt)}"
    elif math.isfinite(r.seeds_for) and r.seeds_for > 0:
        text += f"; more than {stats.MAX_PLANNED_SEEDS} seeds would be needed to detect {magnitude(r.seeds_for, fmt)}"
    if r.margin is None:
        text += " (no margin set, so it cannot be called equivalent)"
    return text


def speed_sentence(suite: Suite, runs: pd.DataFrame, comps: dict, timing) -> str:
    """Training throughput against the noise floor, and the interleaved latency verdicts."""
    text = ""
    speed = comps.get("train_throughput", {})
    base_speed = list(per_seed(runs, suite.baseline, "train_throughput").values())
    if base_speed:
        rate = sum(base_speed) / len(base_speed)
        moved = [(v, r) for v, r in speed.items() if r.verdict in ("better", "worse")]
        text += f"Training throughput: baseline {rate:,.0f} img/s" + (
            "; " + ", ".join(f"`{v}` {100 * r.relative:+.0f}% ({r.verdict})" for v, r in moved) if moved else "")
        if timing is None:
            text += " (no A/A noise floor measured: speed differences are not judged). "
        else:
            text += f" (differences must exceed the A/A noise floor of ±{timing.floor:.1%}). "
    if timing is not None and timing.verdicts:
        text += timing.sentence() + " "
    return text


def method_sentence(suite: Suite, results: dict, seeds: dict[str, int]) -> str:
    """How the intervals were read; ``seeds``: seeds run per variant, which tells a variant that left the later
    rounds once decided from one whose n is short because runs diverged or failed."""
    n = max((r.n for r in results.values()), default=0)
    looks = suite.looks()
    m = len(results)
    kind = ("Sign-test intervals of the median paired difference (order statistics, distribution-free)"
            if suite.report.test == "sign" else "Paired t-intervals")
    reached = max(seeds.values(), default=0)
    early = [f"`{v}` ({seeds[v]} seeds)" for v, r in results.items() if r.decided and 0 < seeds.get(v, 0) < reached]
    dropped = (f" Decided at an earlier look, so not run in later rounds (`seeds.drop_decided`), and read at "
               f"that look's α: {', '.join(early)}." if early and suite.drops_decided else "")
    return (f"{kind} over n = {n} seeds, simultaneous at {1 - suite.report.alpha:.0%} across "
            f"{n_of(m, 'variant')} (Bonferroni) — {looks.describe()}; a verdict is better/worse when its interval "
            "excludes 0, equivalent when it lies inside ±margin, so interval and verdict always agree." + dropped)


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
