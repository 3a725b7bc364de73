"""Paired statistics for verdicts (scipy.stats does the distributions; no torch).

For a variant against the baseline, the unit is the seed: seed s of both shares data order (and
initial weights for the same architecture), so the differences d_s = variant_s − baseline_s are
analysed, not the two groups. For each metric:

* mean paired Δ with a confidence interval — Student t on d (``scipy.stats.ttest_1samp``); a
  seeded BCa bootstrap instead when n ≥ ``BOOTSTRAP_MIN_N`` (with as few seeds as suites usually
  have, a bootstrap interval is too narrow to trust);
* p-value of the paired t-test, and of the Wilcoxon signed-rank test as a robustness column when
  n ≥ 6 (below that it cannot reach p < 0.05);
* Holm's step-down correction across the suite's variants, per metric;
* a verdict in words at the suite's alpha: better / worse / no evidence of a difference.

Time-to-target is right-censored: a run that never reaches the target is censored at its total
training time, and the median comes from the Kaplan–Meier estimate (``scipy.stats.ecdf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BOOTSTRAP_MIN_N = 20
WILCOXON_MIN_N = 6
BOOTSTRAP_SEED = 0


@dataclass
class Paired:
    """Variant − baseline on the seeds both finished."""

    n: int
    delta: float  # mean paired difference
    low: float  # CI bounds (nan when n < 2)
    high: float
    p: float  # paired t-test (nan when n < 2)
    p_wilcoxon: float = math.nan
    p_holm: float = math.nan
    method: str = "t"  # t | bootstrap
    verdict: str = ""


def paired(variant: dict[int, float], baseline: dict[int, float], alpha: float = 0.05) -> Paired:
    """Compare per-seed values (seed → value); only seeds present and finite in both count."""
    from scipy import stats

    seeds = sorted(s for s in variant if s in baseline and np.isfinite(variant[s]) and np.isfinite(baseline[s]))
    d = np.array([variant[s] - baseline[s] for s in seeds], dtype=float)
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return Paired(1, mean, math.nan, math.nan, math.nan)
    if np.all(d == d[0]):  # no spread: the difference is exact (e.g. a deterministic metric such as params)
        return Paired(n, mean, mean, mean, 1.0 if mean == 0 else 0.0, method="exact")
    res = stats.ttest_1samp(d, 0.0)
    ci = res.confidence_interval(confidence_level=1 - alpha)
    out = Paired(n, mean, float(ci.low), float(ci.high), float(res.pvalue))
    if n >= BOOTSTRAP_MIN_N:
        boot = stats.bootstrap((d,), np.mean, confidence_level=1 - alpha, method="BCa",
                               rng=np.random.default_rng(BOOTSTRAP_SEED))
        out.low, out.high, out.method = float(boot.confidence_interval.low), float(boot.confidence_interval.high), "bootstrap"
    if n >= WILCOXON_MIN_N and np.any(d != 0):
        out.p_wilcoxon = float(stats.wilcoxon(d).pvalue)
    return out


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (nan entries stay nan and do not count)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    m, running = len(order), 0.0
    out = [math.nan] * len(pvalues)
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(result: Paired, alpha: float, higher_is_better: bool) -> str:
    if result.n < 2 or math.isnan(result.p_holm):
        return f"too few paired seeds (n={result.n})"
    if result.p_holm >= alpha:
        return "no evidence of a difference"
    return "better" if (result.delta > 0) == higher_is_better else "worse"


def compare_all(per_variant: dict[str, dict[int, float]], baseline: str, alpha: float,
                higher_is_better: bool) -> dict[str, Paired]:
    """Every variant vs the baseline on one metric, Holm-corrected across the variants."""
    results = {v: paired(vals, per_variant.get(baseline, {}), alpha) for v, vals in per_variant.items() if v != baseline}
    adjusted = holm([r.p for r in results.values()])
    for r, p in zip(results.values(), adjusted):
        r.p_holm = p
        r.verdict = verdict(r, alpha, higher_is_better)
    return results


@dataclass
class TimeToTarget:
    n: int
    reached: int
    median: float  # Kaplan–Meier median (inf when fewer than half reach the target)

    def __str__(self) -> str:
        if self.n == 0:
            return "–"
        med = "not reached" if math.isinf(self.median) else f"{self.median:.2f} s"
        return f"{med} ({self.reached}/{self.n} reached)"


def time_to_target(reached_s: list[float], censored_s: list[float]) -> TimeToTarget:
    """Median time to target with right censoring: ``censored_s`` are runs that never reached it,
    censored at their total training time."""
    from scipy import stats

    reached = [t for t in reached_s if np.isfinite(t)]
    censored = [t for t in censored_s if np.isfinite(t)]
    n = len(reached) + len(censored)
    if not reached:
        return TimeToTarget(n, 0, math.inf)
    if not censored:
        return TimeToTarget(n, n, float(np.median(reached)))
    sf = stats.ecdf(stats.CensoredData(uncensored=reached, right=censored)).sf
    below = np.nonzero(sf.probabilities <= 0.5)[0]
    return TimeToTarget(n, len(reached), float(sf.quantiles[below[0]]) if len(below) else math.inf)


def performance_profile(times: dict[str, list[float]], taus: np.ndarray) -> dict[str, np.ndarray]:
    """AlgoPerf-style profile: ``times`` maps a variant to its time-to-target per case (inf: never),
    the same cases in the same order for every variant. ρ(τ) = fraction of cases within τ× the best."""
    arr = np.array(list(times.values()), dtype=float)  # variants × cases
    best = np.min(arr, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(np.isfinite(best), arr / best, np.inf)
    return {v: np.array([(ratio[i] <= tau).mean() for tau in taus]) for i, v in enumerate(times)}
