"""Paired statistics that decide (scipy.stats does the distributions; no torch).

For a variant against the baseline, the unit is the seed: seed s of both shares data order (and
initial weights for the same architecture), so the differences d_s = variant_s − baseline_s are
analysed, not the two groups. Each comparison ends in one of four words:

* **better** / **worse** — the interval lies beyond 0 (beyond the noise floor, for timing metrics);
* **equivalent** — the interval lies inside ±margin (the suite's ``report.margin``: the smallest
  difference that matters). Checked first: a difference smaller than what matters is not a finding;
* **inconclusive** — neither; the comparison then says the smallest effect it could have detected
  (80% power) and about how many seeds would detect the margin.

One interval decides everything, so a verdict and its interval always agree: the paired t-interval
at level 1 − α_k/m, where m is the number of variants compared with the baseline (Bonferroni: the
intervals hold simultaneously) and α_k is the share of α spent at the current look. A fixed seed list
has one look (α_k = α). Adaptive seeds (``seeds: {min, max}``) look after every round and spend α over
the planned looks with the Lan–DeMets Pocock-type function α·ln(1 + (e − 1)·t); the union bound makes
the intervals valid simultaneously over every look, so stopping when everything is decided (or at any
other time) keeps the error rates ≤ α. Conservative, and valid under any stopping rule — also per
comparison: a variant decided at a look can leave the later rounds (``seeds.drop_decided``), and its
verdict is then read at the α of its own last look, the one that decided it.

Metrics whose value is the same for every seed of a config (parameters, FLOPs, size: ``deterministic``
in the metric catalogue) are facts, stated with their relative change, never tested. When every paired
difference of a measured metric is equal (accuracies are multiples of 1/test-set size, so two seeds can
differ by exactly +0.20 pp both), the t-test is undefined; the exact sign-flip test is used instead,
whose smallest two-sided p is 2^(1 − n): with few seeds that is inconclusive, not "exact".

Where some seeds of a recipe collapse (a learning rate at the edge of stability, plain SGD at its default
rate), the paired differences are a mixture of a small shift and a few huge ones: the t-interval then spans
tens of points and decides nothing, though the variant wins on every seed. A suite that trains in such a
regime can choose ``report.test: sign`` before it runs: Δ is then the *median* paired difference and its
interval the distribution-free one from order statistics (the sign test inverted), valid for any
distribution of the differences, ties included. Its price: with n seeds it can exclude 0 only when
2^(1 − n) < the per-comparison level, so it needs a few more seeds than the t-test on well-behaved data.

Time-to-target is right-censored: a run that never reaches the target is censored at its total
training time, and the median comes from the Kaplan–Meier estimate (``scipy.stats.ecdf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

WILCOXON_MIN_N = 6
POWER = 0.8  # for minimum detectable effects and seed planning
MAX_PLANNED_SEEDS = 1000
NOT_JUDGED = "not judged (no noise floor)"
DIVERGED = "diverged"  # every run of the variant diverged where its reference finished: it did not train


# ── looks: fixed seeds (one look) or adaptive rounds ──────────────────────────────────────────────


@dataclass(frozen=True)
class Looks:
    """The seed counts at which a suite may stop, and the α each look spends (Pocock-type spending)."""

    counts: tuple[int, ...]
    alpha: float

    @classmethod
    def fixed(cls, n: int, alpha: float) -> Looks:
        return cls((n,), alpha)

    @classmethod
    def rounds(cls, first: int, last: int, per_round: int, alpha: float) -> Looks:
        counts = list(range(first, last, per_round)) + [last]
        return cls(tuple(dict.fromkeys(counts)), alpha)

    def spent(self, k: int) -> float:
        """α spent at look k (0-based); the spends sum to α."""
        def f(t: float) -> float:
            return self.alpha * math.log(1 + (math.e - 1) * t)

        last = self.counts[-1]
        return f(self.counts[k] / last) - (f(self.counts[k - 1] / last) if k else 0.0)

    def index(self, n_seeds: int) -> int:
        """The look whose α a reading with ``n_seeds`` run uses: the first planned look at or above it
        (a round cut short reads at the level of the look it was heading for)."""
        return next((k for k, c in enumerate(self.counts) if c >= n_seeds), len(self.counts) - 1)

    def level(self, n_seeds: int) -> float:
        return self.spent(self.index(n_seeds))

    def describe(self) -> str:
        if len(self.counts) == 1:
            return f"one look at {self.counts[0]} seeds, α = {self.alpha:g}"
        spends = ", ".join(f"{c}: {self.spent(k):.4f}" for k, c in enumerate(self.counts))
        return (f"looks at {', '.join(map(str, self.counts))} seeds; α = {self.alpha:g} spent over them with the "
                f"Pocock-type function α·ln(1 + (e − 1)·t) ({spends}), Bonferroni over the looks")


# ── power ──────────────────────────────────────────────────────────────────────────────────────────


def power(effect: float, sd: float, n: int, level: float) -> float:
    """Power of the two-sided paired t-test at ``level`` to detect a true mean difference ``effect``
    with differences of standard deviation ``sd`` over ``n`` seeds (noncentral t)."""
    from scipy import stats

    if n < 2 or sd <= 0:
        return math.nan
    df, nc = n - 1, abs(effect) * math.sqrt(n) / sd
    crit = stats.t.ppf(1 - level / 2, df)
    p = float(stats.nct.sf(crit, df, nc) + stats.nct.cdf(-crit, df, nc))
    if math.isnan(p):  # scipy's noncentral t gives up far in the tail (few seeds, a huge noncentrality)
        p = 1.0 if nc > crit else 0.0
    return p


def detectable(sd: float, n: int, level: float, target_power: float = POWER) -> float:
    """Minimum detectable effect: the smallest true difference the test finds with ``target_power``."""
    from scipy.optimize import brentq

    if n < 2 or not sd > 0:
        return math.nan
    hi = sd
    while power(hi, sd, n, level) < target_power:
        hi *= 2
    return float(brentq(lambda e: power(e, sd, n, level) - target_power, 0.0, hi, xtol=sd * 1e-9))


def seeds_needed(effect: float, sd: float, level: float, target_power: float = POWER) -> int | None:
    """The fewest seeds whose test detects ``effect`` with ``target_power`` (None: more than
    ``MAX_PLANNED_SEEDS``, or nothing to plan from)."""
    if not (effect and sd > 0 and math.isfinite(effect) and math.isfinite(sd)):
        return None
    if power(effect, sd, MAX_PLANNED_SEEDS, level) < target_power:
        return None
    lo, hi = 2, MAX_PLANNED_SEEDS  # power grows with n: bisect for the first n that reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if power(effect, sd, mid, level) < target_power else (lo, mid)
    return lo


def seeds_to_decide(delta: float, sd: float, level: float, margin: float | None) -> int | None:
    """The fewest seeds whose interval at ``level`` would decide a comparison if its mean difference and spread
    stayed at ``delta`` and ``sd``: narrower than |Δ| (it excludes 0) or than margin − |Δ| (it lies inside
    ±margin), whichever comes first. A point plan (about even odds), for a comparison whose seeds a fixed-seed
    plan for the margin calls enough, but whose Δ sits between 0 and the margin (None: more than
    ``MAX_PLANNED_SEEDS``)."""
    from scipy import stats

    half = max(abs(delta), (margin or 0.0) - abs(delta))
    if not (half > 0 and sd > 0 and math.isfinite(half) and math.isfinite(sd)):
        return None
    for n in range(2, MAX_PLANNED_SEEDS + 1):
        if stats.t.ppf(1 - level / 2, n - 1) * sd / math.sqrt(n) < half:
            return n
    return None


def sign_flip_seeds(level: float) -> int:
    """Seeds whose differences, all of one sign, reach ``level`` in the exact sign-flip test: 2^(1−n) < level."""
    return max(2, math.floor(1 - math.log2(level)) + 1)


def sign_test_side(n: int, level: float) -> int | None:
    """The fewest of ``n`` paired differences that must lie on one side of 0 (zeros count against) for the
    two-sided sign test to exclude 0 at ``level``; None when not even all ``n`` would."""
    from scipy import stats

    return next((k for k in range(n // 2 + 1, n + 1) if 2 * stats.binom.cdf(n - k, n, 0.5) <= level), None)


# ── one comparison ─────────────────────────────────────────────────────────────────────────────────


@dataclass
class Paired:
    """Variant − baseline on the seeds both finished, with its verdict."""

    n: int
    delta: float  # mean paired difference (the median for the sign test)
    low: float  # simultaneous interval (nan when n < 2), clipped to the metric's range
    high: float
    p: float  # the per-comparison test (paired t; exact sign-flip when all differences are equal)
    p_adj: float = math.nan  # p × m × α/α_k, capped at 1: below α exactly when the interval excludes 0
    p_wilcoxon: float = math.nan
    method: str = "t"  # t | sign-flip (t with no spread) | sign (median, order-statistic interval) | fact
    verdict: str = ""
    sd: float = math.nan  # of the paired differences
    level: float = math.nan  # per-comparison two-sided level α_k/m
    baseline_mean: float = math.nan
    margin: float | None = None  # equivalence margin used (absolute, metric units)
    floor: float = 0.0  # a difference must exceed this to be better/worse (timing: the A/A noise floor)
    mde: float = math.nan  # minimum detectable effect at n, 80% power, at ``level``
    seeds_for: float = math.nan  # the effect the planning is for (the margin, else the observed |Δ|)
    seeds_needed: int | None = None  # seeds for a fixed-seed run to detect ``seeds_for``
    seeds_to_decide: int | None = None  # when ``seeds_needed`` ≤ n: seeds to decide at this Δ and spread
    above: int = 0  # paired differences above 0 and below it (the sign test's counts)
    below: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def relative(self) -> float:
        """Δ as a fraction of the baseline's mean."""
        return self.delta / abs(self.baseline_mean) if self.baseline_mean else math.nan

    @property
    def decided(self) -> bool:
        return self.verdict in ("better", "worse", "equivalent", "higher", "lower", "fact", DIVERGED)


def paired(variant: dict[int, float], baseline: dict[int, float], level: float = 0.05, wilcoxon: bool = True,
           test: str = "t") -> Paired:
    """The paired difference on seeds present and finite in both, with its two-sided interval at ``level``
    (no verdict: :func:`compare_all` decides). ``test``: ``t`` (mean, t-interval) or ``sign`` (median,
    order-statistic interval). The t-test is written out (scipy's t distribution) because the adaptive-seed
    simulations call it a hundred thousand times; tests check it against ``ttest_rel``."""
    from scipy import stats

    seeds = sorted(s for s in variant if s in baseline and np.isfinite(variant[s]) and np.isfinite(baseline[s]))
    d = np.array([variant[s] - baseline[s] for s in seeds], dtype=float)
    b = np.array([baseline[s] for s in seeds], dtype=float)
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, level=level)
    mean = float(d.mean())
    out = Paired(n, mean, math.nan, math.nan, math.nan, level=level, baseline_mean=float(b.mean()))
    if n < 2:
        return out
    out.sd = float(d.std(ddof=1))
    out.above, out.below = int((d > 0).sum()), int((d < 0).sum())
    if test == "sign":
        _sign_interval(out, d, level)
    elif np.ptp(d) <= 1e-12 * max(1.0, float(np.abs(d).max())):  # no spread (up to float rounding of the values): the t statistic is undefined, the sign-flip test is exact
        out.method, out.sd = "sign-flip", 0.0
        out.p = 1.0 if mean == 0 else min(1.0, 2.0 ** (1 - n))
        # inverting the test: every shift but the observed one is rejected iff 2^(1−n) < level
        out.low, out.high = (mean, mean) if 2.0 ** (1 - n) < level else (-math.inf, math.inf)
    else:
        se = out.sd / math.sqrt(n)
        half = float(stats.t.ppf(1 - level / 2, n - 1)) * se
        out.low, out.high = mean - half, mean + half
        out.p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    if wilcoxon and n >= WILCOXON_MIN_N and np.any(d != 0):
        out.p_wilcoxon = float(stats.wilcoxon(d).pvalue)
    return out


def _sign_interval(out: Paired, d: np.ndarray, level: float) -> None:
    """Median of ``d`` with the sign test's order-statistic interval (``scipy.stats.quantile_test``; its
    coverage is at least 1 − level for any distribution; unbounded when n is too small for any), and the
    two-sided sign test of the signs."""
    from scipy import stats

    out.method, out.delta = "sign", float(np.median(d))
    ci = stats.quantile_test(d, q=0, p=0.5).confidence_interval(1 - level)
    out.low, out.high = (float(ci.low), float(ci.high)) if np.isfinite(ci.low) else (-math.inf, math.inf)
    # zeros count against the claim, as in the interval: p ≤ level exactly when the interval excludes 0
    out.p = min(1.0, float(2 * stats.binom.cdf(len(d) - max(out.above, out.below), len(d), 0.5)))


def fact(variant: dict[int, float], baseline: dict[int, float]) -> Paired:
    """A deterministic metric: the difference of the means, stated, not tested."""
    v = [x for x in variant.values() if np.isfinite(x)]
    b = [x for x in baseline.values() if np.isfinite(x)]
    if not v or not b:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, method="fact")
    delta = float(np.mean(v) - np.mean(b))
    return Paired(min(len(v), len(b)), delta, delta, delta, math.nan, method="fact", verdict="fact",
                  baseline_mean=float(np.mean(b)))


def decide(r: Paired, higher_is_better: bool | None) -> str:
    """better / worse / equivalent / inconclusive from the interval (neutral metrics: higher / lower)."""
    if r.n < 2 or math.isnan(r.low):
        return f"too few paired seeds (n={r.n})"
    if r.margin is not None and -r.margin < r.low and r.high < r.margin:
        return "equivalent"
    up = r.low > r.floor
    down = r.high < -r.floor
    if not (up or down):
        return "inconclusive"
    if higher_is_better is None:
        return "higher" if up else "lower"
    return "better" if up == higher_is_better else "worse"


def clip(r: Paired, bounds: tuple[float, float] | None) -> None:
    """Keep the interval of Δ inside what the metric can take given the baseline's mean (an accuracy
    interval never passes 100%)."""
    if bounds is None or math.isnan(r.baseline_mean) or math.isnan(r.low):
        return
    lo, hi = bounds[0] - r.baseline_mean, bounds[1] - r.baseline_mean
    r.low, r.high = max(r.low, lo), min(r.high, hi)


def compare_all(per_variant: dict[str, dict[int, float]], baseline: str, alpha: float,
                higher_is_better: bool | None, *, kind: str = "stochastic", margin: float | None = None,
                relative_margin: bool = False, floor: float | None = None,
                level_alpha: float | dict[str, float] | None = None,
                bounds: tuple[float, float] | None = None, detail: bool = True,
                references: dict[str, str] | None = None, test: str = "t") -> dict[str, Paired]:
    """Every variant vs the baseline on one metric (vs ``references[variant]`` where one is given).

    ``kind``: the catalogue's (``deterministic`` metrics are stated as facts). ``margin``: equivalence
    margin in the metric's units (``relative_margin``: as a fraction of the baseline's mean). ``floor``:
    for timing metrics, the relative A/A noise floor a difference must exceed (it is also the least
    equivalence margin); None for a timing metric means no floor was measured, and such a comparison
    gets no better/worse verdict. ``level_alpha``: α spent at this look (default ``alpha``: one look), or
    variant → α spent at the look that variant reached (variants that left the later rounds once decided).
    ``detail``: also the Wilcoxon column, the detectable effect and the seeds needed (slower; a stopping
    decision does not need them). ``test``: ``t`` or ``sign`` (see the module docstring) for measured
    metrics; timing metrics keep the t-interval of their A/A protocol.
    """
    references = references or {}

    def base(v: str) -> dict[int, float]:
        return per_variant.get(references.get(v, baseline), {})

    others = [v for v in per_variant if v != baseline]
    if kind == "deterministic":
        return {v: fact(per_variant[v], base(v)) for v in others}
    m = max(1, len(others))
    out = {}
    for v in others:
        spent = level_alpha.get(v, alpha) if isinstance(level_alpha, dict) else level_alpha or alpha
        level = spent / m
        r = paired(per_variant[v], base(v), level, wilcoxon=detail, test=test if kind == "stochastic" else "t")
        scale = abs(r.baseline_mean) if r.baseline_mean == r.baseline_mean else math.nan
        r.margin = (margin * scale if relative_margin else margin) if margin is not None else None
        if kind == "timing" and floor is not None:
            r.floor = floor * scale
            r.margin = max(r.margin or 0.0, r.floor)
        clip(r, bounds)
        if not math.isnan(r.p):
            r.p_adj = min(1.0, r.p * alpha / level)
        r.verdict = decide(r, higher_is_better)
        if kind == "timing" and floor is None and r.n >= 2:
            r.verdict = NOT_JUDGED  # one training run per variant and seed is not a timing comparison
            r.notes.append("no A/A noise floor was measured for this suite, so timing differences are not judged")
        elif r.method == "sign" and r.verdict == "inconclusive":
            r.seeds_needed = sign_flip_seeds(level)
            r.notes.append(f"sign test: {r.above} of {r.n} paired differences above 0, {r.below} below"
                           + (f"; it cannot exclude 0 with fewer than {r.seeds_needed} seeds"
                              if r.n < r.seeds_needed else ""))
        elif r.method == "sign-flip" and r.verdict == "inconclusive":
            r.seeds_needed = sign_flip_seeds(level)
            r.notes.append(f"all {r.n} paired differences are equal: the exact sign-flip test needs "
                           f"{r.seeds_needed} seeds to decide")
        elif r.n >= 2 and detail and r.sd > 0:
            r.mde = detectable(r.sd, r.n, level)
            r.seeds_for = r.margin if r.margin else abs(r.delta)
            r.seeds_needed = seeds_needed(r.seeds_for, r.sd, alpha / m)
            if r.verdict == "inconclusive" and r.seeds_needed is not None and r.seeds_needed <= r.n:
                r.seeds_to_decide = seeds_to_decide(r.delta, r.sd, level, r.margin)  # at the level of its interval
        out[v] = r
    return out


# ── timing: interleaved rounds and the A/A noise floor ─────────────────────────────────────────────


@dataclass
class TimingComparison:
    """A variant's latency against the baseline's, per interleaved round (log ratios)."""

    n: int  # rounds
    ratio: float  # geometric mean of variant / baseline over rounds (above 1: slower)
    low: float  # simultaneous interval of the ratio
    high: float
    floor: float  # relative A/A noise floor
    margin: float
    verdict: str


def aa_floor(a: list[float], a_again: list[float], level: float) -> float:
    """The relative difference the baseline shows against itself: |mean log ratio| plus its interval's
    half-width at ``level`` (per-round pairs of the two copies). A timing difference must exceed it."""
    from scipy import stats

    r = np.log(np.asarray(a_again, dtype=float) / np.asarray(a, dtype=float))
    if len(r) < 2:
        return math.nan
    half = stats.t.ppf(1 - level / 2, len(r) - 1) * r.std(ddof=1) / math.sqrt(len(r))
    return float(math.expm1(abs(r.mean()) + half))


def timing_compare(variant: list[float], baseline: list[float], floor: float, margin: float,
                   level: float) -> TimingComparison:
    """Lower is better (times). Faster/slower when the ratio's interval lies beyond 1 ± floor,
    equivalent when it lies inside 1 ± max(margin, floor)."""
    from scipy import stats

    r = np.log(np.asarray(variant, dtype=float) / np.asarray(baseline, dtype=float))
    n = len(r)
    if n < 2:
        return TimingComparison(n, math.nan, math.nan, math.nan, floor, margin, "too few rounds")
    half = stats.t.ppf(1 - level / 2, n - 1) * r.std(ddof=1) / math.sqrt(n) if r.std() > 0 else 0.0
    ratio, low, high = (float(math.exp(x)) for x in (r.mean(), r.mean() - half, r.mean() + half))
    band = max(margin, floor)
    if 1 / (1 + band) < low and high < 1 + band:
        verdict = "equivalent"
    elif low > 1 + floor:
        verdict = "worse"
    elif high < 1 / (1 + floor):
        verdict = "better"
    else:
        verdict = "inconclusive"
    return TimingComparison(n, ratio, low, high, floor, band, verdict)


# ── time to target ─────────────────────────────────────────────────────────────────────────────────


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
