"""The bootstrap interval is the one it says (95% unless asked otherwise), checked on a case whose
bootstrap distribution is known exactly, not against a coverage band a 90% interval also passes."""

from __future__ import annotations

from fractions import Fraction
from math import comb

import pytest

from brats_lab.evaluation.stats import paired_bootstrap_ci

# Three paired cases whose differences are 0, 0 and 1. A resample of 3 cases has k ones with
# probability C(3, k) (1/3)^k (2/3)^(3-k), so its mean is 0, 1/3, 2/3 or 1 with probabilities
# 8/27, 12/27, 6/27 and 1/27 (worked out below rather than typed in).
BASELINE, ARM = [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]
P = {Fraction(k, 3): comb(3, k) * Fraction(1, 3) ** k * Fraction(2, 3) ** (3 - k) for k in range(4)}


def _quantile(q: float) -> float:
    """The q-quantile of the exact distribution of the resampled mean."""
    total = Fraction(0)
    for value in sorted(P):
        total += P[value]
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
