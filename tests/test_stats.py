"""Statistics against scipy on fixed inputs, Holm on a textbook case, censoring on a constructed case."""

import math

import numpy as np
import pytest
from scipy import stats as st

from cnnbench import stats

BASE = {0: 0.970, 1: 0.975, 2: 0.968, 3: 0.972, 4: 0.971, 5: 0.969}
VARIANT = {0: 0.974, 1: 0.979, 2: 0.970, 3: 0.976, 4: 0.972, 5: 0.975}


def test_paired_t_matches_scipy_ttest_rel():
    r = stats.paired(VARIANT, BASE, alpha=0.05)
    v, b = [VARIANT[s] for s in sorted(BASE)], [BASE[s] for s in sorted(BASE)]
    ref = st.ttest_rel(v, b)
    ci = ref.confidence_interval(0.95)
    assert r.n == 6 and r.method == "t"
    assert r.delta == pytest.approx(np.mean(np.subtract(v, b)))
    assert r.p == pytest.approx(ref.pvalue) and (r.low, r.high) == pytest.approx((ci.low, ci.high))
    assert r.p_wilcoxon == pytest.approx(st.wilcoxon(np.subtract(v, b)).pvalue)  # n ≥ 6: robustness column


def test_only_seeds_finished_by_both_are_paired_and_small_n_has_no_interval():
    r = stats.paired({0: 0.9, 1: 0.8, 7: 0.1}, {0: 0.85, 1: 0.8, 2: 0.5})
    assert r.n == 2 and r.delta == pytest.approx(0.025)
    one = stats.paired({0: 0.9}, {0: 0.8})
    assert one.n == 1 and math.isnan(one.low) and math.isnan(one.p)
    assert stats.paired({0: 0.9}, {1: 0.8}).n == 0
    assert math.isnan(stats.paired({0: 1.0, 1: 2.0, 2: 3.0}, {0: 1.0, 1: 2.0, 2: 3.0}).p_wilcoxon)


def test_identical_differences_are_exact():
    r = stats.paired({0: 10.0, 1: 12.0, 2: 11.0}, {0: 9.0, 1: 11.0, 2: 10.0})
    assert r.method == "exact" and (r.delta, r.low, r.high, r.p) == (1.0, 1.0, 1.0, 0.0)


def test_large_n_uses_a_seeded_bootstrap():
    rng = np.random.default_rng(1)
    base = {s: float(x) for s, x in enumerate(rng.normal(0.9, 0.01, 25))}
    var = {s: base[s] + float(rng.normal(0.002, 0.003)) for s in base}
    a, b = stats.paired(var, base), stats.paired(var, base)
    assert a.method == "bootstrap" and (a.low, a.high) == (b.low, b.high)
    t_ci = st.ttest_1samp([var[s] - base[s] for s in base], 0).confidence_interval(0.95)
    assert a.low == pytest.approx(t_ci.low, abs=6e-4) and a.high == pytest.approx(t_ci.high, abs=6e-4)


def test_holm_textbook_case():
    # sorted 0.005, 0.01, 0.03, 0.04 × 4, 3, 2, 1 → 0.02, 0.03, 0.06, 0.04 → monotone: 0.02, 0.03, 0.06, 0.06
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.5, math.nan, 0.01])[0] == pytest.approx(0.5)
    assert math.isnan(stats.holm([0.5, math.nan, 0.01])[1]) and stats.holm([0.5, math.nan, 0.01])[2] == pytest.approx(0.02)
    assert stats.holm([0.9, 0.8]) == [1.0, 1.0]  # 0.8·2 = 1.6 is capped at 1; monotone after it


def test_verdicts_and_holm_across_variants():
    worse = {s: v - 0.01 - 0.001 * s for s, v in BASE.items()}
    noise = {s: v + (0.001 if s % 2 else -0.001) for s, v in BASE.items()}
    out = stats.compare_all({"base": BASE, "better": VARIANT, "worse": worse, "noise": noise}, "base", 0.05, True)
    assert out["better"].verdict == "better" and out["worse"].verdict == "worse"
    assert out["noise"].verdict == "no evidence of a difference"
    assert out["better"].p_holm >= out["better"].p
    lower = stats.compare_all({"base": BASE, "worse": worse}, "base", 0.05, higher_is_better=False)
    assert lower["worse"].verdict == "better"  # for a lower-is-better metric
    assert stats.compare_all({"base": BASE, "x": {0: 1.0}}, "base", 0.05, True)["x"].verdict.startswith("too few")


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
