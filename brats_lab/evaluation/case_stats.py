"""The paired per-case statistics of two arms: a description of the cases, not the verdict.

An ablation's verdict treats the training run as the unit of replication (`evaluation/stats.py`
says why: cases inside one run share its initial weights, patch order and augmentations, so a
test over cases reads training noise as an effect). What stays here describes how the cases moved,
printed beside the verdict as `comparison_per_case.csv`, never used to decide:
- `paired_bootstrap_ci`: the mean difference (arm - baseline) with a percentile bootstrap
  confidence interval, resampling cases;
- `wilcoxon_paired`: the two-sided Wilcoxon signed-rank test on the per-case differences;
- `compare_arms`: both for every arm and metric column of a per-case table, Holm-adjusted over
  the columns (`stats.holm`), with a verdict in words (`verdict`).

NaN policy, as in `stats.py`: nothing here ever drops a NaN. A non-finite value means a bug
upstream, and silently dropping the case would bias the comparison towards the cases that worked.
Every function raises `ValueError` naming how many values and which positions (or, in
`compare_arms`, which arm, case and column).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

# Shared with the verdict, defined once there: Holm, which way a column is better, how a p-value
# prints, the rounding of differences and the check that names non-finite positions.
from brats_lab.evaluation.stats import _DIFF_DECIMALS, ArrayLike, _finite_vector, _format_p, _sign, holm

# The bootstrap draws its resamples in blocks of at most this many indices, so memory stays
# bounded (~32 MB of int64) whatever n_resamples x n_cases is, while each block stays vectorised.
_BOOTSTRAP_BLOCK = 1 << 22

RESULT_COLUMNS = [
    "arm",
    "metric",
    "n",
    "mean_baseline",
    "mean_arm",
    "mean_diff",
    "ci_low",
    "ci_high",
    "p_value",
    "p_holm",
    "verdict",
]


def _paired(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated paired samples: same length, at least one case, all finite."""
    a_arr = _finite_vector(a, "a")
    b_arr = _finite_vector(b, "b")
    if a_arr.shape != b_arr.shape:
        raise ValueError(f"paired samples must have the same length, but a has {a_arr.size} and b has {b_arr.size}")
    if a_arr.size == 0:
        raise ValueError("paired samples are empty: need at least one case")
    return a_arr, b_arr


def _differences(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """b - a per case, rounded so that round-off neither breaks ties nor hides zeros."""
    a_arr, b_arr = _paired(a, b)
    # `+ 0.0` turns -0.0 into 0.0, so a zero difference prints and compares as 0.
    return np.round(b_arr - a_arr, _DIFF_DECIMALS) + 0.0


def paired_bootstrap_ci(
    a: ArrayLike,
    b: ArrayLike,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of `b - a` over paired cases and its percentile bootstrap confidence interval.

    `a[i]` and `b[i]` are the same case scored by two arms (`a` the baseline). Each resample draws
    `n` case indices with replacement (a seeded `numpy.random.Generator`, so the result is
    reproducible) and takes the mean difference; the interval is the `(1 - confidence) / 2` and
    `(1 + confidence) / 2` quantiles of those means. Resampling cases, not values of each arm
    separately, keeps the pairing: the spread between cases cancels in the difference.

    Returns `(mean_diff, low, high)`. Identical arrays give `(0.0, 0.0, 0.0)`; a single case gives
    a zero-width interval at its difference (the bootstrap cannot see variability it never saw).
    Raises ValueError on unequal lengths, empty input or NaN (naming the positions).
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), but is {confidence}")
    if int(n_resamples) != n_resamples or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive integer, but is {n_resamples}")
    d = _differences(a, b)
    n = d.size
    rng = np.random.default_rng(seed)
    means = np.empty(int(n_resamples))
    block = max(1, _BOOTSTRAP_BLOCK // n)
    for start in range(0, int(n_resamples), block):
        stop = min(start + block, int(n_resamples))
        idx = rng.integers(0, n, size=(stop - start, n))  # (resamples, cases)
        means[start:stop] = d[idx].mean(axis=1)
    alpha = 1.0 - confidence
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    # Clamp into [min, max] of the means: quantile interpolation may round a hair outside, which
    # would print as (0, -0.0, 1e-17) for identical arms.
    low, high = max(float(low), float(means.min())), min(float(high), float(means.max()))
    return float(d.mean()), low, high


def wilcoxon_paired(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test on the per-case differences `b - a`.

    Choices, and why:
    - Zero differences (cases where both arms score the same, common in BraTS: both get Dice 1 on
      a case with no enhancing tumour, or both miss it) use `zero_method="pratt"`: the zeros take
      part in the ranking and their ranks are then dropped. "wilcox" would discard those cases
      altogether, testing only the cases where the arms disagree and so overstating the evidence
      when the arms agree on most cases; Pratt's method keeps that agreement in the ranks and is
      the more conservative of the two.
    - Ties among non-zero differences get mid-ranks (scipy's behaviour). The differences are
      rounded to 1e-10 first, so floating-point round-off does not split a true tie.
    - `method="auto"`, which in scipy >= 1.13 is sensible: the exact null distribution when there
      are at most 50 differences and no ties or zeros; with ties or zeros, an exhaustive
      permutation distribution up to 13 differences; otherwise the normal approximation with the
      tie and zero corrections of the variance. All of these are deterministic.
    - All differences zero: returns 1.0. There is no evidence of any difference, and scipy
      would return NaN (normal approximation) or warn; we answer explicitly instead.
    - Fewer than 2 non-zero differences: returns 1.0. With one non-zero difference the signed-rank
      statistic has two equally likely values under the null, so the exact two-sided p-value is 1;
      scipy's normal approximation (used once zeros push n past 13) would report a spurious
      p ~ 0.32 there.

    Raises ValueError on unequal lengths, empty input or NaN (naming the positions).
    """
    d = _differences(a, b)
    if np.count_nonzero(d) < 2:
        return 1.0
    result = sps.wilcoxon(d, zero_method="pratt", alternative="two-sided", method="auto")
    return float(min(1.0, result.pvalue))


def _rank_sign(d: np.ndarray) -> int:
    """Sign of (sum of positive ranks - sum of negative ranks): the direction the Wilcoxon test
    sees, ranked as Pratt's method ranks (zeros included, then dropped)."""
    ranks = sps.rankdata(np.abs(d))
    return int(np.sign(ranks[d > 0].sum() - ranks[d < 0].sum()))


def verdict(column: str, d: np.ndarray, p_holm: float, alpha: float = 0.05) -> str:
    """Plain-words verdict for the differences `d` (arm - baseline) of one metric column.

    "no evidence of a difference" when `p_holm >= alpha`; otherwise "better"/"worse" for
    brats-lab's metrics (by `metrics.metric_direction`: dice higher is better, hd95 lower...),
    "higher"/"lower" for other columns, followed by the Holm-adjusted p, e.g.
    "better (p=0.003)". The direction is the sign of the mean difference; where the mean and the
    ranks the test used point opposite ways (a few large differences against many small ones),
    the verdict says so instead of picking one.
    """
    if not p_holm < alpha:
        return "no evidence of a difference"
    mean_sign = int(np.sign(d.mean()))
    if mean_sign == 0 or mean_sign != _rank_sign(d):
        return f"different, direction unclear: mean and ranks disagree ({_format_p(p_holm)})"
    direction = _sign(column)
    if direction == 0:
        word = "higher" if mean_sign > 0 else "lower"
    else:
        word = "better" if mean_sign == direction else "worse"
    return f"{word} ({_format_p(p_holm)})"


def compare_arms(
    per_case: pd.DataFrame,
    baseline: str,
    metric_columns: list[str],
    arm_column: str = "arm",
    case_column: str = "case",
    seed: int = 0,
    n_resamples: int = 10000,
    confidence: float = 0.95,
    alpha: float = 0.05,
) -> pd.DataFrame:
    """Every non-baseline arm against `baseline`, per metric column, paired over cases.

    `per_case` has one row per (arm, case) with that case's out-of-fold metrics. For each other
    arm (in order of first appearance in `per_case`) and each column of `metric_columns`: the mean of each arm,
    the mean difference (arm - baseline) with its bootstrap confidence interval
    (`paired_bootstrap_ci`, same `seed` for every comparison so reruns give the same table), the
    Wilcoxon p-value (`wilcoxon_paired`), and the p-values Holm-adjusted across the metric columns
    within that arm (the family is the columns passed: pass the Dice columns and the HD95 columns
    in separate calls for one family per metric). `verdict` states the result in words.

    Columns: arm, metric, n, mean_baseline, mean_arm, mean_diff, ci_low, ci_high, p_value,
    p_holm, verdict. `result.attrs` records `baseline` and `confidence`.

    Raises ValueError, naming what is wrong, when a column or the baseline arm is missing, an
    (arm, case) appears twice, a case is in one arm but not the other (cases are never dropped
    silently: the caller decides), or a metric value is NaN.
    """
    missing_cols = [c for c in [arm_column, case_column, *metric_columns] if c not in per_case.columns]
    if missing_cols:
        raise ValueError(f"per-case table lacks column(s) {missing_cols}; it has {list(per_case.columns)}")
    if not metric_columns:
        raise ValueError("metric_columns is empty: name at least one metric column to compare")
    arms = list(pd.unique(per_case[arm_column]))
    if baseline not in arms:
        raise ValueError(f"baseline arm {baseline!r} is not in column {arm_column!r}, which has arms {arms}")
    dup = per_case.duplicated([arm_column, case_column], keep=False)
    if dup.any():
        pairs = sorted({(str(r[arm_column]), str(r[case_column])) for _, r in per_case[dup].iterrows()})
        raise ValueError(f"(arm, case) must be unique, but these appear more than once: {pairs}")

    def cases_of(arm: str) -> pd.DataFrame:
        # Sorted by case, so the bootstrap draws the same resamples whatever the row order.
        return per_case[per_case[arm_column] == arm].set_index(case_column).sort_index()

    base = cases_of(baseline)
    rows: list[dict[str, object]] = []
    for arm in arms:
        if arm == baseline:
            continue
        other = cases_of(arm)
        only_base = [c for c in base.index if c not in other.index]
        only_arm = [c for c in other.index if c not in base.index]
        if only_base or only_arm:
            parts = []
            if only_base:
                parts.append(f"in baseline {baseline!r} but not in arm {arm!r}: {only_base}")
            if only_arm:
                parts.append(f"in arm {arm!r} but not in baseline {baseline!r}: {only_arm}")
            raise ValueError("cases must be paired; " + "; ".join(parts))
        other = other.loc[base.index]  # same case order as the baseline: the pairing

        arm_rows: list[dict[str, object]] = []
        diffs: list[np.ndarray] = []
        for col in metric_columns:
            a = base[col].to_numpy(dtype=float)
            b = other[col].to_numpy(dtype=float)
            for name, values in ((baseline, a), (arm, b)):
                bad = np.flatnonzero(~np.isfinite(values))
                if bad.size:
                    raise ValueError(
                        f"column {col!r} of arm {name!r} has {bad.size} NaN/inf value(s), for case(s) "
                        f"{[base.index[i] for i in bad]}; not dropped silently: fix the upstream metric "
                        "or remove the case(s) from every arm explicitly"
                    )
            mean_diff, low, high = paired_bootstrap_ci(a, b, n_resamples=n_resamples, confidence=confidence, seed=seed)
            diffs.append(_differences(a, b))
            arm_rows.append(
                {
                    "arm": arm,
                    "metric": col,
                    "n": int(a.size),
                    "mean_baseline": float(a.mean()),
                    "mean_arm": float(b.mean()),
                    "mean_diff": mean_diff,
                    "ci_low": low,
                    "ci_high": high,
                    "p_value": wilcoxon_paired(a, b),
                }
            )
        adjusted = holm([float(r["p_value"]) for r in arm_rows])  # type: ignore[arg-type]  # the rows' p-values are floats
        for row, p_adj, d in zip(arm_rows, adjusted, diffs):
            row["p_holm"] = float(p_adj)
            row["verdict"] = verdict(str(row["metric"]), d, float(p_adj), alpha)
        rows.extend(arm_rows)

    result = pd.DataFrame(rows, columns=RESULT_COLUMNS)
    result.attrs["baseline"] = baseline
    result.attrs["confidence"] = confidence
    return result
