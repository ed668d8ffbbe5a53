"""The verdict (`evaluation/stats.py`): Holm, the run-level test, noise floor, MDE, `compare_runs`
and the verdict table `format_runs` prints."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from brats_lab.evaluation.stats import (
    NO_SPREAD,
    ONE_FOLD,
    RUN_COLUMNS,
    case_floor,
    compare_runs,
    format_runs,
    holm,
    fold_spread,
    minimum_detectable_effect,
    noise_floor,
    run_level_test,
    run_means,
    run_verdict,
    spread_mde,
)


# ---------------------------------------------------------------- Holm


def test_holm_worked_example() -> None:
    # sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> running max 0.06.
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])


def test_holm_caps_at_one_and_is_monotone() -> None:
    p = np.array([0.5, 0.001, 0.4, 0.02, 0.9])
    adj = holm(p)
    np.testing.assert_allclose(adj, [1.0, 0.005, 1.0, 0.08, 1.0])
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= p)
    assert holm([]).size == 0


def test_holm_takes_a_zero_p_value() -> None:
    # 0 is a p-value (a test whose statistic is infinite): sorted 0 x 2 = 0, then 0.3 x 1.
    np.testing.assert_array_equal(holm([0.3, 0.0]), [0.3, 0.0])


def test_holm_matches_statsmodels() -> None:
    from statsmodels.stats import multitest  # a dev dependency: missing, the test fails rather than skips
    p = np.random.default_rng(7).uniform(0, 0.2, 12)
    np.testing.assert_allclose(holm(p), multitest.multipletests(p, method="holm")[1])


def test_holm_rejects_invalid_p() -> None:
    with pytest.raises(ValueError, match=r"position\(s\) \[1\]"):
        holm([0.1, 1.5])
    with pytest.raises(ValueError, match=r"^p_values has 1 NaN value\(s\) at position\(s\) \[1\]; they are not dropped"):
        holm([0.1, float("nan")])


# --- the verdict's test: runs as the unit ----------------------------------------------------------

def test_run_level_test_is_a_t_test_on_fold_means_of_the_seeds():
    # d[fold, seed]: fold means 0.02, 0.04, 0.00 -> mean 0.02, sd 0.02, se 0.02/sqrt(3), t = sqrt(3), df 2.
    d = np.array([[0.01, 0.03], [0.05, 0.03], [0.0, 0.0]])
    mean, low, high, p = run_level_test(d)
    assert abs(mean - 0.02) < 1e-12
    expected_p = 2 * sps.t.sf(np.sqrt(3), 2)
    assert abs(p - expected_p) < 1e-12
    half = sps.t.ppf(0.975, 2) * 0.02 / np.sqrt(3)
    assert abs(low - (0.02 - half)) < 1e-12 and abs(high - (0.02 + half)) < 1e-12
    # One fold: nothing to test against.
    assert run_level_test(np.array([[0.1, 0.2, 0.3]]))[3] == 1.0
    with pytest.raises(ValueError, match="non-finite"):
        run_level_test(np.array([[0.1], [np.nan]]))


def test_noise_floor_pools_the_seed_variance_of_each_group():
    # Group 1 seeds 0.70, 0.72 (var 0.0002); group 2 seeds 0.50, 0.56 (var 0.0018): pooled sqrt(0.001).
    assert abs(noise_floor(np.array([[0.70, 0.72], [0.50, 0.56]])) - np.sqrt(0.001)) < 1e-12
    assert np.isnan(noise_floor(np.array([[0.7], [0.5]])))  # one seed: not measured


def test_minimum_detectable_effect_grows_with_noise_and_shrinks_with_runs():
    assert minimum_detectable_effect(0.02, 5, 3) == pytest.approx(2 * minimum_detectable_effect(0.01, 5, 3), rel=1e-9)
    assert minimum_detectable_effect(0.01, 5, 3) < minimum_detectable_effect(0.01, 5, 1) < minimum_detectable_effect(0.01, 2, 1)
    assert minimum_detectable_effect(0.01, 1, 3) == float("inf")
    # Checked against the noncentral t: at the MDE the test's power is 80%.
    mde, df = minimum_detectable_effect(1.0, 4, 2), 3
    ncp = mde / np.sqrt(2 / (4 * 2))
    crit = sps.t.ppf(0.975, df)
    assert abs(sps.nct.sf(crit, df, ncp) + sps.nct.cdf(-crit, df, ncp) - 0.8) < 1e-6


def _runs_table(offsets: dict[tuple[str, int, int], float]) -> pd.DataFrame:
    cases = {0: ["a", "b"], 1: ["c", "d"]}
    return pd.DataFrame([{"arm": arm, "fold": f, "seed": s, "case": c, "dice_WT": 0.7 + off + (0.1 if c in "ac" else 0.0)}
                         for (arm, f, s), off in offsets.items() for c in cases[f]])


def test_compare_runs_pairs_runs_by_fold_and_seed_and_says_what_it_cannot_tell():
    offsets = {("base", f, s): 0.0 for f in (0, 1) for s in (0, 1)}
    offsets |= {("new", 0, 0): 0.01, ("new", 0, 1): 0.03, ("new", 1, 0): 0.02, ("new", 1, 1): 0.04}
    result = compare_runs(_runs_table(offsets), "base", ["dice_WT"])
    row = result.iloc[0]
    assert (row["folds"], row["seeds"], row["n"]) == (2, 2, 4)
    assert abs(row["mean_diff"] - 0.025) < 1e-12  # fold means 0.02 and 0.03
    assert abs(row["noise_floor"] - np.sqrt((0 + 0 + 0.0002 + 0.0002) / 4)) < 1e-12
    assert row["verdict"] == "no evidence of a difference"  # one degree of freedom: t = 5 is not enough
    one_fold = _runs_table({k: v for k, v in offsets.items() if k[1] == 0})
    assert compare_runs(one_fold, "base", ["dice_WT"]).iloc[0]["verdict"] == ONE_FOLD
    only_baseline = compare_runs(_runs_table({k: v for k, v in offsets.items() if k[0] == "base"}), "base", ["dice_WT"])
    assert only_baseline.empty and list(only_baseline.columns) == RUN_COLUMNS
    missing = _runs_table({k: v for k, v in offsets.items() if k != ("new", 1, 1)})
    with pytest.raises(ValueError, match="arm 'new' has runs"):
        compare_runs(missing, "base", ["dice_WT"])


def test_run_level_test_with_two_folds_is_a_cauchy_t():
    # Fold means 0.01 and 0.03: mean 0.02, sd 0.01 sqrt(2), se 0.01, t = 2 with one degree of
    # freedom, whose t is a Cauchy: two-sided p = 1 - 2 atan(2) / pi, critical t = tan(0.475 pi).
    mean, low, high, p = run_level_test(np.array([[0.01], [0.03]]))
    assert mean == pytest.approx(0.02, abs=1e-15)
    assert p == pytest.approx(1 - 2 * np.arctan(2.0) / np.pi, abs=1e-12)
    half = np.tan(0.475 * np.pi) * 0.01
    assert (low, high) == (pytest.approx(0.02 - half, abs=1e-12), pytest.approx(0.02 + half, abs=1e-12))


def test_run_level_test_is_vectorised_over_leading_axes():
    # Two studies stacked on a leading axis give each study's own result, at any confidence.
    d1 = np.array([[0.01, 0.03], [0.05, 0.03], [0.0, 0.0]])
    d2 = np.array([[0.02, -0.01], [0.0, 0.01], [-0.04, -0.02]])
    both = run_level_test(np.stack([d1, d2]), confidence=0.9)
    for i, d in enumerate((d1, d2)):
        np.testing.assert_allclose([v[i] for v in both], run_level_test(d, confidence=0.9), rtol=0, atol=1e-15)
    # d1 at 90%: se 0.02 / sqrt(3), critical t of 2 degrees of freedom at 0.95: 0.9 / sqrt(2 x 0.95 x 0.05).
    half = 0.9 / np.sqrt(2 * 0.95 * 0.05) * 0.02 / np.sqrt(3)
    assert both[1][0] == pytest.approx(0.02 - half, abs=1e-12) and both[2][0] == pytest.approx(0.02 + half, abs=1e-12)


@pytest.mark.filterwarnings("error")
def test_run_level_test_without_spread_between_folds():
    # Equal fold means (0.1 each; their sd is round-off, ~1e-17): a tie is no estimate of the noise,
    # not certainty: p = 1 and an interval that says nothing (never p = 0 or a zero-width interval).
    mean, low, high, p = run_level_test(np.full((3, 2), 0.1))
    assert p == 1.0 and (low, high) == (-np.inf, np.inf) and mean == pytest.approx(0.1, abs=1e-15)
    # HD95's penalty makes ties common: two folds whose differences are both one missed case (37.3 mm).
    assert run_level_test(np.array([[37.313], [37.313]]))[1:] == (-np.inf, np.inf, 1.0)
    # Fold means that are round-off around zero: the same.
    mean, low, high, p = run_level_test(np.array([[-1e-12, 2e-13], [-3e-12, 0.0], [0.0, 1e-13]]))
    assert (mean, low, high, p) == (0.0, -np.inf, np.inf, 1.0)
    # One fold: p = 1 and an interval that says nothing.
    assert run_level_test(np.array([[0.1, 0.3]])) == (pytest.approx(0.2), -np.inf, np.inf, 1.0)


@pytest.mark.parametrize("shape", [(3,), (2, 0), (0, 2), (1, 2, 0)])
def test_run_level_test_needs_a_fold_and_a_seed(shape):
    message = f"run differences must have shape (..., folds, seeds) with at least one of each, got {shape}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        run_level_test(np.zeros(shape))


def test_run_level_test_names_the_first_five_non_finite_runs():
    d = np.zeros((4, 2))
    d[:3] = np.nan
    message = "run differences have 6 non-finite value(s), at (..., fold, seed) [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0]]"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        run_level_test(d)


# --- the noise floor and the minimum detectable effect ---------------------------------------------


@pytest.mark.filterwarnings("error")
def test_noise_floor_of_one_group_and_of_too_few_seeds_or_groups():
    # One group, seeds 0.70 and 0.74: variance 0.04**2 / 2 = 0.0008. Three seeds 1, 2, 3 (variance 1)
    # pooled with 2, 2, 2 (variance 0): sqrt(1/2).
    assert noise_floor(np.array([[0.70, 0.74]])) == pytest.approx(np.sqrt(0.0008), abs=1e-15)
    assert noise_floor(np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])) == pytest.approx(np.sqrt(0.5), abs=1e-15)
    # No seed-to-seed spread can be measured with one seed or no group: NaN, without a warning.
    assert np.isnan(noise_floor(np.zeros((3, 1)))) and np.isnan(noise_floor(np.zeros((0, 2))))


def test_noise_floor_rejects_bad_input():
    with pytest.raises(ValueError, match=f"^{re.escape('run means must have shape (groups, seeds), got (3,)')}$"):
        noise_floor(np.zeros(3))
    x = np.zeros((4, 2))
    x[:3] = np.inf
    message = "run means have 6 non-finite value(s), at (group, seed) [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0]]"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        noise_floor(x)


def test_none_is_a_missing_value_named_like_nan() -> None:
    # A metric that returned None (a missing value in Python) is reported by position, like NaN,
    # not with numpy's TypeError about objects.
    with pytest.raises(ValueError, match=re.escape("run differences have 1 non-finite value(s), at (..., fold, seed) [[1, 0]]")):
        run_level_test([[0.1], [None]])
    with pytest.raises(ValueError, match=re.escape("run means have 1 non-finite value(s), at (group, seed) [[0, 1]]")):
        noise_floor([[0.1, None]])


def _power(effect: float, noise: float, folds: int, seeds: int, alpha: float = 0.05) -> float:
    """Power of the two-sided t-test on `folds` fold means of paired differences, each the mean of
    `seeds` run differences (sd noise sqrt(2 / seeds)), at a true difference `effect`: the
    probability that a noncentral t with folds - 1 degrees of freedom falls beyond either critical value
    (the lower tail as the upper tail of -T, whose noncentrality is -ncp: scipy's cdf is NaN there at
    some large noncentralities)."""
    df = folds - 1
    ncp = effect / (noise * np.sqrt(2 / seeds) / np.sqrt(folds))
    crit = sps.t.ppf(1 - alpha / 2, df)
    return float(sps.nct.sf(crit, df, ncp) + sps.nct.sf(crit, df, -ncp))


@pytest.mark.parametrize("folds, seeds, alpha", [(2, 1, 0.05), (3, 2, 0.05), (5, 3, 0.05), (4, 2, 0.01)])
def test_minimum_detectable_effect_is_where_the_power_reaches_80_percent(folds, seeds, alpha):
    mde = minimum_detectable_effect(0.01, folds, seeds, alpha)
    assert _power(mde, 0.01, folds, seeds, alpha) == pytest.approx(0.8, abs=1e-6)
    assert _power(0.98 * mde, 0.01, folds, seeds, alpha) < 0.799


def test_minimum_detectable_effect_at_a_low_power_counts_both_tails():
    # At 10% power with 30 folds the effect is small (noncentrality ~0.6), and a significant result
    # of the wrong sign is a fair part of the power: the MDE is where both tails add up to 10%.
    mde = minimum_detectable_effect(1.0, 30, 1, power=0.1)
    assert _power(mde, 1.0, 30, 1) == pytest.approx(0.1, abs=1e-9)
    assert mde / np.sqrt(2 / 30) < 1.0


def _power_at_spread(effect: float, spread: float, folds: int, alpha: float) -> float:
    """`_power` with the fold means' spread given directly."""
    return _power(effect, spread / np.sqrt(2), folds, 1, alpha)


@pytest.mark.parametrize("folds, alpha", [(2, 0.05), (3, 0.05 / 3), (5, 0.05 / 3), (8, 0.05 / 2), (2, 0.001)])
def test_spread_mde_is_where_the_power_reaches_80_percent(folds, alpha):
    mde = spread_mde(0.02, folds, alpha)
    assert np.isfinite(mde) and _power_at_spread(mde, 0.02, folds, alpha) == pytest.approx(0.8, abs=1e-6)


def test_minimum_detectable_effect_edge_cases():
    # No noise (a tie on every fold): the test cannot estimate its noise and says "cannot tell".
    assert minimum_detectable_effect(0.0, 3, 2) == np.inf and spread_mde(0.0, 5) == np.inf
    assert np.isnan(minimum_detectable_effect(float("nan"), 3, 2))  # one seed: noise not measured
    # A small alpha with one degree of freedom needs a noncentrality far beyond 100: no bare brentq error.
    assert minimum_detectable_effect(0.01, 2, 1, alpha=0.001) > minimum_detectable_effect(0.01, 2, 1, alpha=0.05)
    with pytest.raises(ValueError, match=re.escape("alpha and power must be in (0, 1), got 0 and 0.8")):
        spread_mde(0.01, 3, alpha=0)
    assert minimum_detectable_effect(0.01, 1, 2) == np.inf
    for folds, seeds in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match=re.escape(f"folds and seeds must be at least 1, got {folds} and {seeds}")):
            minimum_detectable_effect(0.01, folds, seeds)


# --- run means, compare_runs ---------------------------------------------------------------------

def test_run_means_averages_each_run_sorted_and_reads_no_seed_column_as_seed_0():
    per_case = pd.DataFrame({"arm": ["b", "b", "a", "a", "a"], "fold": [1, 1, 0, 1, 0], "case": list("pqrst"),
                             "dice": [0.5, 0.7, 0.2, 0.9, 0.4]})
    means = run_means(per_case, ["dice"])
    assert list(means.index) == [("a", 0, 0), ("a", 1, 0), ("b", 1, 0)]
    np.testing.assert_allclose(means["dice"], [0.3, 0.9, 0.6])


# Run means (dice_WT, hd95_WT) per (fold, seed) of each arm; every run has two cases, at the mean
# +- 0.05 (Dice) and +- 1 (HD95). "same" scores exactly as the baseline.
BASE_RUNS = {(0, 0): (0.70, 5.0), (0, 1): (0.72, 5.0), (1, 0): (0.60, 6.0), (1, 1): (0.62, 6.0), (2, 0): (0.80, 4.0),
             (2, 1): (0.80, 4.0)}
NEW_RUNS = {(0, 0): (0.73, 5.5), (0, 1): (0.75, 5.5), (1, 0): (0.61, 6.5), (1, 1): (0.65, 6.5), (2, 0): (0.84, 4.5),
            (2, 1): (0.82, 4.5)}


def _hand_runs() -> pd.DataFrame:
    rows = []
    for arm, runs in (("same", BASE_RUNS), ("new", NEW_RUNS), ("base", BASE_RUNS)):  # not in alphabetical order
        for (fold, seed), (dice, hd) in runs.items():
            for case, sign in ((f"c{2 * fold}", 1), (f"c{2 * fold + 1}", -1)):
                rows.append({"arm": arm, "fold": fold, "seed": seed, "case": case, "dice_WT": dice + 0.05 * sign,
                             "hd95_WT": hd + sign})
    table = pd.DataFrame(rows)
    # Shuffled within each arm (the arms stay in their order of first appearance): row order must not matter.
    return pd.concat([part.sample(frac=1.0, random_state=0) for _, part in table.groupby("arm", sort=False)])


def test_compare_runs_on_a_table_worked_by_hand():
    # new - base, Dice: fold means of the paired run differences 0.03, 0.02, 0.03 -> mean 0.08/3,
    # sd 0.01/sqrt(3), se 0.01/3, t = 8 with 2 degrees of freedom, whose two-sided p is
    # 1 - t/sqrt(t^2 + 2) and critical value at 97.5% is 0.95/sqrt(2 x 0.975 x 0.025).
    # Seed variances (x - y)^2 / 2 of each arm's fold: base 2, 2, 0 and new 2, 8, 2 (x 1e-4), pooled
    # over the 6 groups: noise floor sqrt(16e-4 / 6).
    # HD95: every fold mean is 0.5, no spread: p = 1, an interval that says nothing, noise 0, MDE
    # infinite, "cannot tell". Holm of (p_dice, 1): p_dice x 2, then 1.
    result = compare_runs(_hand_runs(), "base", ["dice_WT", "hd95_WT"])
    assert list(result.columns) == RUN_COLUMNS
    assert result.attrs == {"baseline": "base", "confidence": 0.95, "alpha": 0.05}
    assert list(zip(result["arm"], result["metric"])) == [("same", "dice_WT"), ("same", "hd95_WT"), ("new", "dice_WT"),
                                                        ("new", "hd95_WT")]
    assert (result["n"] == 6).all() and (result["folds"] == 3).all() and (result["seeds"] == 2).all()
    p_dice = 1 - 8 / np.sqrt(66)
    # The interval is simultaneous over the two columns: each at 1 - 0.05 / 2, whose critical t
    # of 2 degrees of freedom is (2q - 1) / sqrt(2q(1 - q)) at q = 1 - 0.05 / 4.
    half = 0.975 / np.sqrt(2 * 0.9875 * 0.0125) * 0.01 / 3
    noise = np.sqrt(16e-4 / 6)
    dice = result.iloc[2]
    expected = {"mean_baseline": 4.24 / 6, "mean_arm": 4.40 / 6, "mean_diff": 0.08 / 3, "ci_low": 0.08 / 3 - half,
                "ci_high": 0.08 / 3 + half, "noise_floor": noise, "spread": 0.01 / np.sqrt(3), "p_value": p_dice,
                "p_holm": 2 * p_dice}
    assert {k: dice[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    # The MDE is the verdict's: at the fold spread, at Holm's first step over the two columns.
    assert _power_at_spread(dice["mde"], 0.01 / np.sqrt(3), 3, 0.05 / 2) == pytest.approx(0.8, abs=1e-6)
    assert dice["verdict"] == "better (p=0.031)"
    hd = result.iloc[3]
    expected = {"mean_baseline": 5.0, "mean_arm": 5.5, "mean_diff": 0.5, "ci_low": -np.inf, "ci_high": np.inf,
                "noise_floor": 0.0, "spread": 0.0, "mde": np.inf, "p_value": 1.0, "p_holm": 1.0}
    assert {k: hd[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert hd["verdict"] == NO_SPREAD
    for _, same in result.iloc[:2].iterrows():
        assert (same["mean_diff"], same["ci_low"], same["ci_high"], same["p_value"], same["p_holm"]) == (0, -np.inf, np.inf, 1, 1)
        assert same["verdict"] == NO_SPREAD


def test_compare_runs_passes_confidence_and_alpha_on():
    # At 90%, simultaneous over two columns (each at 95%): the critical t of 2 degrees of freedom
    # at q = 0.975 is 0.95/sqrt(2 x 0.975 x 0.025); at alpha 0.01 the MDE is the one of that level
    # and p = 0.015 is no longer a difference.
    result = compare_runs(_hand_runs(), "base", ["dice_WT", "hd95_WT"], confidence=0.9, alpha=0.01)
    assert result.attrs == {"baseline": "base", "confidence": 0.9, "alpha": 0.01}
    dice = result.iloc[2]
    half = 0.95 / np.sqrt(2 * 0.975 * 0.025) * 0.01 / 3
    assert (dice["ci_low"], dice["ci_high"]) == (pytest.approx(0.08 / 3 - half, abs=1e-12), pytest.approx(0.08 / 3 + half, abs=1e-12))
    assert _power_at_spread(dice["mde"], dice["spread"], 3, 0.01 / 2) == pytest.approx(0.8, abs=1e-6)
    assert dice["verdict"] == "no evidence of a difference"
    assert result.iloc[3]["verdict"] == NO_SPREAD


def test_compare_runs_without_a_seed_column_is_one_seed():
    table = _hand_runs()
    one_seed = table[table["seed"] == 0].drop(columns="seed")
    row = compare_runs(one_seed, "base", ["dice_WT"]).iloc[1]  # new: fold means 0.03, 0.01, 0.04
    assert (row["folds"], row["seeds"]) == (3, 1) and np.isnan(row["noise_floor"])
    # One seed: no noise floor, but the verdict's MDE stands on the fold spread of 0.03, 0.01, 0.04.
    assert row["spread"] == pytest.approx(np.std([0.03, 0.01, 0.04], ddof=1), abs=1e-12)
    assert row["mde"] == pytest.approx(spread_mde(row["spread"], 3), abs=1e-12)
    assert row["mean_diff"] == pytest.approx(0.08 / 3, abs=1e-12)
    extra = one_seed[(one_seed["arm"] == "new") & (one_seed["case"] == "c2")].assign(case="x")
    with pytest.raises(ValueError, match=re.escape("fold 1, seed 0 has cases ['x'] in only one of 'new' and 'base'")):
        compare_runs(pd.concat([one_seed, extra]), "base", ["dice_WT"])


def test_compare_runs_rejects_bad_tables_naming_what_is_wrong():
    table = _hand_runs()[["arm", "fold", "seed", "case", "dice_WT", "hd95_WT"]].sort_values(["arm", "fold", "seed", "case"],
                                                                                            key=lambda c: c.map(str))
    table = pd.concat([table[table["arm"] == "same"], table[table["arm"] != "same"]], ignore_index=True)

    def raises(message: str, bad: pd.DataFrame, columns: list[str] = ["dice_WT"]) -> None:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            compare_runs(bad, "base", columns)

    raises("per-case table lacks column(s) ['fold']; it has ['arm', 'seed', 'case', 'dice_WT', 'hd95_WT']",
           table.drop(columns="fold"))
    raises("metric_columns is empty: name at least one metric column to compare", table, [])
    with pytest.raises(ValueError, match=re.escape("baseline arm 'nope' is not in the table, which has arms ['same', 'base', 'new']")):
        compare_runs(table, "nope", ["dice_WT"])
    # The first row (same, fold 0, seed 0, c0) again, after a later one again, both with new scores.
    twice = table.iloc[[7, 0]].assign(dice_WT=0.0)
    raises("(arm, fold, seed, case) must be unique, but (same, fold 0, seed 0, c0) appears more than once",
           pd.concat([table, twice]))
    bad = table.copy()
    bad.loc[(bad["arm"] == "new") & (bad["case"] == "c2") & (bad["seed"] == 0), "dice_WT"] = np.nan
    bad.loc[(bad["arm"] == "base") & (bad["case"] == "c5") & (bad["seed"] == 1), "dice_WT"] = np.inf
    raises("column 'dice_WT' has 2 NaN/inf value(s), first for arm 'base' case 'c5'; not dropped silently: fix the upstream "
           "metric or remove the case(s) from every arm", bad)
    raises("arm 'base' does not have the same seeds in every fold: it has (fold, seed) [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]",
           table[~((table["arm"] == "base") & (table["fold"] == 2) & (table["seed"] == 1))])
    extra = pd.DataFrame([{"arm": "new", "fold": 1, "seed": 0, "case": f"x{i}", "dice_WT": 0.5, "hd95_WT": 5.0} for i in range(6)])
    raises("cases must be paired: fold 1, seed 0 has cases ['x0', 'x1', 'x2', 'x3', 'x4'] in only one of 'new' and 'base'",
           pd.concat([table, extra]))


def test_compare_runs_reports_a_missing_value_given_as_none_by_case() -> None:
    # One arm's runs built with None for a metric it could not compute: None is reported as a
    # missing value, naming the arm.
    runs = _hand_runs()
    none_runs = pd.concat([runs[runs["arm"] != "new"], runs[runs["arm"] == "new"].assign(dice_WT=None)])
    with pytest.raises(ValueError, match=re.escape("column 'dice_WT' has 12 NaN/inf value(s), first for arm 'new'")):
        compare_runs(none_runs, "base", ["dice_WT"])


def test_run_verdict_words():
    assert run_verdict("dice_WT", 0.02, 0.001, folds=1) == ONE_FOLD
    assert run_verdict("dice_WT", 0.02, 0.2, folds=3) == "no evidence of a difference"  # default alpha 0.05
    assert run_verdict("dice_WT", 0.02, 0.05, folds=3) == "no evidence of a difference"  # p_holm >= alpha
    assert run_verdict("dice_WT", 0.0, 0.001, folds=3) == "no evidence of a difference"  # no direction to name
    assert run_verdict("dice_WT", 0.02, 0.049, folds=2) == "better (p=0.049)"
    assert run_verdict("dice_WT", 1.0, 0.001, folds=3) == "better (p=0.001)"
    assert run_verdict("dice_WT", 0.5, 0.0009, folds=3) == "better (p<0.001)"
    assert run_verdict("dice_WT", -0.02, 0.01, folds=3) == "worse (p=0.010)"
    assert run_verdict("hd95_WT", 0.7, 0.01, folds=3) == "worse (p=0.010)"
    assert run_verdict("hd95_WT", -0.7, 0.01, folds=3) == "better (p=0.010)"
    assert run_verdict("loss", 0.5, 0.01, folds=3) == "higher (p=0.010)"
    assert run_verdict("loss", -0.5, 0.01, folds=3) == "lower (p=0.010)"
    assert run_verdict("dice_WT", 0.02, 0.08, folds=3, alpha=0.1) == "better (p=0.080)"


def test_run_verdict_reads_each_metrics_declared_direction() -> None:
    # Better/worse by `metrics.metric_direction`, lesion-wise and whole-volume metrics included.
    worse = ("hd95_WT", "lesion_hd95_TC", "volume_hd95_WT", "lesion_fp_ET", "lesion_fn_WT")
    assert [run_verdict(c, 0.02, 0.003, folds=3) for c in worse] == ["worse (p=0.003)"] * len(worse)


# --- format_runs: the verdict table every ablation prints -------------------------------------------


def _verdict_rows() -> pd.DataFrame:
    """Rows of four designs, so that every number format shows in one table (4 decimals, 2 for HD95;
    n/a for what one seed cannot measure; the infinite interval and MDE of one fold)."""
    rows = [
        ("att_unet", "dice_ET", 10, 3, 2, 0.71234, 0.73456, 0.02222, 0.00512, 0.03932, 0.00612, 0.00912, 0.01523, 0.0234, 0.0468,
         "better (p=0.047)", np.nan, "primary"),
        ("att_unet", "hd95_ET", 10, 3, 2, 5.678, 4.321, -1.357, -2.5, -0.2, 0.347, 0.512, 1.234, 0.0004, 0.0008, "better (p<0.001)",
         0.1, "secondary"),
        ("one_fold", "dice_ET", 10, 1, 2, 0.7, 0.65, -0.05, -np.inf, np.inf, 0.004, np.nan, np.inf, 1.0, 1.0, ONE_FOLD, np.nan, "primary"),
        ("loss_arm", "loss", 10, 2, 1, 0.31, 0.35, 0.04, -0.05, 0.13, np.nan, 0.0636, 0.1234, 0.12, 0.12, "no evidence of a difference",
         np.nan, "secondary"),
    ]
    return pd.DataFrame(rows, columns=RUN_COLUMNS)


def test_format_runs_prints_the_verdict_table_exactly():
    # Worked by hand: column widths 8, 7, 4, 8, 8, 24 (the loss row's interval), 7, 7, 10, 7 ("p<0.001"
    # keeps its "p<", only "p=" is dropped), 8 and the verdict's, two spaces apart; arm, metric and
    # verdict left-aligned, the numbers right-aligned.
    df = _verdict_rows()
    df.attrs.update(baseline="unet", confidence=0.9)
    expected = [
        "Each arm against 'unet', runs as the unit",
        "",
        "arm       metric   runs  baseline  arm mean             diff [90% CI]  seed SD  fold SD  MDE (Holm)        p  p (Holm)  verdict",
        "  ".join("-" * w for w in (8, 7, 4, 8, 8, 24, 7, 7, 10, 7, 8, len(ONE_FOLD))),
        "att_unet  dice_ET   3x2    0.7123    0.7346   0.0222 [0.0051, 0.0393]   0.0061   0.0091      0.0152    0.023     0.047  better (p=0.047)",
        "att_unet  hd95_ET   3x2      5.68      4.32      -1.36 [-2.50, -0.20]     0.35     0.51        1.23  p<0.001   p<0.001  secondary: better (p<0.001)",
        "one_fold  dice_ET   1x2    0.7000    0.6500       -0.0500 [-inf, inf]   0.0040      n/a         inf    1.000     1.000  " + ONE_FOLD,
        "loss_arm  loss      2x1    0.3100    0.3500  0.0400 [-0.0500, 0.1300]      n/a   0.0636      0.1234    0.120     0.120  secondary: no evidence of a difference",
        "",
        "runs = folds x seeds per arm; diff = arm - baseline, paired by fold and seed over the same cases;",
        "p: two-sided t-test on the fold means of the paired run differences (seeds averaged within a fold), 90% CI its t interval,",
        "simultaneous over the regions of each metric (Bonferroni: an interval that excludes 0 is a Holm difference);",
        "Holm across the regions of each metric. seed SD: seed-to-seed SD of one run's mean (n/a with one seed);",
        "fold SD: SD over folds of the fold means of the paired differences, the noise the test reads;",
        "MDE (Holm): the smallest true difference the verdict finds with 80% power at that fold SD (alpha 0.05 / regions,",
        "Holm's first step). Dice, sensitivity, specificity: higher is better; HD95: lower is better.",
        "The family: Dice (lesion-wise Dice on 2023+ data) is the primary metric, its regions' verdicts together wrong at most",
        "5% of the time under no difference; every other metric is secondary, a Holm family of its own, its verdicts marked",
        "'secondary:' (with both, an arm gets a false alarm somewhere in up to 9% of null studies).",
    ]
    assert format_runs(df).split("\n") == expected


def test_format_runs_without_attrs_and_without_rows():
    df = _verdict_rows().iloc[[3]]
    lines = format_runs(df).split("\n")
    assert lines[0] == "Each arm against the baseline, runs as the unit"
    assert lines[2].split()[6:9] == ["diff", "[95%", "CI]"]
    # Alone, the loss row sets the widths of metric (6, its header) and p (5).
    assert lines[4] == ("loss_arm  loss     2x1    0.3100    0.3500  0.0400 [-0.0500, 0.1300]      n/a   0.0636      0.1234  0.120     0.120  "
                        "secondary: no evidence of a difference")
    empty = _verdict_rows().iloc[:0]
    assert format_runs(empty) == "Each arm against the baseline, runs as the unit: no other arm to compare."
    empty.attrs["baseline"] = "unet"
    assert format_runs(empty) == "Each arm against 'unet', runs as the unit: no other arm to compare."


def test_fold_spread_reads_a_tie_as_exactly_zero_and_one_fold_as_unmeasured():
    assert fold_spread(np.array([[0.1, 0.1], [0.2, 0.0], [0.05, 0.15]])) == 0.0  # fold means 0.1 each, up to round-off
    assert fold_spread(np.array([[0.1], [0.3]])) == pytest.approx(np.sqrt(0.02), abs=1e-12)
    assert np.isnan(fold_spread(np.array([[0.1, 0.3]])))


def test_an_hd95_near_tie_is_read_at_its_cases_spread_not_as_certainty():
    # 2 folds x 1 seed, 4 cases each: the arm misses one case per fold (373.13 mm) and is 0.01 mm
    # off on another in fold 0 only (the baseline 1 mm apart between the folds): fold means of the
    # paired differences 92.785 and 92.5325, a spread of 0.18 mm. The plain t-test (1 degree of
    # freedom) calls that p ~ 0.0009, "worse" even after Holm. HD95's
    # spread is floored at what the cases alone give a fold mean: var(d, ddof 1) / 4 per fold.
    base = {0: [2.0, 2.0, 2.0, 2.0], 1: [3.0, 3.0, 3.0, 3.0]}
    arm = {0: [373.13, 2.01, 2.0, 2.0], 1: [373.13, 3.0, 3.0, 3.0]}
    rows = [{"arm": name, "fold": f, "case": f"c{f}{i}", "hd95_WT": v, "dice_WT": 0.8 + 0.01 * i}
            for name, scores in (("base", base), ("new", arm)) for f in (0, 1) for i, v in enumerate(scores[f])]
    result = compare_runs(pd.DataFrame(rows), "base", ["dice_WT", "hd95_WT"])
    hd = result.set_index("metric").loc["hd95_WT"]
    d = {f: np.array(arm[f]) - np.array(base[f]) for f in (0, 1)}
    fold_means = np.array([d[0].mean(), d[1].mean()])
    floor = np.mean([d[f].var(ddof=1) / 4 for f in (0, 1)])
    assert hd["spread"] == pytest.approx(fold_means.std(ddof=1), rel=1e-6) and hd["case_sd"] == pytest.approx(np.sqrt(floor), rel=1e-12)
    t = fold_means.mean() / np.sqrt(floor / 2)
    assert hd["p_value"] == pytest.approx(2 * sps.t.sf(t, 1), rel=1e-9) and hd["p_value"] > 0.1
    assert run_level_test(fold_means[:, None])[3] < 0.001  # what the plain test said
    assert hd["verdict"] == "no evidence of a difference" and hd["family"] == "secondary"
    assert hd["mde"] == pytest.approx(spread_mde(np.sqrt(floor), 2, 0.05 / 2), rel=1e-12)  # the MDE reads the floor too
    half = sps.t.ppf(1 - 0.05 / 4, 1) * np.sqrt(floor / 2)
    assert (hd["ci_low"], hd["ci_high"]) == pytest.approx((fold_means.mean() - half, fold_means.mean() + half), rel=1e-9)
    # Dice is not floored: no case SD, the plain t-test, primary.
    dice = result.set_index("metric").loc["dice_WT"]
    assert np.isnan(dice["case_sd"]) and dice["family"] == "primary" and dice["verdict"] == NO_SPREAD
    text = format_runs(result)
    assert f"{np.sqrt(floor):.2f}*" in text and "secondary: no evidence of a difference" in text
    assert text.endswith("*: HD95's fold means scatter less than their cases alone make them scatter (a near-tie of its penalty "
                         "values,\n373 mm a missed case): the test and the MDE read that case SD instead, never the near-tie.")


def test_case_floor_is_var_over_n_when_all_is_defined_and_the_delta_method_with_undefined_values():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(2, 3, 2, 6))  # (fold, seed, case)
    want = ((b - a).var(axis=-1, ddof=1) / 6).sum(axis=-1) / 4  # two seeds: the fold mean's variance
    assert case_floor(a, b) == pytest.approx(want, rel=1e-12)
    # With undefined values: psi = N/n_b (b - mean_b) - N/n_a (a - mean_a), 0 where undefined, by hand.
    a1, b1 = np.array([1.0, np.nan, 3.0, 5.0]), np.array([2.0, 0.0, np.nan, 4.0])
    psi = np.array([4 / 3 * (2 - 2) - 4 / 3 * (1 - 3), 4 / 3 * (0 - 2), -4 / 3 * (3 - 3), 4 / 3 * (4 - 2) - 4 / 3 * (5 - 3)])
    assert case_floor(a1[None, None], b1[None, None]) == pytest.approx([np.sum(psi**2) / (4 * 3)], rel=1e-12)
    with pytest.raises(ValueError, match=re.escape("per-case scores must have one shape (..., folds, seeds, cases), got (4,) and (4,)")):
        case_floor(a1, b1)
