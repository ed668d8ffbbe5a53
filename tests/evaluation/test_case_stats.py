"""The per-case description (`evaluation/case_stats.py`): bootstrap CI, Wilcoxon against scipy,
the arm comparison table and its verdict words."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from brats_lab.evaluation.case_stats import RESULT_COLUMNS, compare_arms, paired_bootstrap_ci, verdict, wilcoxon_paired
from brats_lab.evaluation.stats import holm


# ---------------------------------------------------------------- bootstrap


def test_bootstrap_is_reproducible_with_a_seed_and_depends_on_it() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(0.5, 0.9, 60)
    b = a + rng.normal(0.02, 0.05, 60)
    assert paired_bootstrap_ci(a, b, seed=7) == paired_bootstrap_ci(a, b, seed=7)
    assert paired_bootstrap_ci(a, b, seed=7)[1:] != paired_bootstrap_ci(a, b, seed=8)[1:]


def test_bootstrap_ci_covers_the_true_mean_difference() -> None:
    rng = np.random.default_rng(2)
    a = rng.uniform(0.5, 0.9, 300)
    b = a + 0.05 + rng.normal(0.0, 0.03, 300)  # true mean difference 0.05
    mean_diff, low, high = paired_bootstrap_ci(a, b)
    assert mean_diff == pytest.approx(np.mean(b - a))
    assert low < 0.05 < high
    assert low < mean_diff < high
    # Standard error is 0.03 / sqrt(300) ~ 0.0017: a 95% interval is about +-0.0034 wide.
    assert 0.004 < high - low < 0.01


def test_bootstrap_coverage_is_near_nominal() -> None:
    # Over many data sets drawn around a known difference, the 95% interval should contain it
    # about 95% of the time (percentile bootstrap is a bit liberal at n = 40).
    rng = np.random.default_rng(3)
    hits = 0
    trials = 200
    for i in range(trials):
        a = rng.uniform(0.4, 0.9, 40)
        b = a + 0.02 + rng.normal(0.0, 0.05, 40)
        _, low, high = paired_bootstrap_ci(a, b, n_resamples=1000, seed=i)
        hits += low <= 0.02 <= high
    assert 0.88 <= hits / trials <= 0.99


def test_bootstrap_of_identical_arrays_is_all_zero() -> None:
    a = np.random.default_rng(4).uniform(0, 1, 25)
    assert paired_bootstrap_ci(a, a.copy()) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"confidence": 1.0}, "confidence"), ({"confidence": 0.0}, "confidence"), ({"n_resamples": 0}, "n_resamples")],
)
def test_bootstrap_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        paired_bootstrap_ci([1.0, 2.0], [1.0, 3.0], **kwargs)


def test_bootstrap_with_one_resample_is_that_resample() -> None:
    # One case: every resample is that case, so the single resample's mean is its difference.
    assert paired_bootstrap_ci([0.5], [0.75], n_resamples=1) == (0.25, 0.25, 0.25)


def test_bootstrap_of_many_cases_draws_its_resamples_in_blocks() -> None:
    # 1000 cases x 4200 resamples is more than one block of 2**22 indices (4194 resamples), so the
    # resamples come in two blocks. Differences 0 and 1 alternating: mean 1/2, and the resampled
    # mean has standard error sqrt(1/4 / 1000) = 0.0158, so the 95% interval is 1/2 +- 1.96 x 0.0158.
    a = np.zeros(1000)
    b = np.tile([0.0, 1.0], 500)
    mean, low, high = paired_bootstrap_ci(a, b, n_resamples=4200)
    assert mean == 0.5
    se = np.sqrt(0.25 / 1000)
    assert low == pytest.approx(0.5 - 1.96 * se, abs=0.003) and high == pytest.approx(0.5 + 1.96 * se, abs=0.003)


def test_a_round_off_difference_is_zero_not_minus_zero() -> None:
    # 0.3 - (0.1 + 0.2) is -5.6e-17 in floating point: the same score, so a difference of 0.0.
    result = paired_bootstrap_ci([0.1 + 0.2], [0.3])
    assert result == (0.0, 0.0, 0.0) and [str(v) for v in result] == ["0.0", "0.0", "0.0"]


# ---------------------------------------------------------------- Wilcoxon


def test_wilcoxon_matches_scipy_on_data_with_ties_and_zeros() -> None:
    a = np.array([0.80, 0.75, 0.90, 0.60, 0.85, 0.70, 0.95, 0.65, 0.88, 0.72, 0.81, 0.77, 0.93, 0.66, 0.79, 0.84])
    d = np.array([0.02, 0.02, -0.01, 0.03, 0.0, 0.05, 0.02, -0.03, 0.04, 0.0, 0.06, 0.01, 0.02, 0.07, -0.02, 0.03])
    b = a + d
    expected = sps.wilcoxon(np.round(d, 10), zero_method="pratt").pvalue
    assert wilcoxon_paired(a, b) == pytest.approx(expected, rel=1e-12)
    # Direction does not matter for a two-sided test.
    assert wilcoxon_paired(b, a) == pytest.approx(expected, rel=1e-12)
    assert wilcoxon_paired(a, b) < 0.05


def test_wilcoxon_matches_scipy_exact_without_ties() -> None:
    rng = np.random.default_rng(6)
    a = rng.uniform(size=20)
    b = a + rng.normal(0.1, 0.2, 20)
    assert wilcoxon_paired(a, b) == pytest.approx(sps.wilcoxon(b - a, method="exact").pvalue, rel=1e-12)


def test_wilcoxon_round_off_does_not_break_ties() -> None:
    # 0.9 - 0.8 and 0.7 - 0.6 differ in floating point but are the same difference.
    a = np.array([0.8, 0.6, 0.5, 0.3, 0.2])
    b = np.array([0.9, 0.7, 0.6, 0.4, 0.3])
    assert wilcoxon_paired(a, b) == pytest.approx(sps.wilcoxon([0.1] * 5).pvalue)


def test_wilcoxon_with_two_nonzero_differences_is_exact() -> None:
    # Two positive differences: the four sign patterns are equally likely under the null and the
    # observed one has the largest W+ (3 of 0, 1, 2, 3), so the two-sided p is 2 x 1/4.
    assert wilcoxon_paired([0.5, 0.5], [0.6, 0.7]) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.filterwarnings("error")
def test_wilcoxon_all_equal_is_one_without_warnings() -> None:
    a = np.array([0.5, 0.7, 1.0, 0.0, 0.9] * 6)
    assert wilcoxon_paired(a, a.copy()) == 1.0


@pytest.mark.filterwarnings("error")
def test_wilcoxon_one_nonzero_difference_is_one() -> None:
    a = np.zeros(30)
    b = a.copy()
    b[4] = 0.3
    # scipy's normal approximation would say ~0.32 here; the exact answer is 1.
    assert wilcoxon_paired(a, b) == 1.0


# ---------------------------------------------------------------- NaN and lengths


@pytest.mark.parametrize("fn", [paired_bootstrap_ci, wilcoxon_paired])
def test_nan_raises_naming_count_and_positions(fn) -> None:
    a = np.array([0.1, np.nan, 0.3, 0.4, np.nan])
    b = np.array([0.2, 0.3, 0.4, 0.5, 0.6])
    with pytest.raises(ValueError, match=r"a has 2 NaN value\(s\) at position\(s\) \[1, 4\]"):
        fn(a, b)
    with pytest.raises(ValueError, match=r"b has 2 NaN value\(s\) at position\(s\) \[1, 4\]"):
        fn(b, a)


@pytest.mark.parametrize("fn", [paired_bootstrap_ci, wilcoxon_paired])
def test_inf_raises_naming_it_non_finite(fn) -> None:
    message = ("a has 1 non-finite (NaN or inf) value(s) at position(s) [2]; they are not dropped silently: "
               "fix the upstream metric or drop the case(s) explicitly")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        fn([0.1, 0.2, np.inf], [0.1, 0.2, 0.3])


def test_none_is_a_missing_value_named_like_nan() -> None:
    # A metric that returned None (a missing value in Python) is reported by position, like NaN,
    # not with numpy's TypeError about objects.
    with pytest.raises(ValueError, match=re.escape("a has 1 NaN value(s) at position(s) [1]")):
        paired_bootstrap_ci([0.1, None, 0.3], [0.2, 0.3, 0.4])


@pytest.mark.parametrize("fn", [paired_bootstrap_ci, wilcoxon_paired])
def test_length_mismatch_empty_and_2d_raise(fn) -> None:
    with pytest.raises(ValueError, match="same length"):
        fn([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ValueError, match="^paired samples are empty: need at least one case$"):
        fn([], [])
    with pytest.raises(ValueError, match=re.escape("a must be 1-D (one value per case), but has shape (1, 2)")):
        fn([[0.1, 0.2]], [0.1, 0.2])


# ---------------------------------------------------------------- compare_arms


def _table(n: int = 40, seed: int = 0) -> pd.DataFrame:
    """Baseline; 'better_wt' better on WT Dice and HD95, equal elsewhere; 'worse_hd' worse on WT HD95."""
    rng = np.random.default_rng(seed)
    cases = [f"BraTS20_Training_{i:03d}" for i in range(1, n + 1)]
    base = pd.DataFrame(
        {
            "case": cases,
            "dice_ET": rng.uniform(0.5, 0.9, n),
            "dice_TC": rng.uniform(0.6, 0.9, n),
            "dice_WT": rng.uniform(0.7, 0.9, n),
            "hd95_WT": rng.uniform(3.0, 15.0, n),
        }
    )
    better = base.copy()
    better["dice_WT"] = base["dice_WT"] + 0.05 + rng.normal(0.0, 0.01, n)
    better["hd95_WT"] = base["hd95_WT"] - 2.0 + rng.normal(0.0, 0.5, n)
    worse = base.copy()
    worse["hd95_WT"] = base["hd95_WT"] + 3.0 + rng.normal(0.0, 0.5, n)
    frames = [t.assign(arm=name) for name, t in (("unet", base), ("better_wt", better), ("worse_hd", worse))]
    # Shuffle the cases of each arm: pairing must go by case, not row order.
    return pd.concat([f.sample(frac=1.0, random_state=i) for i, f in enumerate(frames)], ignore_index=True)


COLUMNS = ["dice_ET", "dice_TC", "dice_WT", "hd95_WT"]


def test_compare_arms_verdicts() -> None:
    result = compare_arms(_table(), baseline="unet", metric_columns=COLUMNS)
    assert list(result.columns) == RESULT_COLUMNS
    assert list(zip(result["arm"], result["metric"])) == [(a, m) for a in ("better_wt", "worse_hd") for m in COLUMNS]
    v = result.set_index(["arm", "metric"])["verdict"]
    assert v["better_wt", "dice_WT"] == "better (p<0.001)"
    assert v["better_wt", "hd95_WT"] == "better (p<0.001)"  # lower HD95 is better
    assert v["worse_hd", "hd95_WT"] == "worse (p<0.001)"
    for arm, metric in [("better_wt", "dice_ET"), ("better_wt", "dice_TC"), ("worse_hd", "dice_WT")]:
        assert v[arm, metric] == "no evidence of a difference"
        row = result.set_index(["arm", "metric"]).loc[(arm, metric)]
        assert (row["mean_diff"], row["ci_low"], row["ci_high"], row["p_value"]) == (0.0, 0.0, 0.0, 1.0)
    assert (result["n"] == 40).all()
    # Holm is applied across the metric columns within each arm.
    for _, group in result.groupby("arm"):
        np.testing.assert_allclose(group["p_holm"], holm(group["p_value"].to_numpy()))
    row = result.set_index(["arm", "metric"]).loc[("better_wt", "dice_WT")]
    assert row["mean_diff"] == pytest.approx(row["mean_arm"] - row["mean_baseline"])
    assert row["ci_low"] < 0.05 < row["ci_high"]


def test_compare_arms_is_reproducible_whatever_the_case_order() -> None:
    table = _table()
    reordered = pd.concat([f.iloc[::-1] for _, f in table.groupby("arm", sort=False)])
    pd.testing.assert_frame_equal(compare_arms(table, "unet", COLUMNS, seed=3), compare_arms(reordered, "unet", COLUMNS, seed=3))


def test_compare_arms_missing_case_is_named() -> None:
    table = _table()
    table = table[~((table["arm"] == "better_wt") & (table["case"] == "BraTS20_Training_007"))]
    with pytest.raises(ValueError, match="in baseline 'unet' but not in arm 'better_wt'.*BraTS20_Training_007"):
        compare_arms(table, "unet", COLUMNS)


def test_compare_arms_extra_case_in_arm_is_named() -> None:
    table = _table()
    extra = table[table["arm"] == "worse_hd"].iloc[:1].assign(case="BraTS20_Training_999")
    with pytest.raises(ValueError, match="in arm 'worse_hd' but not in baseline 'unet'.*BraTS20_Training_999"):
        compare_arms(pd.concat([table, extra]), "unet", COLUMNS)


def test_compare_arms_nan_is_named_by_case() -> None:
    table = _table()
    table.loc[(table["arm"] == "unet") & (table["case"] == "BraTS20_Training_003"), "dice_TC"] = np.nan
    message = ("column 'dice_TC' of arm 'unet' has 1 NaN/inf value(s), for case(s) ['BraTS20_Training_003']; not dropped "
               "silently: fix the upstream metric or remove the case(s) from every arm explicitly")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        compare_arms(table, "unet", COLUMNS)


def test_compare_arms_rejects_bad_input() -> None:
    table = _table()
    with pytest.raises(ValueError, match="baseline arm 'nope'"):
        compare_arms(table, "nope", COLUMNS)
    with pytest.raises(ValueError, match="dice_XX"):
        compare_arms(table, "unet", ["dice_XX"])
    with pytest.raises(ValueError, match="^metric_columns is empty: name at least one metric column to compare$"):
        compare_arms(table, "unet", [])
    # The same (arm, case) twice with different scores: a duplicate by its key, not a repeated row.
    twice = table[(table["arm"] == "unet") & (table["case"] == "BraTS20_Training_001")].assign(dice_ET=0.1)
    with pytest.raises(ValueError, match=re.escape("more than once: [('unet', 'BraTS20_Training_001')]")):
        compare_arms(pd.concat([table, twice]), "unet", COLUMNS)


def test_compare_arms_names_cases_missing_on_both_sides_at_once() -> None:
    table = _table()
    table = table[~((table["arm"] == "better_wt") & (table["case"] == "BraTS20_Training_007"))]
    extra = table[table["arm"] == "better_wt"].iloc[:1].assign(case="BraTS20_Training_999")
    message = ("cases must be paired; in baseline 'unet' but not in arm 'better_wt': ['BraTS20_Training_007']; "
               "in arm 'better_wt' but not in baseline 'unet': ['BraTS20_Training_999']")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        compare_arms(pd.concat([table, extra]), "unet", COLUMNS)


def test_compare_arms_passes_its_bootstrap_arguments_and_alpha_on() -> None:
    # The interval of each row is `paired_bootstrap_ci` of that column with the same arguments, by
    # default and when given; an alpha below every Holm p leaves no verdict but "no evidence".
    table = _table(n=12)
    base = table[table["arm"] == "unet"].set_index("case").sort_index()
    arm = table[table["arm"] == "better_wt"].set_index("case").sort_index()
    for kwargs in ({}, {"n_resamples": 300, "confidence": 0.8, "seed": 5}):
        row = compare_arms(table, "unet", ["dice_WT"], **kwargs).iloc[0]
        expected = paired_bootstrap_ci(base["dice_WT"], arm["dice_WT"], **kwargs)
        assert (row["mean_diff"], row["ci_low"], row["ci_high"]) == expected
    result = compare_arms(table, "unet", ["dice_WT"])
    assert result.attrs == {"baseline": "unet", "confidence": 0.95}
    assert result.iloc[0]["verdict"] == "better (p<0.001)"  # 12 gains of 12: exact p 2 / 2**12
    strict = compare_arms(table, "unet", ["dice_WT"], confidence=0.8, alpha=1e-4)
    assert strict.iloc[0]["verdict"] == "no evidence of a difference" and strict.attrs["confidence"] == 0.8


def test_compare_arms_reports_a_missing_value_given_as_none_by_case() -> None:
    # One arm's table built with None for a metric it could not compute: concatenated, the column
    # holds objects (floats and None), and None is reported as a missing value, naming the case.
    table = _table(n=5)
    none_arm = table[table["arm"] == "better_wt"].assign(dice_WT=None)
    mixed = pd.concat([table[table["arm"] != "better_wt"], none_arm])
    assert mixed["dice_WT"].dtype == object
    with pytest.raises(ValueError, match=re.escape("column 'dice_WT' of arm 'better_wt' has 5 NaN/inf value(s)")):
        compare_arms(mixed, "unet", ["dice_WT"])


def test_compare_arms_with_only_the_baseline_is_an_empty_table_with_the_columns() -> None:
    result = compare_arms(_table()[lambda t: t["arm"] == "unet"], "unet", COLUMNS)
    assert result.empty and list(result.columns) == RESULT_COLUMNS


def test_the_verdict_reads_each_metrics_declared_direction() -> None:
    # Better/worse by `metrics.metric_direction` for every metric brats-lab scores, lesion-wise and
    # whole-volume ones included; a column that is none of them (a loss, a misspelt name) only
    # says higher/lower.
    up = np.array([0.01, 0.02, 0.03])
    better = ("dice_ET", "sensitivity_TC", "specificity", "lesion_dice_ET", "volume_dice_WT", "lesion_tp_WT")
    worse = ("hd95_WT", "lesion_hd95_TC", "volume_hd95_WT", "lesion_fp_ET", "lesion_fn_WT")
    assert [verdict(c, up, 0.003) for c in better] == ["better (p=0.003)"] * len(better)
    assert [verdict(c, up, 0.003) for c in worse] == ["worse (p=0.003)"] * len(worse)
    other = ("loss", "lesion_loss", "dice_wt", "HD95_WT", "dice_ET_tta")
    assert [verdict(c, up, 0.003) for c in other] == ["higher (p=0.003)"] * len(other)


def test_verdict_words() -> None:
    up = np.array([0.01, 0.02, 0.03])
    assert verdict("dice_WT", up, 0.2) == "no evidence of a difference"
    assert verdict("dice_WT", up, 0.05) == "no evidence of a difference"  # p_holm >= alpha
    assert verdict("dice_WT", up, 0.003) == "better (p=0.003)"
    assert verdict("hd95_WT", up, 0.003) == "worse (p=0.003)"
    assert verdict("loss", -up, 0.0001) == "lower (p<0.001)"
    assert verdict("loss", up, 0.01) == "higher (p=0.010)"
    assert verdict("dice_WT", up, 0.001) == "better (p=0.001)"  # p<0.001 only below 0.001
    # Many small gains and one large loss: the mean and the ranks point opposite ways.
    mixed = np.array([0.01] * 20 + [-1.0])
    assert verdict("dice_ET", mixed, 0.001) == "different, direction unclear: mean and ranks disagree (p=0.001)"


def test_verdict_ranks_zeros_but_does_not_count_them_for_either_side() -> None:
    # Pratt: |d| ranks the three zeros 1, 2, 3, then 0.1 -> 4 and 0.2 -> 5. The signed ranks are
    # +4 and -5 (zeros dropped): the ranks point down, like the mean -0.02, so the verdict is worse.
    assert verdict("dice_ET", np.array([0.0, 0.0, 0.0, 0.1, -0.2]), 0.01) == "worse (p=0.010)"
    assert verdict("dice_ET", np.array([0.0, 0.0, 0.0, -0.1, 0.2]), 0.01) == "better (p=0.010)"
