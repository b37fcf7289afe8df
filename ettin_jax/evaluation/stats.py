"""Paired significance tests and power for comparing two models on the same items.

`paired_bootstrap` (effect, percentile 95% CI and two-sided p of mean(a - b) by resampling items), `mcnemar`
(exact binomial and continuity-corrected chi-square p-values over the discordant pairs of two 0/1 score vectors),
`mde` / `n_for_mde` (the smallest difference of two means of [0, 1]-bounded per-item scores that a two-sided test at
level alpha detects with the given power, by the normal approximation: (z_{1-alpha/2} + z_power) * sd * sqrt(2 / n)).
Plain Python and numpy; the tests check them against scipy and hand-computed values.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

import numpy as np


def _pair(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired scores must be two equal-length non-empty vectors, got {a.shape} and {b.shape}")
    return a, b


def paired_bootstrap(a: Sequence[float], b: Sequence[float], n_boot: int = 10_000, seed: int = 0,
                     alpha: float = 0.05) -> dict:
    """Paired bootstrap over items of the difference of means mean(a) - mean(b).

    Returns effect, the percentile (1 - alpha) CI, and a two-sided p-value: the share of resampled differences
    at least as far from the observed one as the observed one is from 0 (the bootstrap distribution shifted to
    the null, Efron & Tibshirani 1993 section 16.4), floored at 1 / n_boot.
    """
    a, b = _pair(a, b)
    d = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 1000):  # chunks keep the index matrix small
        k = min(1000, n_boot - start)
        means[start:start + k] = d[rng.integers(0, d.size, size=(k, d.size))].mean(1)
    effect = float(d.mean())
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    p = float(np.mean(np.abs(means - effect) >= abs(effect) - 1e-12)) if effect != 0 else 1.0
    return dict(effect=effect, ci=(float(lo), float(hi)), p=max(p, 1.0 / n_boot), n=int(d.size),
                sd_diff=float(d.std(ddof=1)) if d.size > 1 else 0.0)


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair trials: 2 * P(X <= min(k, n - k)), capped at 1."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1))  # exact integers: no underflow at n in the thousands
    return min(1.0, 2 * tail / 2 ** n)


def mcnemar(a_correct: Sequence[int], b_correct: Sequence[int]) -> dict:
    """McNemar's test of two 0/1 correctness vectors on the same items.

    b10: items a gets right and b wrong, b01 the reverse. `p_exact`: the exact binomial test of b10 among the
    b10 + b01 discordant items at 1/2; `p_chi2`: (|b10 - b01| - 1)^2 / (b10 + b01) against chi-square(1)
    (Edwards' continuity correction). The exact p is the one to use when b10 + b01 is small (< 25).
    """
    a, b = _pair(a_correct, b_correct)
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("McNemar's test needs 0/1 correctness vectors")
    b10, b01 = int(np.sum((a == 1) & (b == 0))), int(np.sum((a == 0) & (b == 1)))
    n = b10 + b01
    stat = (abs(b10 - b01) - 1) ** 2 / n if n else 0.0
    p_chi2 = math.erfc(math.sqrt(stat / 2)) if n else 1.0  # chi-square(1) survival function
    return dict(b10=b10, b01=b01, p_exact=binom_two_sided(b10, n), p_chi2=p_chi2, statistic=stat)


def _z(alpha: float, power: float) -> float:
    return NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)


def mde(n: int, sd: float = 0.5, alpha: float = 0.05, power: float = 0.8) -> float:
    """The minimum detectable difference of two means over n items each, per-item standard deviation `sd`.

    sd = 0.5 is the largest a [0, 1]-bounded score can have (an accuracy at 50%), so the figure holds for any
    accuracy-like metric. It is conservative for a paired test whenever the two models' per-item scores are not
    negatively correlated (then var(a - b) <= var(a) + var(b)).
    """
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    return _z(alpha, power) * sd * math.sqrt(2.0 / n)


def n_for_mde(effect: float, sd: float = 0.5, alpha: float = 0.05, power: float = 0.8) -> int:
    """The smallest n whose `mde` is at most `effect`."""
    if effect <= 0:
        raise ValueError(f"effect must be positive, got {effect}")
    return int(math.ceil(2.0 * (_z(alpha, power) * sd / effect) ** 2))


def verdict(effect: float, p: float, paper_sign: int, alpha: float = 0.05) -> str:
    """'agrees' (significant, in the paper's direction), 'reverses' (significant, against it) or 'tie'."""
    if p >= alpha or effect == 0:
        return "tie"
    return "agrees" if (effect > 0) == (paper_sign > 0) else "reverses"
