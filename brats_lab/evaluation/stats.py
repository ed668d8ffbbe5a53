"""Is a difference between two arms real? The verdict treats the training run as the unit.

An ablation trains every arm on the same folds, once per seed: a run is (arm, fold, seed), and the
arms are scored on the same out-of-fold cases. Two runs of the *same* configuration with different
seeds already differ by a run-level offset (initial weights, patch order, augmentation), and every
case of a run carries that offset. A test over per-case differences counts the offset once per
case and so reads training noise as an effect (measured: 18% to 62% false alarms at a run-to-run
standard deviation of 0.01 to 0.04 Dice, issue 10). So the verdict is a test over runs:

- `run_level_test` (the verdict's test): for each fold f and seed s the paired run difference
  `D[f, s]` = mean over the fold's cases of (arm - baseline) (same cases, same seed index); the
  seeds of a fold are averaged, `Dbar[f]`, and a two-sided one-sample t-test on the F fold means
  (F - 1 degrees of freedom) asks whether their mean is zero; its confidence interval is the
  matching t interval. This is the summary-statistics analysis of a nested design (folds, seeds
  within folds); with as many seeds in every fold it gives the same test of the arm effect as a
  mixed model with random fold and run effects. Why folds and not the F x S runs as the replicates:
  the seeds of one fold share its validation cases and its training cases, so an arm that helps on
  some cases and hurts on others moves all of that fold's runs together; treating them as
  independent would count that shared part S times. Seeds make each fold mean less noisy (the
  noise floor shrinks as 1/sqrt(S)); folds add replicates.
  Assumptions: the fold means are independent and roughly normal with one variance (the run
  offset and the average of many case differences are sums of many small effects; no two folds
  share a training seed, `TrainConfig.run_seed`, so no seed's luck repeats across them; folds share
  training cases, a dependence every cross-validated test ignores and which makes it somewhat
  liberal, Nadeau and Bengio 2003); every fold has the same seed indices and each (fold, seed) scores the
  same cases in both arms. With one fold there is no estimate of the fold-to-fold spread and the
  verdict says "cannot tell". With two folds the test has one degree of freedom (critical t 12.7):
  it is calibrated but can only see differences many times the noise floor, which is the honest
  answer for two runs per arm. Fold means that are all equal (a tie) leave no spread to estimate
  the noise from either: "cannot tell" too, never p = 0.
- `case_floor` (HD95 only, `floored`): a fold mean's variance from the sampling of its cases alone.
  HD95's penalty for a missed case (373 mm) makes fold means of paired differences move in whole
  penalties, so folds are often *nearly* equal (a few mm apart at 46 mm) and the t-test with 1 or 2
  degrees of freedom reads that near-tie as certainty (12% false alarms per region at 2 folds).
  The variance of the fold means is taken as at least the mean of these floors (the modified
  Hartung-Knapp rule): near-ties then give none, at a cost in HD95's power. Dice is not floored.
- The family: Dice (`PRIMARY`, lesion-wise Dice on 2023+ data) is the primary metric, Holm over
  its regions; every other column is secondary, a Holm family of its own, so marked (`family`).
- Holm-Bonferroni (`holm`) across the regions of one metric, as before.
- `noise_floor`: the seed-to-seed standard deviation of one run's mean (same arm, same fold),
  pooled over arms and folds; needs two seeds or more. Reported beside the verdict, named as what
  it is; the verdict's power does not rest on it.
- `fold_spread`: the standard deviation over folds of the fold means of the paired differences:
  what the test estimates its noise from (seed noise, the gain of a seed shared by both arms, and
  the arm-by-fold spread together).
- `spread_mde`: the smallest true difference the test finds with 80% power at that spread, from
  the noncentral t distribution, at the level the verdict uses (alpha / regions: the first step of
  Holm). `minimum_detectable_effect` is the same for a design (folds x seeds) planned from a noise
  floor, assuming no arm-by-fold interaction (a lower bound); `--plan` prints it.
- `compare_runs` / `format_runs`: all of that for every arm and metric column of a per-case table
  with arm, fold, seed and case columns, with a verdict in plain words.

The per-case statistics (bootstrap interval, Wilcoxon test, `compare_arms`) describe the cases of
a study, they do not decide: `evaluation/case_stats.py`. It shares `holm`, the metric directions
and the rounding of differences with the verdict, from here.

NaN policy: nothing here ever drops a NaN. Our metrics never produce NaN or inf (see
`metrics.py`), so a non-finite value means a bug upstream, and silently dropping the case would
bias the comparison towards the cases that worked. Every function raises `ValueError` naming how
many values and which positions (or, in `compare_runs`, which arm, case and column).
(The lesion-wise metrics of 2023+ data are NaN by definition where a region is absent from both
maps: `compare_runs(..., undefined=True)`, which `ablation/report.py` passes for them, reads NaN
as that, explicitly: each run's mean over its defined cases, the cases still paired, a column
with a run of no defined case untested and its rows saying why.)
(The noise floor of a study with one seed is reported as NaN: it was not measured.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.optimize import brentq

from brats_lab import DataError
from brats_lab.evaluation.metrics import metric_direction

ArrayLike = Sequence[float] | np.ndarray

# Differences (per case in `case_stats`, fold means here) are rounded to this many decimals before
# they are ranked or compared. Subtracting floats leaves round-off (0.9 - 0.8 != 0.7 - 0.6), which
# would split true ties into distinct ranks and turn true zeros (or a tie of fold means) into tiny
# non-zero differences; no metric we report is meaningful at 1e-10.
_DIFF_DECIMALS = 10


def _finite_vector(x: ArrayLike, name: str) -> np.ndarray:
    """`x` as a 1-D float array, or a ValueError naming every non-finite position."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per case), but has shape {arr.shape}")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        kinds = "NaN" if np.isnan(arr[bad]).all() else "non-finite (NaN or inf)"
        raise ValueError(
            f"{name} has {bad.size} {kinds} value(s) at position(s) {bad.tolist()}; "
            "they are not dropped silently: fix the upstream metric or drop the case(s) explicitly"
        )
    return arr


def holm(p_values: ArrayLike) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the order given.

    With the `m` p-values sorted ascending, `p_(1) <= ... <= p_(m)`, the adjusted value of
    `p_(k)` is `max_{j <= k} min(1, (m - j + 1) * p_(j))`: the running maximum keeps the adjusted
    values monotone in the raw ones, and the cap keeps them probabilities. Rejecting where the
    adjusted value is below alpha controls the family-wise error rate at alpha, without assuming
    independence between the tests (the regions of a case are strongly correlated).
    Example: `[0.01, 0.04, 0.03]` -> `[0.03, 0.06, 0.06]`.
    Raises ValueError on NaN (naming the positions) or values outside [0, 1].
    """
    p = _finite_vector(p_values, "p_values")
    outside = np.flatnonzero((p < 0) | (p > 1))
    if outside.size:
        raise ValueError(f"p-values must be in [0, 1], but position(s) {outside.tolist()} are {p[outside].tolist()}")
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]  # (m - j + 1) * p_(j) with j counted from 1
    adjusted_sorted = np.minimum(1.0, np.maximum.accumulate(scaled))
    adjusted = np.empty(m)
    adjusted[order] = adjusted_sorted
    return adjusted


def _sign(column: str) -> int:
    """+1 if higher is better for this column's metric, -1 if lower is better (as
    `metrics.metric_direction` declares), 0 for a column that is none of brats-lab's metrics (a
    loss, say): its verdict then says "higher"/"lower" rather than "better"/"worse"."""
    try:
        return 1 if metric_direction(column) == "higher" else -1
    except DataError:
        return 0


def _format_p(p: float) -> str:
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def _aligned(header: list[str], lines: list[list[str]], left: set[int]) -> list[str]:
    """A plain-text table: the header, a rule and the lines, text columns (`left`) left-aligned,
    numbers right-aligned."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return [fmt(header), fmt(["-" * w for w in widths]), *(fmt(line) for line in lines)]


# --- the verdict: runs as the unit of replication ------------------------------------------------

RUN_COLUMNS = [
    "arm",
    "metric",
    "n",
    "folds",
    "seeds",
    "mean_baseline",
    "mean_arm",
    "mean_diff",
    "ci_low",
    "ci_high",
    "noise_floor",
    "spread",
    "mde",
    "p_value",
    "p_holm",
    "verdict",
    "case_sd",
    "family",
]

ONE_FOLD = "cannot tell: one fold gives no fold-to-fold spread to test against"
NO_SPREAD = "cannot tell: the same difference on every fold leaves no spread to test against"

# The primary metric families (a column is `{family}_{region}`): their regions' verdicts are the
# promise, 5% family-wise under no difference. Every other column is secondary, a Holm family of its own.
PRIMARY = ("dice", "lesion_dice")


def metric_family(column: str) -> str:
    """"primary" for Dice's regions (BraTS 2020 or lesion-wise: `PRIMARY`), else "secondary"."""
    return "primary" if column.rsplit("_", 1)[0] in PRIMARY else "secondary"


def floored(column: str) -> bool:
    """Whether the verdict floors this column's fold spread at the spread its cases alone give a
    fold mean (`case_floor`): HD95, BraTS 2020 and lesion-wise. A case that is missed scores the
    image's diagonal (373 mm on the BraTS grid), so a fold mean of paired differences moves in
    whole penalties over the fold's cases (46 mm at 8 cases) plus a few mm: two or three folds
    land on the same number of penalties often (one more miss on the same side in each), their
    spread is then a few mm against a mean of 46, and the t-test with one or two degrees of freedom
    reads that near-tie as certainty (10% to 12% false alarms at 2 folds, issue 22). Dice is not
    floored: its fold means are not lumped that way, and its t-test is calibrated (a floor there
    would take most of the power of 2 and 3 folds, which comes from exactly the small spreads)."""
    return "hd95" in column


def case_floor(base: np.ndarray, arm: np.ndarray) -> np.ndarray:
    """The variance each fold mean of the paired run differences has from the sampling of its
    cases alone, shape (..., folds), from the per-case scores `base[..., fold, seed, case]` and
    `arm[...]` (same cases; NaN where a value is undefined, lesion-wise).

    A run difference is (the arm's mean over its defined cases) - (the baseline's over its own);
    its variance from drawing the cases is estimated by the delta method: the sample variance of
    the per-case influence `psi = N / n_arm (arm - its mean) - N / n_base (base - its mean)`
    (the undefined side contributes 0) over the run's N cases, divided by N; with every value
    defined, psi is the paired difference minus its mean, so this is var(d) / N. A fold mean of S
    seeds sums S runs' variances over S^2. The spread of fold means can only be larger (the run
    noise and the arm-by-fold spread come on top), so `run_level_test` may floor its variance at
    the mean of these over the folds: the modified Hartung-Knapp rule of random-effects
    meta-analysis with few studies (Roever, Knapp and Friede 2015), which truncates the
    between-study variance at 0. A run with fewer than two cases gives 0 (nothing to say)."""
    a, b = np.asarray(base, dtype=float), np.asarray(arm, dtype=float)
    if a.shape != b.shape or a.ndim < 3:
        raise ValueError(f"per-case scores must have one shape (..., folds, seeds, cases), got {a.shape} and {b.shape}")
    cases, seeds = a.shape[-1], a.shape[-2]
    in_a, in_b = np.isfinite(a), np.isfinite(b)
    with np.errstate(divide="ignore", invalid="ignore"):
        n_a, n_b = in_a.sum(axis=-1, keepdims=True), in_b.sum(axis=-1, keepdims=True)
        mean_a = np.where(in_a, a, 0.0).sum(axis=-1, keepdims=True) / n_a
        mean_b = np.where(in_b, b, 0.0).sum(axis=-1, keepdims=True) / n_b
        psi = np.where(in_b, (b - mean_b) * cases / n_b, 0.0) - np.where(in_a, (a - mean_a) * cases / n_a, 0.0)
    run_var = (psi**2).sum(axis=-1) / (cases * (cases - 1)) if cases > 1 else np.zeros(a.shape[:-1])
    return np.nan_to_num(run_var).sum(axis=-1) / seeds**2


def run_level_test(d: np.ndarray, confidence: float = 0.95,
                   floor: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The verdict's test on paired run differences `d[..., fold, seed]` (arm - baseline).

    Vectorised over the leading axes (one study per index), so the calibration test can run
    thousands of simulated studies at once. The seeds of each fold are averaged, then a two-sided
    one-sample t-test on the fold means (F - 1 degrees of freedom); see the module docstring for
    why. Returns `(mean_diff, ci_low, ci_high, p_value)`, each of the leading shape.

    Fold means that are all equal (no spread: a tie, as HD95's penalty values make common) give
    p = 1 and an infinite interval, as one fold does: a spread of zero is a design that cannot
    estimate its noise, not certainty (`compare_runs` says "cannot tell" there).
    `floor` (shape (..., folds), from `case_floor`): the variance each fold mean has from its cases
    alone; the variance of the fold means is then taken as at least its mean over the folds, so a
    near-tie (HD95's penalties, `floored`) is read at the spread its cases imply, not as certainty.
    Raises ValueError on non-finite values or fewer than one fold and one seed.
    """
    d = np.asarray(d, dtype=float)
    if d.ndim < 2 or d.shape[-1] < 1 or d.shape[-2] < 1:
        raise ValueError(f"run differences must have shape (..., folds, seeds) with at least one of each, got {d.shape}")
    bad = np.argwhere(~np.isfinite(d))
    if bad.size:
        raise ValueError(f"run differences have {len(bad)} non-finite value(s), at (..., fold, seed) {bad[:5].tolist()}")
    folds = d.shape[-2]
    fold_means = np.round(d.mean(axis=-1), _DIFF_DECIMALS)
    mean = fold_means.mean(axis=-1) + 0.0
    if folds < 2:
        inf = np.full(mean.shape, np.inf)
        return mean, -inf, inf, np.ones(mean.shape)
    spread = fold_means.std(axis=-1, ddof=1)
    spread = np.where(spread < 10.0 ** -_DIFF_DECIMALS, 0.0, spread)  # round-off, not spread
    if floor is not None:  # a tie stays a tie ("cannot tell"); a near-tie is read at the floor
        spread = np.where(spread == 0, 0.0, np.sqrt(np.maximum(spread**2, np.asarray(floor, dtype=float).mean(axis=-1))))
    se = spread / np.sqrt(folds)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se == 0, 0.0, np.abs(mean) / se)
    p = np.where(se == 0, 1.0, np.minimum(1.0, 2.0 * sps.t.sf(t, folds - 1)))
    half = np.where(se == 0, np.inf, sps.t.ppf(0.5 + confidence / 2, folds - 1) * se)
    return mean, mean - half, mean + half, p


def fold_spread(d: np.ndarray) -> float:
    """The standard deviation (ddof 1) over the folds of the fold means of paired run differences
    `d[fold, seed]`, rounded as `run_level_test` rounds them (so a tie is exactly 0); NaN with one fold."""
    fold_means = np.round(np.asarray(d, dtype=float).mean(axis=-1), _DIFF_DECIMALS)
    if fold_means.size < 2:
        return float("nan")
    spread = float(fold_means.std(ddof=1))
    return 0.0 if spread < 10.0 ** -_DIFF_DECIMALS else spread


def noise_floor(run_means: np.ndarray) -> float:
    """The seed-to-seed standard deviation of one run's mean: `run_means[group, seed]` are the
    means of runs that differ only in their seed (one group per arm and fold); the variances over
    seeds (ddof 1) are pooled over the groups. NaN with fewer than two seeds (not measured)."""
    x = np.asarray(run_means, dtype=float)
    if x.ndim != 2:
        raise ValueError(f"run means must have shape (groups, seeds), got {x.shape}")
    if x.shape[1] < 2 or x.shape[0] < 1:
        return float("nan")
    bad = np.argwhere(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"run means have {len(bad)} non-finite value(s), at (group, seed) {bad[:5].tolist()}")
    return float(np.sqrt(x.var(axis=1, ddof=1).mean()))


def minimum_detectable_effect(noise: float, folds: int, seeds: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference `run_level_test` finds with probability `power` at
    two-sided level `alpha`, for `folds` x `seeds` runs per arm whose means scatter with standard
    deviation `noise` from seed to seed (the noise floor): `spread_mde` at the spread of the fold
    means this gives, `noise * sqrt(2 / seeds)`. It assumes no arm-by-fold interaction (the arms
    differ by the same amount on every fold), so the true MDE is at least this. Pass the level the
    verdict uses (`alpha / regions`, the first step of Holm). NaN when `noise` is NaN."""
    if folds < 1 or seeds < 1:
        raise ValueError(f"folds and seeds must be at least 1, got {folds} and {seeds}")
    return spread_mde(noise * np.sqrt(2.0 / seeds) if np.isfinite(noise) else float("nan"), folds, alpha, power)


def spread_mde(spread: float, folds: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference `run_level_test` finds with probability `power` at
    two-sided level `alpha` when the fold means of the paired run differences scatter with
    standard deviation `spread` (what the test itself estimates: seed noise, the shared-seed gain
    and the arm-by-fold spread together): the noncentrality of a t with `folds - 1` degrees of
    freedom that reaches `power`, times the standard error `spread / sqrt(folds)`.
    Infinite with one fold or a zero spread (nothing can be told); NaN when `spread` is NaN."""
    if folds < 1:
        raise ValueError(f"folds must be at least 1, got {folds}")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise ValueError(f"alpha and power must be in (0, 1), got {alpha} and {power}")
    if not np.isfinite(spread):
        return float("nan")
    if folds < 2 or spread <= 0:
        return float("inf")
    df = folds - 1
    crit = sps.t.ppf(1 - alpha / 2, df)

    def shortfall(ncp: float) -> float:
        # The far tail (a significant difference of the wrong sign) is tiny where it matters, and
        # scipy's nct returns NaN for it at some large noncentralities: count it as 0 there.
        wrong_sign = float(np.nan_to_num(sps.nct.cdf(-crit, df, ncp)))
        return float(np.nan_to_num(sps.nct.sf(crit, df, ncp), nan=1.0)) + wrong_sign - power

    high = 100.0  # enough for one degree of freedom at alpha 0.05 (ncp ~ 16); more for a smaller alpha
    while shortfall(high) < 0:
        if high > 1e7:
            return float("inf")
        high *= 10
    return float(brentq(shortfall, 0.0, high) * spread / np.sqrt(folds))


def run_means(per_case: pd.DataFrame, metric_columns: list[str]) -> pd.DataFrame:
    """Per-case rows (arm, fold, seed, case, metrics) -> one row per run (arm, fold, seed) with the
    mean of each metric over the run's cases. A table without a seed column is one seed (0)."""
    table = per_case if "seed" in per_case.columns else per_case.assign(seed=0)
    return table.groupby(["arm", "fold", "seed"], sort=True)[metric_columns].mean()


def compare_runs(
    per_case: pd.DataFrame,
    baseline: str,
    metric_columns: list[str],
    confidence: float = 0.95,
    alpha: float = 0.05,
    undefined: bool = False,
) -> pd.DataFrame:
    """Every non-baseline arm against `baseline`, per metric column, with runs as the unit.

    `per_case` has one row per (arm, fold, seed, case) with that case's out-of-fold metrics (no
    seed column: one seed). For each other arm (in order of first appearance) and column: the
    arms' means over all runs, the mean paired difference (arm - baseline) with its t interval
    (simultaneous over the columns tested: each at `1 - (1 - confidence) / columns`) and
    p-value from `run_level_test`, Holm-adjusted across `metric_columns` (pass one metric's
    regions per call), the seed-to-seed noise floor of the two arms (`noise_floor`), the spread of
    the fold means of the paired differences (`fold_spread`), for HD95 (`floored`) the spread its
    cases alone give a fold mean (`case_sd`, from `case_floor`), which the test and the MDE read
    where it is larger, the minimum detectable effect at the first step of Holm (`spread_mde` at
    alpha / columns), a verdict in words ("cannot tell" where the spread is zero) and the column's
    `family` ("primary" for Dice, else "secondary": `metric_family`).
    `n` is the number of distinct cases the arm was scored on (with `undefined`, in that column).

    `undefined=False` refuses NaN. `undefined=True` (lesion-wise metrics) reads NaN as a value
    the metric leaves undefined (a region absent from both the reference and the prediction):
    each run's mean is over its defined cases, the cases themselves stay paired (a run of one arm
    on other cases than the baseline's run is refused all the same), and a column in which a run
    of the arm or the baseline has no defined case at all is not tested: its rows say
    "undefined: ..." and why, and Holm runs over the other columns.

    Columns: `RUN_COLUMNS`. `result.attrs` records `baseline`, `confidence` and `alpha`.
    Raises ValueError, naming what is wrong, on missing columns or baseline, an (arm, fold, seed,
    case) twice, a fold whose seeds differ between arms or folds, a (fold, seed) whose cases differ
    between the arms, or a NaN metric (naming arm, case and column) unless `undefined`, or an inf.
    """
    table = per_case if "seed" in per_case.columns else per_case.assign(seed=0)
    missing = [c for c in ["arm", "fold", "seed", "case", *metric_columns] if c not in table.columns]
    if missing:
        raise ValueError(f"per-case table lacks column(s) {missing}; it has {list(table.columns)}")
    if not metric_columns:
        raise ValueError("metric_columns is empty: name at least one metric column to compare")
    arms = list(pd.unique(table["arm"]))
    if baseline not in arms:
        raise ValueError(f"baseline arm {baseline!r} is not in the table, which has arms {arms}")
    key = ["arm", "fold", "seed", "case"]
    dup = table.duplicated(key, keep=False)
    if dup.any():
        first = table[dup].iloc[0]
        raise ValueError(f"(arm, fold, seed, case) must be unique, but ({first['arm']}, fold {first['fold']}, seed {first['seed']}, "
                         f"{first['case']}) appears more than once")
    for col in metric_columns:
        values = table[col].to_numpy(dtype=float)
        bad = table[np.isinf(values) | (np.isnan(values) & (not undefined))]
        if not bad.empty:
            raise ValueError(f"column {col!r} has {len(bad)} NaN/inf value(s), first for arm {bad['arm'].iloc[0]!r} case "
                             f"{bad['case'].iloc[0]!r}; not dropped silently: fix the upstream metric or remove the case(s) from every arm")
    cases = {arm: {k: set(g["case"]) for k, g in part.groupby(["fold", "seed"])} for arm, part in table.groupby("arm")}
    grid = sorted(cases[baseline])
    folds = sorted({f for f, _ in grid})
    seeds = sorted({s for _, s in grid})
    if len(grid) != len(folds) * len(seeds):
        raise ValueError(f"arm {baseline!r} does not have the same seeds in every fold: it has (fold, seed) {grid}")
    means = run_means(table, metric_columns)  # pandas skips NaN: each run's mean over its defined cases
    runs = {k: g.set_index("case") for k, g in table.groupby(["arm", "fold", "seed"])}

    rows: list[dict[str, object]] = []
    for arm in arms:
        if arm == baseline:
            continue
        if sorted(cases[arm]) != grid:
            raise ValueError(f"arm {arm!r} has runs (fold, seed) {sorted(cases[arm])} but baseline {baseline!r} has {grid}")
        for cell in grid:
            if cases[arm][cell] != cases[baseline][cell]:
                only = sorted(cases[arm][cell] ^ cases[baseline][cell])
                raise ValueError(f"cases must be paired: fold {cell[0]}, seed {cell[1]} has cases {only[:5]} in only one of "
                                 f"{arm!r} and {baseline!r}")
        arm_rows, tested = [], []
        for col in metric_columns:
            a = means.loc[baseline, col].unstack("seed").loc[folds, seeds].to_numpy()  # (folds, seeds)
            b = means.loc[arm, col].unstack("seed").loc[folds, seeds].to_numpy()
            scored = table.loc[(table["arm"] == arm) & table[col].notna(), "case"] if undefined else table.loc[table["arm"] == arm, "case"]
            row = {"arm": arm, "metric": col, "n": int(scored.nunique()), "folds": len(folds), "seeds": len(seeds),
                   "family": metric_family(col)}
            empty = [(name, f, s) for name, x in ((baseline, a), (arm, b)) for (f, s) in grid
                     if np.isnan(x[folds.index(f), seeds.index(s)])]
            if empty:
                name, f, s = empty[0]
                nan = float("nan")
                row.update(mean_baseline=float(np.nanmean(a)) if np.isfinite(a).any() else nan,
                           mean_arm=float(np.nanmean(b)) if np.isfinite(b).any() else nan, mean_diff=nan, ci_low=nan, ci_high=nan,
                           noise_floor=nan, spread=nan, case_sd=nan, mde=nan, p_value=nan, p_holm=nan,
                           verdict=undefined_verdict(col, name, f, s))
                arm_rows.append(row)
                continue
            floor = None
            if floored(col):
                floor = np.array([np.sum([_run_floor(runs[(baseline, f, s)][col], runs[(arm, f, s)][col]) for s in seeds]) / len(seeds) ** 2
                                  for f in folds])
            row.update(mean_baseline=float(a.mean()), mean_arm=float(b.mean()), noise_floor=noise_floor(np.concatenate([a, b])),
                       spread=fold_spread(b - a), case_sd=float(np.sqrt(floor.mean())) if floor is not None else float("nan"))
            row["_d"], row["_floor"] = b - a, floor
            arm_rows.append(row)
            tested.append(row)
        # Simultaneous over the columns tested (Bonferroni): an interval that excludes 0 always has a
        # Holm-adjusted p below alpha, so no row shows "no evidence" beside an interval that says
        # otherwise (an unadjusted 95% one did in 3% of null rows).
        simultaneous = 1 - (1 - confidence) / max(1, len(tested))
        for row in tested:
            d, floor = row.pop("_d"), row.pop("_floor")
            mean, low, high, p = (float(v) for v in run_level_test(d, simultaneous, floor))
            # The noise the test reads: the fold spread, or the case floor where that is larger.
            noise = row["spread"] if floor is None or row["spread"] == 0 else max(row["spread"], row["case_sd"])
            # The power the verdict has: at the first step of Holm over the columns tested.
            row.update(mean_diff=mean, ci_low=low, ci_high=high, p_value=p, mde=spread_mde(noise, len(folds), alpha / len(tested)))
        adjusted = holm([r["p_value"] for r in tested])
        for row, p_adj in zip(tested, adjusted):
            row["p_holm"] = float(p_adj)
            row["verdict"] = run_verdict(str(row["metric"]), float(row["mean_diff"]), float(p_adj), len(folds), alpha)
            if len(folds) >= 2 and row["spread"] == 0:
                row["verdict"] = NO_SPREAD
        rows.extend(arm_rows)
    result = pd.DataFrame(rows, columns=RUN_COLUMNS)
    result.attrs.update(baseline=baseline, confidence=confidence, alpha=alpha)
    return result


def _run_floor(base: pd.Series, arm: pd.Series) -> float:
    """`case_floor` of one run pair: the two arms' values of one (fold, seed), paired by case."""
    arm = arm.loc[base.index]
    return float(case_floor(base.to_numpy(dtype=float)[None, None], arm.to_numpy(dtype=float)[None, None])[0])


def undefined_verdict(column: str, arm: str, fold: object, seed: object) -> str:
    """The words of a column that cannot be tested because one run has no defined value in it."""
    return (f"undefined: run ({arm}, fold {fold}, seed {seed}) has no case where {column} is defined (the region is absent "
            "from both the reference and the prediction in every case), so this region is not tested; the others are")


def run_verdict(column: str, mean_diff: float, p_holm: float, folds: int, alpha: float = 0.05) -> str:
    """Plain words for one row of `compare_runs`: "cannot tell: ..." with one fold, "no evidence
    of a difference" when `p_holm >= alpha`, else "better"/"worse" (by the metric's direction;
    "higher"/"lower" for others) with the Holm-adjusted p, e.g. "worse (p=0.012)"."""
    if folds < 2:
        return ONE_FOLD
    if not p_holm < alpha or mean_diff == 0:
        return "no evidence of a difference"
    direction = _sign(column)
    sign = 1 if mean_diff > 0 else -1
    word = ("higher" if sign > 0 else "lower") if direction == 0 else ("better" if sign == direction else "worse")
    return f"{word} ({_format_p(p_holm)})"


def format_runs(df: pd.DataFrame) -> str:
    """`compare_runs`' result as a plain-text table for the terminal, with a note on the method."""
    baseline = df.attrs.get("baseline")
    title = f"Each arm against {baseline!r}, runs as the unit" if baseline else "Each arm against the baseline, runs as the unit"
    if df.empty:
        return f"{title}: no other arm to compare."
    ci = f"{100 * df.attrs.get('confidence', 0.95):g}% CI"  # simultaneous over the regions (compare_runs)
    header = ["arm", "metric", "runs", "baseline", "arm mean", f"diff [{ci}]", "seed SD", "fold SD", "MDE (Holm)", "p",
              "p (Holm)", "verdict"]
    lines: list[list[str]] = []
    floors = False
    for r in df.itertuples(index=False):
        f = f"{{:.{2 if _sign(r.metric) == -1 else 4}f}}"

        def num(v: float) -> str:  # NaN: not measured (one seed); an infinite bound keeps its sign: [-inf, inf]
            return "n/a" if np.isnan(v) else f.format(v)

        def p_cell(v: float) -> str:  # NaN: not tested (an undefined region)
            return "n/a" if np.isnan(v) else _format_p(v).removeprefix("p=")

        # A near-tie of HD95's penalties: the test reads the case SD, larger than the fold SD; marked *.
        case_sd = getattr(r, "case_sd", float("nan"))
        on_floor = bool(np.isfinite(case_sd) and r.spread > 0 and case_sd > r.spread)
        floors |= on_floor
        spread = f"{num(case_sd)}*" if on_floor else num(r.spread)
        family = getattr(r, "family", None) or metric_family(str(r.metric))
        words = str(r.verdict) if family == "primary" else f"secondary: {r.verdict}"
        lines.append([str(r.arm), str(r.metric), f"{r.folds}x{r.seeds}", num(r.mean_baseline), num(r.mean_arm),
                      f"{num(r.mean_diff)} [{num(r.ci_low)}, {num(r.ci_high)}]", num(r.noise_floor), spread, num(r.mde),
                      p_cell(r.p_value), p_cell(r.p_holm), words])
    out = [title, "", *_aligned(header, lines, left={0, 1, 11})]
    out += [
        "",
        "runs = folds x seeds per arm; diff = arm - baseline, paired by fold and seed over the same cases;",
        f"p: two-sided t-test on the fold means of the paired run differences (seeds averaged within a fold), {ci} its t interval,",
        "simultaneous over the regions of each metric (Bonferroni: an interval that excludes 0 is a Holm difference);",
        "Holm across the regions of each metric. seed SD: seed-to-seed SD of one run's mean (n/a with one seed);",
        "fold SD: SD over folds of the fold means of the paired differences, the noise the test reads;",
        "MDE (Holm): the smallest true difference the verdict finds with 80% power at that fold SD (alpha 0.05 / regions,",
        "Holm's first step). Dice, sensitivity, specificity: higher is better; HD95: lower is better.",
        "The family: Dice (lesion-wise Dice on 2023+ data) is the primary metric, its regions' verdicts together wrong at most",
        "5% of the time under no difference; every other metric is secondary, a Holm family of its own, its verdicts marked",
        "'secondary:' (with both, an arm gets a false alarm somewhere in up to 9% of null studies).",
    ]
    if floors:
        out += ["*: HD95's fold means scatter less than their cases alone make them scatter (a near-tie of its penalty values,",
                "373 mm a missed case): the test and the MDE read that case SD instead, never the near-tie."]
    return "\n".join(out)
