"""The study's statistics against independent truths: scipy's distributions and hand-computed values."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from ettin_jax.evaluation import stats


def test_bootstrap_ci_matches_the_binomial_it_resamples():
    # d = a - b is 1 on k of n items and 0 elsewhere: a resampled mean is Binomial(n, k/n) / n, so the percentile
    # CI is that binomial's 2.5% and 97.5% quantiles over n (up to Monte Carlo error and one step of 1/n).
    n, k = 400, 60
    a = np.r_[np.ones(k), np.zeros(n - k)]
    b = np.zeros(n)
    out = stats.paired_bootstrap(a, b, n_boot=20_000, seed=1)
    assert out["effect"] == pytest.approx(k / n)
    lo, hi = sps.binom.ppf([0.025, 0.975], n, k / n) / n
    assert out["ci"][0] == pytest.approx(lo, abs=1.5 / n)
    assert out["ci"][1] == pytest.approx(hi, abs=1.5 / n)
    assert out["p"] == pytest.approx(1 / 20_000)  # 0 is ~8 standard errors away: never reached


def test_bootstrap_p_of_a_null_difference_is_large_and_pairing_matters():
    rng = np.random.default_rng(0)
    base = rng.random(500)
    noise = rng.normal(0, 0.01, 500)
    # a tiny but consistent shift on the same items: the pairing makes it overwhelming
    paired = stats.paired_bootstrap(base + 0.01 + noise, base, n_boot=4000)
    assert paired["p"] < 0.001 and paired["ci"][0] > 0
    # the same sizes, a difference centred on 0: the CI covers 0 and p is not small
    null = stats.paired_bootstrap(base + noise, base, n_boot=4000)
    assert null["ci"][0] < 0 < null["ci"][1] and null["p"] > 0.05


def test_bootstrap_two_sided_p_agrees_with_the_normal_approximation():
    # a large sample of differences with mean 0.05 and sd 1: p ~ 2 * (1 - Phi(0.05 * sqrt(n)))
    rng = np.random.default_rng(3)
    d = rng.normal(0, 1, 1600)
    d = d - d.mean() + 0.05
    out = stats.paired_bootstrap(d, np.zeros_like(d), n_boot=20_000)
    expected = 2 * sps.norm.sf(0.05 / (d.std(ddof=1) / math.sqrt(d.size)))
    assert out["p"] == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("b10,b01", [(0, 0), (1, 0), (7, 2), (30, 18), (120, 151), (700, 640)])
def test_mcnemar_against_scipy(b10, b01):
    n_same = 50
    a = np.r_[np.ones(b10), np.zeros(b01), np.ones(n_same), np.zeros(n_same)]
    b = np.r_[np.zeros(b10), np.ones(b01), np.ones(n_same), np.zeros(n_same)]
    out = stats.mcnemar(a, b)
    assert (out["b10"], out["b01"]) == (b10, b01)
    n = b10 + b01
    exact = sps.binomtest(b10, n, 0.5).pvalue if n else 1.0
    assert out["p_exact"] == pytest.approx(exact, rel=1e-9)
    if n:
        chi2 = sps.chi2.sf((abs(b10 - b01) - 1) ** 2 / n, 1)
        assert out["p_chi2"] == pytest.approx(chi2, rel=1e-9)


def test_mcnemar_by_hand():
    # 8 discordant pairs, all one way: p = 2 * (1/2)^8 = 1/128
    out = stats.mcnemar([1] * 8 + [0, 1], [0] * 8 + [0, 1])
    assert out["p_exact"] == pytest.approx(1 / 128)
    assert out["statistic"] == pytest.approx(49 / 8)
    with pytest.raises(ValueError, match="0/1"):
        stats.mcnemar([0.5], [1])


def test_power_figures_against_the_textbook_formula():
    # n per group for a difference of two proportions at p = 0.5, alpha 0.05 two-sided, power 0.8:
    # (1.95996 + 0.84162)^2 * (0.25 + 0.25) / 0.05^2 = 1569.8 -> 1570
    assert stats.n_for_mde(0.05) == 1570
    z = sps.norm.ppf(0.975) + sps.norm.ppf(0.8)
    assert stats.mde(1570) == pytest.approx(z * math.sqrt(0.5 / 1570))
    assert stats.mde(1570) <= 0.05 < stats.mde(1569)
    # the figure: at n = 360 only ~10 points are detectable
    assert stats.mde(360) == pytest.approx(0.1044, abs=5e-4)
    assert stats.mde(100, sd=0.25) == pytest.approx(stats.mde(400, sd=0.5))


def test_verdict():
    assert stats.verdict(0.06, 0.01, +1) == "agrees"
    assert stats.verdict(-0.06, 0.01, +1) == "reverses"
    assert stats.verdict(0.06, 0.2, +1) == "tie"
    assert stats.verdict(-0.06, 0.001, -1) == "agrees"
