"""Statistics against scipy/statsmodels on fixed inputs, censoring on a constructed case, and the adaptive-seed
procedure's error rates and coverage by simulation."""

import math

import numpy as np
import pytest
from scipy import stats as st

from cnnbench import stats

BASE = {0: 0.970, 1: 0.975, 2: 0.968, 3: 0.972, 4: 0.971, 5: 0.969}
VARIANT = {0: 0.974, 1: 0.979, 2: 0.970, 3: 0.976, 4: 0.972, 5: 0.975}
ACC = (0.0, 1.0)


def test_paired_t_matches_scipy_ttest_rel():
    r = stats.paired(VARIANT, BASE, level=0.05)
    v, b = [VARIANT[s] for s in sorted(BASE)], [BASE[s] for s in sorted(BASE)]
    ref = st.ttest_rel(v, b)
    ci = ref.confidence_interval(0.95)
    assert r.n == 6 and r.method == "t"
    assert r.delta == pytest.approx(np.mean(np.subtract(v, b)))
    assert r.p == pytest.approx(ref.pvalue) and (r.low, r.high) == pytest.approx((ci.low, ci.high))
    assert r.p_wilcoxon == pytest.approx(st.wilcoxon(np.subtract(v, b)).pvalue)  # n ≥ 6: robustness column
    narrow = stats.paired(VARIANT, BASE, level=0.01)  # the level sets the interval: 99% here
    ci99 = ref.confidence_interval(0.99)
    assert (narrow.low, narrow.high) == pytest.approx((ci99.low, ci99.high))


def test_only_seeds_finished_by_both_are_paired_and_small_n_has_no_interval():
    r = stats.paired({0: 0.9, 1: 0.8, 7: 0.1}, {0: 0.85, 1: 0.81, 2: 0.5})
    assert r.n == 2 and r.delta == pytest.approx(0.02)
    one = stats.paired({0: 0.9}, {0: 0.8})
    assert one.n == 1 and math.isnan(one.low) and math.isnan(one.p)
    assert stats.paired({0: 0.9}, {1: 0.8}).n == 0
    assert stats.compare_all({"b": BASE, "x": {0: 1.0}}, "b", 0.05, True)["x"].verdict.startswith("too few")


def test_equal_differences_are_not_exact_they_use_the_sign_flip_test():
    """Two seeds both +0.20 pp used to be 'exact, p = 0, better'. Equal differences carry no spread: the exact
    sign-flip test's smallest p is 2^(1−n), so 3 seeds cannot decide and 7 can."""
    base = {0: 0.9700, 1: 0.9750, 2: 0.9680}
    var = {s: v + 0.0020 for s, v in base.items()}
    r = stats.compare_all({"b": base, "v": var}, "b", 0.05, True, bounds=ACC)["v"]
    assert r.method == "sign-flip" and r.p == pytest.approx(0.25) and r.verdict == "inconclusive"
    assert r.high <= 1.0 - np.mean(list(base.values())) + 1e-12 and r.low >= -np.mean(list(base.values())) - 1e-12
    assert r.seeds_needed == 6  # 2^(1−6) = 0.031 < 0.05
    base7 = {s: 0.97 + 0.001 * s for s in range(7)}
    r7 = stats.compare_all({"b": base7, "v": {s: v + 0.002 for s, v in base7.items()}}, "b", 0.05, True)["v"]
    assert r7.p == pytest.approx(2 ** -6) and r7.verdict == "better" and r7.low == pytest.approx(0.002)
    zero = stats.compare_all({"b": base, "v": dict(base)}, "b", 0.05, True)["v"]
    assert zero.p == 1.0 and zero.verdict == "inconclusive"


def test_sign_test_interval_is_scipys_order_statistic_interval_of_the_median():
    d = [-5.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 50.0, 60.0]
    for level in (0.05, 0.01, 0.002):
        r = stats.paired(dict(enumerate(d)), dict.fromkeys(range(10), 0.0), level, test="sign")
        ref = st.quantile_test(d, q=0, p=0.5)
        ci = ref.confidence_interval(1 - level)
        assert r.method == "sign" and r.delta == 2.5 and (r.above, r.below) == (9, 1)
        assert (r.low, r.high) == pytest.approx((ci.low, ci.high)) and r.p == pytest.approx(ref.pvalue)
    too_few = stats.paired(dict(enumerate(d[:5])), dict.fromkeys(range(5), 0.0), 0.05, test="sign")
    assert (too_few.low, too_few.high) == (-math.inf, math.inf)  # 2^(1−5) > 0.05: no interval excludes anything


def test_the_count_on_one_side_that_the_sign_test_needs_is_the_one_at_which_its_interval_leaves_0():
    """What an inconclusive sign test could detect: the fewest seeds on one side that exclude 0. At that count
    (the rest below 0) scipy's interval of the median excludes 0; one fewer, and it does not."""
    for n, level in [(15, 0.0118 / 11), (30, 0.0118 / 11), (30, 0.0118 / 6), (12, 0.05), (10, 0.002)]:
        k = stats.sign_test_side(n, level)
        at = [1.0] * k + [-1.0] * (n - k)
        below = [1.0] * (k - 1) + [-1.0] * (n - k + 1)
        assert st.quantile_test(at, q=0, p=0.5).confidence_interval(1 - level).low > 0
        assert st.quantile_test(below, q=0, p=0.5).confidence_interval(1 - level).low <= 0
    assert (stats.sign_test_side(30, 0.0118 / 11), stats.sign_test_side(30, 0.0118 / 6)) == (25, 24)
    assert stats.sign_test_side(5, 0.05) is None  # 2^(1−5) > 0.05: not even 5 of 5 would


def test_sign_test_decides_where_collapsed_seeds_leave_the_t_interval_open():
    """The normalization/optimizers problem: the variant wins on every seed, but the reference collapses on 3 of
    12, so the differences are +0.5 pp nine times and +59 pp three times. The t-interval spans 0; the sign
    test's interval of the median does not. A timing metric keeps its t-interval whatever the suite's test."""
    base = {s: (0.40 if s in (2, 5, 9) else 0.983 + 0.0005 * (s % 3)) for s in range(12)}
    var = {s: 0.988 + 0.0005 * (s % 3) for s in range(12)}
    t = stats.compare_all({"b": base, "v": var}, "b", 0.05, True, margin=0.005, bounds=ACC)["v"]
    sign = stats.compare_all({"b": base, "v": var}, "b", 0.05, True, margin=0.005, bounds=ACC, test="sign")["v"]
    assert t.verdict == "inconclusive" and t.low < 0
    assert sign.verdict == "better" and sign.delta == pytest.approx(0.005) and sign.low > 0
    timing = stats.compare_all({"b": base, "v": var}, "b", 0.05, False, kind="timing", floor=0.01, test="sign")["v"]
    assert timing.method == "t"
    undecided = stats.compare_all({"b": base, "v": {s: v - (0.01 if s < 4 else -0.01) for s, v in base.items()}},
                                  "b", 0.05, True, test="sign")["v"]
    assert undecided.verdict == "inconclusive" and "8 of 12 paired differences above 0, 4 below" in undecided.notes[0]
    from cnnbench.metrics import metric
    from cnnbench.report.prose import could_detect

    assert could_detect(undecided, metric("test_accuracy")).startswith("8 of 12 paired differences are above 0 and 4 "
                                                                       "below; the sign test's interval of the median is [")


def test_sign_test_error_rate_holds_for_skewed_bimodal_differences():
    """Median 0, but half the mass is a long right tail (collapses): the sign test still rejects at most α."""
    rng = np.random.default_rng(0)
    rejections = 0
    for _ in range(2000):
        d = np.where(rng.random(10) < 0.5, -rng.exponential(0.002, 10), rng.exponential(0.3, 10))
        r = stats.paired(dict(enumerate(d)), dict.fromkeys(range(10), 0.0), 0.05, wilcoxon=False, test="sign")
        rejections += r.low > 0 or r.high < 0
    assert rejections / 2000 <= 0.05


def test_verdicts_better_worse_equivalent_inconclusive():
    worse = {s: v - 0.01 - 0.001 * s for s, v in BASE.items()}
    noise = {s: v + (0.0004 if s % 2 else -0.0004) + 0.0001 * s for s, v in BASE.items()}
    out = stats.compare_all({"base": BASE, "better": VARIANT, "worse": worse, "noise": noise}, "base", 0.05, True,
                            margin=0.002)
    assert out["better"].verdict == "better" and out["worse"].verdict == "worse"
    assert out["noise"].verdict == "equivalent" and -0.002 < out["noise"].low and out["noise"].high < 0.002
    plain = stats.compare_all({"base": BASE, "noise": noise}, "base", 0.05, True)["noise"]  # no margin: cannot be
    assert plain.verdict == "inconclusive" and plain.margin is None  # called equivalent
    assert math.isfinite(plain.mde) and plain.seeds_needed is not None
    lower = stats.compare_all({"base": BASE, "worse": worse}, "base", 0.05, higher_is_better=False)
    assert lower["worse"].verdict == "better"  # for a lower-is-better metric
    neutral = stats.compare_all({"base": BASE, "worse": worse}, "base", 0.05, higher_is_better=None)
    assert neutral["worse"].verdict == "lower"
    rel = stats.compare_all({"base": BASE, "noise": noise}, "base", 0.05, True, margin=0.01, relative_margin=True)
    assert rel["noise"].margin == pytest.approx(0.01 * np.mean(list(BASE.values())))


def test_a_variant_with_a_reference_is_compared_with_it_not_with_the_baseline():
    control = {s: v + 0.01 + 0.0003 * (s % 3) for s, v in BASE.items()}  # e.g. dense, fine-tuned one more epoch
    pruned = {s: v - 0.0002 * (s % 2) for s, v in control.items()}  # as good as its control
    alone = stats.compare_all({"base": BASE, "control": control, "pruned": pruned}, "base", 0.05, True, margin=0.002)
    out = stats.compare_all({"base": BASE, "control": control, "pruned": pruned}, "base", 0.05, True, margin=0.002,
                            references={"pruned": "control"})
    assert alone["pruned"].verdict == "better"  # against the baseline the extra epoch shows
    assert out["pruned"].verdict == "equivalent" and abs(out["pruned"].delta) < 0.001
    assert out["pruned"].baseline_mean == pytest.approx(np.mean(list(control.values())))
    assert out["control"].verdict == alone["control"].verdict == "better"  # the control still faces the baseline
    assert out["pruned"].level == alone["pruned"].level  # one family of 2 comparisons either way


def test_intervals_are_simultaneous_and_agree_with_the_adjusted_p():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n, k = int(rng.integers(2, 9)), int(rng.integers(1, 6))
        base = {s: float(x) for s, x in enumerate(rng.normal(0.9, 0.01, n))}
        per = {"b": base} | {f"v{i}": {s: b + float(rng.normal(0.004 * i, 0.005)) for s, b in base.items()}
                             for i in range(k)}
        for r in stats.compare_all(per, "b", 0.05, True, detail=False).values():
            assert r.level == pytest.approx(0.05 / k)
            excludes = r.low > 0 or r.high < 0
            assert (r.p_adj < 0.05) == excludes and (r.verdict in ("better", "worse")) == excludes


def test_interval_never_leaves_the_metric_range():
    base = {0: 0.9990, 1: 0.9950, 2: 0.9998}
    var = {0: 0.9999, 1: 0.9990, 2: 0.9999}
    r = stats.compare_all({"b": base, "v": var}, "b", 0.05, True, bounds=ACC)["v"]
    assert r.high <= 1 - np.mean(list(base.values())) + 1e-12  # the variant's mean cannot pass 100%


def test_deterministic_metrics_are_facts():
    r = stats.compare_all({"b": {0: 1000.0, 1: 1000.0}, "v": {0: 1022.0, 1: 1022.0}}, "b", 0.05, False,
                          kind="deterministic")["v"]
    assert r.verdict == "fact" and r.method == "fact" and r.delta == 22 and math.isnan(r.p)
    assert r.relative == pytest.approx(0.022)


def test_power_matches_statsmodels():
    from statsmodels.stats.power import TTestPower

    ref = TTestPower()
    for sd, n, level in ((0.004, 3, 0.05), (0.01, 10, 0.0125), (2.0, 25, 0.01)):
        d = stats.detectable(sd, n, level)
        assert d / sd == pytest.approx(ref.solve_power(nobs=n, alpha=level, power=0.8, alternative="two-sided"),
                                       rel=1e-4)
        assert stats.power(d, sd, n, level) == pytest.approx(0.8, abs=1e-6)
    need = stats.seeds_needed(0.002, 0.004, 0.05)
    ref_n = ref.solve_power(effect_size=0.5, alpha=0.05, power=0.8, alternative="two-sided")
    assert need == math.ceil(ref_n)
    assert stats.seeds_needed(1e-9, 1.0, 0.05) is None  # beyond MAX_PLANNED_SEEDS


def test_looks_spend_alpha_over_the_rounds():
    looks = stats.Looks.rounds(3, 20, 3, 0.05)
    assert looks.counts == (3, 6, 9, 12, 15, 18, 20)
    assert sum(looks.spent(k) for k in range(len(looks.counts))) == pytest.approx(0.05)
    assert all(looks.spent(k) > 0 for k in range(len(looks.counts)))
    assert looks.index(3) == 0 and looks.index(4) == 1 and looks.index(20) == 6 and looks.index(99) == 6
    assert stats.Looks.fixed(5, 0.05).level(5) == pytest.approx(0.05)


def _adaptive(diffs: np.ndarray, looks: stats.Looks, margin: float | None) -> stats.Paired:
    """The runner's procedure on synthetic per-seed numbers: read at every look, stop once decided."""
    base = {s: 0.0 for s in range(len(diffs))}
    for k, count in enumerate(looks.counts):
        var = {s: float(diffs[s]) for s in range(count)}
        r = stats.compare_all({"b": {s: base[s] for s in range(count)}, "v": var}, "b", looks.alpha, True,
                              margin=margin, level_alpha=looks.spent(k), detail=False)["v"]
        if r.decided:
            break
    return r


@pytest.mark.parametrize("true_delta,margin", [(0.0, None), (0.0, 0.5), (0.5, 0.5)])
def test_adaptive_seeds_keep_error_rates_and_coverage(true_delta, margin):
    """With no true difference, 'better'/'worse' ≤ α; with a true difference equal to the margin, 'equivalent'
    ≤ α; the interval at stopping covers the truth ≥ 1 − α. Monte-Carlo tolerance: 3 standard errors."""
    alpha, reps = 0.05, 1500
    looks = stats.Looks.rounds(3, 20, 3, alpha)
    rng = np.random.default_rng(20261202)
    wrong = covered = 0
    for _ in range(reps):
        r = _adaptive(rng.normal(true_delta, 1.0, looks.counts[-1]), looks, margin)
        if true_delta == 0:
            wrong += r.verdict in ("better", "worse")
        else:
            wrong += r.verdict == "equivalent"
        covered += r.low <= true_delta <= r.high
    tol = 3 * math.sqrt(alpha * (1 - alpha) / reps)
    assert wrong / reps <= alpha + tol
    assert covered / reps >= 1 - alpha - tol


def test_adaptive_seeds_decide_a_real_difference_and_stop_early():
    looks = stats.Looks.rounds(3, 20, 3, 0.05)
    rng = np.random.default_rng(1)
    stops = [_adaptive(rng.normal(2.0, 1.0, 20), looks, None) for _ in range(200)]
    assert np.mean([r.verdict == "better" for r in stops]) > 0.9
    assert np.median([r.n for r in stops]) < 20  # it stopped before max in most cases


def test_timing_metrics_need_a_floor_and_must_exceed_it():
    base = {s: 1000.0 + 5 * s for s in range(4)}
    faster = {s: v * 1.03 + (s % 2) for s, v in base.items()}  # 3% more img/s, consistently
    none = stats.compare_all({"b": base, "v": faster}, "b", 0.05, True, kind="timing")["v"]
    assert none.verdict == stats.NOT_JUDGED
    above = stats.compare_all({"b": base, "v": faster}, "b", 0.05, True, kind="timing", floor=0.01)["v"]
    assert above.verdict == "better" and above.floor == pytest.approx(0.01 * np.mean(list(base.values())))
    below = stats.compare_all({"b": base, "v": faster}, "b", 0.05, True, kind="timing", floor=0.05)["v"]
    assert below.verdict == "equivalent"  # inside the floor, which is also the least margin


def test_aa_floor_and_interleaved_timing_verdicts():
    rng = np.random.default_rng(0)
    a = list(1.0 + rng.normal(0, 0.01, 15))
    a2 = [x * float(np.exp(rng.normal(0, 0.01))) for x in a]
    r = np.log(np.divide(a2, a))
    half = st.t.ppf(0.975, 14) * r.std(ddof=1) / math.sqrt(15)
    floor = stats.aa_floor(a, a2, 0.05)
    assert floor == pytest.approx(math.expm1(abs(r.mean()) + half))
    same = stats.timing_compare([x * float(np.exp(rng.normal(0, 0.01))) for x in a], a, floor, 0.05, 0.05)
    assert same.verdict == "equivalent"
    slow = stats.timing_compare([2 * x for x in a], a, floor, 0.05, 0.05)
    assert slow.verdict == "worse" and slow.ratio == pytest.approx(2.0)
    fast = stats.timing_compare([0.5 * x for x in a], a, floor, 0.05, 0.05)
    assert fast.verdict == "better"


def test_time_to_target_with_censoring():
    # reached at 1, 2, 3; never reached in runs of 2.5 s and 10 s of training.
    # Kaplan–Meier: S(1) = 4/5, S(2) = 4/5·3/4 = 0.6, (2.5 censored), S(3) = 0.6·1/2 = 0.3 → median 3
    t = stats.time_to_target([1.0, 2.0, 3.0], [2.5, 10.0])
    assert (t.n, t.reached, t.median) == (5, 3, 3.0)
    assert str(t) == "3.00 s (3/5 reached)"
    assert np.median([1.0, 2.0, 3.0]) == 2.0  # dropping the censored runs would have said 2 s
    never = stats.time_to_target([1.0], [5.0, 5.0, 5.0])
    assert math.isinf(never.median) and str(never) == "not reached (1/4 reached)"
    assert stats.time_to_target([4.0, 2.0], []).median == 3.0
def test_performance_profile():
    taus = np.array([1.0, 1.5, 2.0, 4.0])
    rho = stats.performance_profile({"a": [1.0, 2.0, math.inf], "b": [2.0, 2.0, 3.0]}, taus)
    # case 1: best 1 (a), b at 2×; case 2: tie at 2; case 3: only b
    assert rho["a"].tolist() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 2 / 3])
    assert rho["b"].tolist() == pytest.approx([2 / 3, 2 / 3, 1.0, 1.0])
