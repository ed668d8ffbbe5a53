"""The bootstrap interval is the one it says (95% unless asked otherwise), checked on a case whose
bootstrap distribution is known exactly, not against a coverage band a 90% interval also passes."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from brats_lab.evaluation.case_stats import paired_bootstrap_ci

# Three paired cases whose differences are 0, 0 and 1. A resample of 3 cases has k ones with
# probability C(3, k) (1/3)^k (2/3)^(3-k), so its mean is 0, 1/3, 2/3 or 1 with probabilities
# 8/27, 12/27, 6/27 and 1/27 (worked out below rather than typed in).
BASELINE, ARM = [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]
P = {Fraction(k, 3): comb(3, k) * Fraction(1, 3) ** k * Fraction(2, 3) ** (3 - k) for k in range(4)}


def _quantile(q: float, dist: dict[Fraction, Fraction] = P) -> float:
    """The q-quantile of the exact distribution `dist` (value -> probability) of the resampled mean."""
    total = Fraction(0)
    for value in sorted(dist):
        total += dist[value]
        if total >= Fraction(q).limit_denominator(1000):
            return float(value)
    raise AssertionError("unreachable")


def test_the_exact_distribution_separates_95_from_90_percent():
    # The 97.5% quantile is 1 (P(mean < 1) = 26/27 = 0.963 < 0.975), the 95% quantile is 2/3: a
    # 90% interval passed off as 95% ends at 2/3 instead of 1.
    assert sum(P.values()) == 1 and P[Fraction(1)] == Fraction(1, 27)
    assert (_quantile(0.025), _quantile(0.975)) == (0.0, 1.0)
    assert (_quantile(0.05), _quantile(0.95)) == (0.0, 2 / 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_95_percent_interval_has_the_95_percent_quantiles(seed):
    # With 10,000 resamples the share of means equal to 1 is 1/27 = 3.7% +- 0.19% (one standard
    # error): the empirical 2.5% / 97.5% quantiles fall on the exact ones for any seed (the margins
    # are 1.2 percentage points, 6 standard errors, on either side).
    mean, low, high = paired_bootstrap_ci(BASELINE, ARM, n_resamples=10_000, seed=seed)
    assert mean == pytest.approx(1 / 3, abs=1e-15)
    assert (low, high) == (_quantile(0.025), _quantile(0.975)) == (0.0, 1.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_the_confidence_argument_is_used(seed):
    _, low, high = paired_bootstrap_ci(BASELINE, ARM, n_resamples=10_000, confidence=0.90, seed=seed)
    assert (low, high) == (_quantile(0.05), _quantile(0.95)) == (0.0, 2 / 3)


# Seven paired cases whose differences are -1 four times and 0 three times: a resample's mean is
# -k/7 with k ~ Binomial(7, 4/7). The lowest mean, -1, has probability (4/7)^7 = 0.0199: above
# 1/60 and below 1/40, so the 2.5% quantile (-6/7) and a 1.7% one (-1) differ. At the top,
# P(mean >= -1/7) = (3/7)^7 + 7 (4/7) (3/7)^6 = 0.0274 > 0.025, so the 97.5% quantile is -1/7.
SEVEN_BASELINE, SEVEN_ARM = [1.0] * 7, [0.0] * 4 + [1.0] * 3
SEVEN = {Fraction(-k, 7): comb(7, k) * Fraction(4, 7) ** k * Fraction(3, 7) ** (7 - k) for k in range(8)}


def test_the_seven_case_distribution_separates_the_lower_quantiles():
    assert sum(SEVEN.values()) == 1 and Fraction(1, 60) < SEVEN[Fraction(-1)] < Fraction(1, 40)
    assert (_quantile(0.025, SEVEN), _quantile(0.975, SEVEN)) == (-6 / 7, -1 / 7)
    assert _quantile(0.05 / 3, SEVEN) == -1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_lower_bound_is_the_2_5_percent_quantile(seed):
    # With 100,000 resamples the share of means at -1 is 1.99% +- 0.044% (one standard error): 11
    # standard errors below 2.5% and 7 above 1.67%; the share at -1/7 or above, 2.74% +- 0.052%, is 5
    # above 2.5%. So the empirical quantiles fall on the exact ones for any seed.
    mean, low, high = paired_bootstrap_ci(SEVEN_BASELINE, SEVEN_ARM, n_resamples=100_000, seed=seed)
    assert mean == pytest.approx(-4 / 7, abs=1e-15)
    assert (low, high) == (pytest.approx(_quantile(0.025, SEVEN), abs=1e-12), pytest.approx(_quantile(0.975, SEVEN), abs=1e-12))
