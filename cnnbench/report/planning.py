"""How many seeds a suite needs for its margin, from the spread of paired differences already recorded for it
(``cnnbench validate``; a short pilot of a few seeds gives that spread when nothing is recorded yet)."""

from __future__ import annotations

import math

from cnnbench import stats
from cnnbench.config import Suite
from cnnbench.metrics import metric
from cnnbench.report.selection import per_seed, select_runs
from cnnbench.report.tables import magnitude


def seed_plan(suite: Suite, frame) -> list[str]:
    """Lines for ``cnnbench validate``: per variant, the observed spread of paired differences of the primary
    metric and about how many seeds a fixed-seed run needs to detect the margin (80% power, at α/m)."""
    primary, alpha = suite.report.primary, suite.report.alpha
    fmt = metric(primary)
    m = max(1, len(suite.compared()) - 1)
    margin, relative = suite.report.margin_for(primary)
    lines = [f"Verdicts: {suite.looks().describe()}; intervals simultaneous across {m} comparison(s)."]
    if len(suite.variants) == 1:
        return lines + ["One variant: nothing is compared, so no seeds are planned."]
    runs = select_runs(suite, frame) if not frame.empty else frame
    base = per_seed(runs, suite.baseline, primary) if not runs.empty else {}
    if len(base) < 2:
        return lines + [f"No spread to plan from: fewer than 2 finished seeds of `{suite.baseline}` are recorded. Run "
                        "a pilot (cnnbench validate SUITE --pilot 3): its runs are reused by the full suite."]
    if margin is None:
        lines.append(f"No report.margin for {primary}: planning for the observed differences (a margin would let a "
                     "comparison end 'equivalent').")
    level = alpha / m
    if suite.report.test == "sign":
        lines.append(f"The sign test (report.test: sign) needs at least {stats.sign_flip_seeds(level)} seeds to exclude "
                     "0, with every difference of one sign, and more when some go the other way; the t-based figures "
                     "below are a guide only.")
    for v in suite.compared():
        if v == suite.baseline:
            continue
        reference = base if suite.reference(v) == suite.baseline else per_seed(runs, suite.reference(v), primary)
        r = stats.paired(per_seed(runs, v, primary), reference, level, wilcoxon=False)
        if r.n < 2:
            lines.append(f"  {v}: fewer than 2 paired seeds recorded")
            continue
        target = (margin * abs(r.baseline_mean) if relative else margin) if margin is not None else abs(r.delta)
        need = stats.seeds_needed(target, r.sd, level) if r.sd > 0 else stats.sign_flip_seeds(level)
        now = stats.detectable(r.sd, r.n, level) if r.sd > 0 else math.nan
        lines.append(f"  {v}: Δ {fmt.delta(r.delta)}, sd of paired differences {magnitude(r.sd, fmt)} over {r.n} seeds"
                     f" (detects ≥ {magnitude(now, fmt)} now); about "
                     + (f"{need} seeds" if need else f"more than {stats.MAX_PLANNED_SEEDS} seeds")
                     + f" to detect {magnitude(target, fmt)}")
    return lines
