"""The ablation report pinned on a per-case table made by hand: Table 3's mean (std) over each arm's
runs (folds and seeds), the seed-spread (noise floor) table, the run-level verdict's numbers with
Holm across the regions of one metric, and the text of report.md.

The table is built from run means chosen by hand: each run's cases scatter symmetrically around its
mean, and fold 0 has three cases where the other folds have two, so a mean over cases is not a mean
over runs. Every expected number is derived from those run means by a second, simple
implementation here (numpy, a hand-written Holm, scipy's one-sample t-test on the fold means,
statsmodels' t-test power), never from the code under test. No training: the report is built
with `summarise` directly, and once through a real MLflow store (`gather`, `Report.log`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats as sps

from brats_lab import DataError, tracking
from brats_lab.ablation.report import data_hash, design_table, plan_text, report, summarise
from brats_lab.data.phantom import synthesize
from brats_lab.ablation.spec import load_ablation
from brats_lab.ablation.study import DEFAULT_STORAGE, Plan
from brats_lab.config import config_hash
from brats_lab.evaluation.stats import format_runs

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

BASE, ARM = "equiunet", "att_equiunet"
REGIONS = ("ET", "TC", "WT")
METRICS = [f"{m}_{r}" for m in ("dice", "hd95") for r in REGIONS]
FOLDS, SEEDS = (0, 1, 2), (0, 1)
CASES = {0: ["BraTS20_Training_001", "BraTS20_Training_002", "BraTS20_Training_003"],
         1: ["BraTS20_Training_004", "BraTS20_Training_005"],
         2: ["BraTS20_Training_006", "BraTS20_Training_007"]}
# How far a run's cases sit from its mean (symmetric, so the run mean is the chosen one).
SPREAD = {"dice": 0.02, "hd95": 1.0}

# The baseline's run means [fold][seed], and the arm's differences from them (arm - baseline).
BASE_MEANS = {
    "dice_ET": [[0.70, 0.72], [0.80, 0.78], [0.75, 0.75]],
    "dice_TC": [[0.60, 0.64], [0.70, 0.66], [0.65, 0.65]],
    "dice_WT": [[0.85, 0.87], [0.90, 0.88], [0.86, 0.86]],
    "hd95_ET": [[10.0, 12.0], [8.0, 9.0], [11.0, 10.0]],
    "hd95_TC": [[6.0, 7.0], [5.0, 5.0], [6.0, 8.0]],
    "hd95_WT": [[4.0, 4.5], [5.0, 5.0], [4.0, 6.0]],
}
DIFFS = {
    "dice_ET": [[0.05, 0.07], [0.04, 0.06], [0.06, 0.06]],  # fold means 0.06, 0.05, 0.06: clear
    "dice_TC": [[0.03, 0.01], [-0.02, 0.00], [0.02, 0.04]],  # fold means 0.02, -0.01, 0.03: noise
    "dice_WT": [[0.01, 0.01], [0.013, 0.011], [0.008, 0.008]],  # fold means 0.010, 0.012, 0.008
    "hd95_ET": [[-2.0, -1.0], [-1.5, -2.5], [-2.0, -2.0]],
    "hd95_TC": [[1.0, 0.0], [0.5, -0.5], [0.0, 1.0]],
    "hd95_WT": [[0.5, 0.3], [-0.2, 0.0], [0.1, 0.1]],
}


def run_means(arm: str, metric: str) -> np.ndarray:
    """The chosen means of `arm`'s runs, shape (folds, seeds)."""
    base = np.array(BASE_MEANS[metric])
    return base if arm == BASE else base + np.array(DIFFS[metric])


def hand_table() -> pd.DataFrame:
    """Per-case rows (arm, fold, seed, case, metrics) whose run means are `run_means`."""
    rows = []
    for arm in (BASE, ARM):
        for fold in FOLDS:
            offsets = [-1.0, 0.0, 1.0] if len(CASES[fold]) == 3 else [-1.0, 1.0]
            for seed in SEEDS:
                for case, k in zip(CASES[fold], offsets):
                    row = {"arm": arm, "fold": fold, "seed": seed, "case": case}
                    for m in METRICS:
                        row[m] = run_means(arm, m)[fold, seed] + k * SPREAD[m.split("_")[0]]
                    rows.append(row)
    return pd.DataFrame(rows)


def hand_holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment written out: the k-th smallest p times (m - k), kept monotone."""
    m = len(p)
    adjusted = [0.0] * m
    running = 0.0
    for k, i in enumerate(sorted(range(m), key=lambda j: p[j])):
        running = max(running, min(1.0, (m - k) * p[i]))
        adjusted[i] = running
    return adjusted


def hand_noise(*groups: np.ndarray) -> float:
    """Pooled seed-to-seed SD: each row (one arm and fold) holds two seeds, whose variance (ddof 1)
    is half their squared difference; pooled as the mean variance over all rows."""
    rows = np.concatenate(groups)
    return math.sqrt(np.mean([(r[0] - r[1]) ** 2 / 2 for r in rows]))


def simulated_power(effect: float, sd: float, nobs: int, alpha: float, studies: int = 200_000) -> float:
    """The share of simulated studies (`nobs` normal values of mean `effect` and SD `sd`) whose
    two-sided one-sample t-test (scipy) rejects at `alpha`: the power, by simulation, independent
    of the noncentral-t solver the report uses (seeded; its standard error is about 0.001)."""
    values = np.random.default_rng(0).normal(effect, sd, size=(studies, nobs))
    return float(np.mean(sps.ttest_1samp(values, 0.0, axis=1).pvalue < alpha))


def expected_verdict() -> dict[str, dict[str, object]]:
    """Per metric column, the verdict's numbers derived without the report code."""
    rows: dict[str, dict[str, object]] = {}
    for family in ("dice", "hd95"):
        cols = [f"{family}_{r}" for r in REGIONS]
        for col in cols:
            base, arm = run_means(BASE, col), run_means(ARM, col)
            fold_means = (arm - base).mean(axis=1)  # seeds averaged within a fold
            test = sps.ttest_1samp(fold_means, 0.0)
            ci = test.confidence_interval(1 - 0.05 / len(cols))  # simultaneous over the regions
            noise = hand_noise(base, arm)
            spread = fold_means.std(ddof=1)  # the MDE's noise: checked by simulation in the test
            rows[col] = {"mean_baseline": base.mean(), "mean_arm": arm.mean(), "mean_diff": fold_means.mean(),
                         "ci_low": ci.low, "ci_high": ci.high, "p_value": test.pvalue, "noise_floor": noise,
                         "spread": spread}
        # Holm within one metric, across its three regions.
        for col, p in zip(cols, hand_holm([rows[c]["p_value"] for c in cols])):
            rows[col]["p_holm"] = p
            mean = rows[col]["mean_diff"]
            if p >= 0.05:
                rows[col]["verdict"] = "no evidence of a difference"
            else:
                better = mean > 0 if family == "dice" else mean < 0
                rows[col]["verdict"] = f"{'better' if better else 'worse'} (p={p:.3f})" if p >= 0.001 else f"{'better' if better else 'worse'} (p<0.001)"
    return rows


@pytest.fixture
def plan(tmp_path: Path, tiny_ablation) -> Plan:
    """A plan of the two-arm tiny ablation with three folds and two seeds (nothing trained)."""
    toml = tmp_path / "tiny.toml"
    toml.write_text(tiny_ablation("tiny-report", "data.folds=3", seeds=2))
    return Plan(load_ablation(toml), "cpu", FOLDS, str(tmp_path / "data"), DEFAULT_STORAGE, seeds=SEEDS)


def test_hand_table_has_the_chosen_run_means_and_unequal_folds():
    # The fixture itself: a mean over cases differs from the mean over runs, so the tests below
    # can tell them apart.
    table = hand_table()
    base = table[table["arm"] == BASE]
    assert base.groupby(["fold", "seed"])["dice_ET"].mean().to_numpy() == pytest.approx(np.ravel(BASE_MEANS["dice_ET"]), abs=1e-12)
    assert abs(base["dice_ET"].mean() - np.mean(BASE_MEANS["dice_ET"])) > 1e-3


def test_table3_is_mean_and_std_over_each_arms_runs_folds_and_seeds(plan):
    result = summarise(plan, hand_table())
    assert list(result.table.index) == [BASE, ARM]
    assert list(result.table.columns) == METRICS
    # By hand: the baseline's six dice_ET run means 0.70 0.72 0.80 0.78 0.75 0.75 have mean 0.75
    # and squared deviations summing to 0.0068, so SD sqrt(0.0068 / 5) = 0.0369.
    assert result.table.loc[BASE, "dice_ET"] == "0.750 (0.037)"
    # hd95_ET: 10 12 8 9 11 10, mean 10, squared deviations 10, SD sqrt(10 / 5) = 1.414.
    assert result.table.loc[BASE, "hd95_ET"] == "10.0 (1.4)"
    for arm in (BASE, ARM):
        for m in METRICS:
            runs = run_means(arm, m).ravel()
            digits = 3 if m.startswith("dice") else 1
            assert result.table.loc[arm, m] == f"{runs.mean():.{digits}f} ({runs.std(ddof=1):.{digits}f})", (arm, m)


def test_table3_of_one_run_per_arm_shows_a_spread_of_zero(plan):
    # One fold, one seed: each arm's mean is its single run's (0.70 and 0.75 for dice_ET, 10 and
    # 8 for hd95_ET), and the SD of one value, undefined (ddof 1), is written as 0.
    table = hand_table()
    one = summarise(dataclasses.replace(plan, folds=(0,), seeds=(0,)), table[(table["fold"] == 0) & (table["seed"] == 0)])
    assert list(one.table["dice_ET"]) == ["0.700 (0.000)", "0.750 (0.000)"]
    assert list(one.table["hd95_ET"]) == ["10.0 (0.0)", "8.0 (0.0)"]


def test_seed_spread_is_the_pooled_seed_to_seed_sd_of_each_arm(plan):
    result = summarise(plan, hand_table())
    assert result.seed_spread is not None
    assert list(result.seed_spread.index) == [BASE, ARM] and list(result.seed_spread.columns) == METRICS
    # By hand: dice_ET seed pairs (0.70, 0.72), (0.80, 0.78), (0.75, 0.75) have variances 0.0002,
    # 0.0002 and 0; their mean 0.000133 is the square of 0.01155.
    assert result.seed_spread.loc[BASE, "dice_ET"] == "0.0115"
    for arm in (BASE, ARM):
        for m in METRICS:
            digits = 4 if m.startswith("dice") else 2
            assert result.seed_spread.loc[arm, m] == f"{hand_noise(run_means(arm, m)):.{digits}f}", (arm, m)


def test_the_verdict_tests_fold_means_with_holm_across_the_regions_of_one_metric(plan):
    result = summarise(plan, hand_table())
    got = result.comparison.set_index("metric")
    assert list(result.comparison["metric"]) == METRICS
    assert set(result.comparison["arm"]) == {ARM}
    assert (got["n"] == 7).all() and (got["folds"] == 3).all() and (got["seeds"] == 2).all()
    expected = expected_verdict()
    for col, want in expected.items():
        for key, value in want.items():
            if key == "verdict":
                assert got.loc[col, key] == value, col
            else:
                assert got.loc[col, key] == pytest.approx(value, rel=1e-9, abs=1e-12), (col, key)
    # The design of the table, read off by hand: dice ET and WT improve clearly, TC is noise; HD95
    # ET drops (better), TC and WT are noise. Holm makes the two dice wins' p larger than raw.
    assert [got.loc[c, "verdict"].split(" (")[0] for c in METRICS] == [
        "better", "no evidence of a difference", "better", "better", "no evidence of a difference", "no evidence of a difference"]
    assert got.loc["dice_ET", "p_holm"] == pytest.approx(3 * got.loc["dice_ET", "p_value"], rel=1e-12)
    # The MDE printed is the power the verdict has: at Holm's first step over the three regions,
    # a true difference of the MDE is found in 80% of studies whose fold means scatter as these.
    for col in ("dice_ET", "hd95_WT"):
        power = simulated_power(got.loc[col, "mde"], got.loc[col, "spread"], len(FOLDS), 0.05 / 3)
        assert 0.79 < power < 0.81, (col, power)


def test_one_seed_reports_no_noise_floor_and_says_so(plan, tmp_path):
    table = hand_table()
    one = dataclasses.replace(plan, seeds=(0,))
    result = summarise(one, table[table["seed"] == 0].reset_index(drop=True))
    assert result.seed_spread is None
    # Table 3 over the three fold runs of seed 0 only.
    runs = np.array(BASE_MEANS["dice_ET"])[:, 0]
    assert result.table.loc[BASE, "dice_ET"] == f"{runs.mean():.3f} ({runs.std(ddof=1):.3f})"
    # No noise floor, but the verdict's MDE from the fold spread of the paired differences.
    assert result.comparison["noise_floor"].isna().all() and np.isfinite(result.comparison["mde"]).all()
    text = result.text()
    assert "Seeds apart" not in text
    assert ("\n\nOne seed: the seed-to-seed noise floor is not measured (--seeds 2 or more measures it); the verdict and its "
            "MDE read the spread of the paired differences between folds.\n\n") in text
    assert "3 folds x 1 seed = 3 training runs per arm, profile cpu; mean (std) over each arm's runs" in text
    # With one seed the fold means are the runs' differences themselves.
    d = (run_means(ARM, "dice_ET") - run_means(BASE, "dice_ET"))[:, 0]
    row = result.comparison.set_index("metric").loc["dice_ET"]
    assert row["p_value"] == pytest.approx(sps.ttest_1samp(d, 0.0).pvalue, rel=1e-9)


def test_the_text_names_the_design_tables_and_verdict(plan):
    result = summarise(plan, hand_table())
    text = result.text()
    assert "3 folds x 2 seeds = 6 training runs per arm" in text
    assert "0.750 (0.037)" in text and "0.0115" in text
    assert "Seeds apart: the seed-to-seed standard deviation of one run's mean" in text
    assert "Holm across the regions of each metric" in text
    assert "over the 7 out-of-fold cases" in text
    # The whole text, in order: the tables (pinned above) and the verdict's table (pinned by the
    # stats tests) between the lines this module writes. The verdict is titled with the baseline.
    assert format_runs(result.comparison).startswith(f"Each arm against {BASE!r}, runs as the unit\n")
    assert "diff [95% CI]" in format_runs(result.comparison)
    assert text == "\n".join([
        "Ablation 'tiny-report': tiny equiunet against att_equiunet",
        "3 folds x 2 seeds = 6 training runs per arm, profile cpu; mean (std) over each arm's runs",
        "", result.table.to_string(), "",
        "Seeds apart: the seed-to-seed standard deviation of one run's mean, same arm and fold (the noise floor)", "",
        result.seed_spread.to_string(), "",
        format_runs(result.comparison), "",
        "The per-case paired differences over the 7 out-of-fold cases describe the cases (comparison_per_case.csv); they are "
        "not the test, since the cases of a run share its training noise."])


def test_with_two_folds_the_text_warns_of_one_degree_of_freedom(plan):
    table = hand_table()
    two = summarise(dataclasses.replace(plan, folds=(0, 1)), table[table["fold"] < 2].reset_index(drop=True))
    note = ("With 2 folds the test has one degree of freedom: it stays calibrated, but sees only differences as large "
            "as the MDE column. More folds buy power fastest (brats-lab ablate NAME --plan).")
    assert "2 folds x 2 seeds = 4 training runs per arm" in two.text() and f"\n\n{note}\n\n" in two.text()
    assert note not in summarise(plan, table).text()  # three folds: no such note


def test_the_text_lists_the_search_and_the_removed_cases_with_the_phantoms_truth(tmp_path, tiny_ablation):
    # A removal ablation: its arm trained without two cases, one of which the phantom corrupted.
    toml = tmp_path / "removal.toml"
    toml.write_text(tiny_ablation("tiny-removal", "data.folds=3", seeds=2)
                    + '\n[removal]\narm = "att_equiunet"\nmetric = "dice_WT"\nfraction = 0.25\n')
    data = tmp_path / "data"
    data.mkdir()
    plan = Plan(load_ablation(toml), "cpu", FOLDS, str(data), DEFAULT_STORAGE,
                excluded=("BraTS20_Training_001", "BraTS20_Training_004"), seeds=SEEDS)
    search = pd.DataFrame({"trial": [1, 0], "train.lr": [3e-4, 1e-4], "dice_WT": [0.9, 0.8]})
    result = dataclasses.replace(summarise(plan, hand_table()), search=search)
    tail = result.text().split("since the cases of a run share its training noise.\n")[1]
    removed = "left out of training in 'att_equiunet' (2): BraTS20_Training_001, BraTS20_Training_004"
    assert tail == "\n".join(["", "search around 'equiunet' (2 trials, Optuna TPE, seed 0), best first:", "",
                              search.to_string(index=False), "", removed])
    # Beside phantoms, phantom.json says which cases were corrupted: here 001 (removed) and 005.
    cases = [{"id": f"BraTS20_Training_00{i}", "corrupted": {"kind": "erased"} if i in (1, 5) else None} for i in range(1, 8)]
    (data / "phantom.json").write_text(json.dumps({"cases": cases}))
    assert result.text().endswith(removed + "\n  of which 1 had deliberately corrupted labels (the dataset has 2 such cases)")


def test_design_table_is_the_t_test_mde_and_the_cost_of_each_design():
    # The MDE of a two-sided one-sample t-test on `folds` fold means at 80% power, at alpha 0.05 / 3
    # (the verdict's Holm over three regions, its first step), whose fold mean differences scatter
    # with SD noise * sqrt(2 / seeds): checked by simulating such studies.
    table = design_table(0.02, 3, [1, 2, 4], seeds=(1, 2))
    assert table.index.name == "folds" and list(table.index) == [1, 2, 4] and list(table.columns) == ["1 seed", "2 seeds"]
    for f in (2, 4):
        for s in (1, 2):
            mde, runs = table.loc[f, f"{s} seed{'s' if s > 1 else ''}"].split(" ", 1)
            assert runs == f"({3 * f * s} runs)"
            assert 0.79 < simulated_power(float(mde), 0.02 * math.sqrt(2 / s), f, 0.05 / 3) < 0.81
    assert list(table.loc[1]) == ["cannot tell (3 runs)", "cannot tell (6 runs)"]  # one fold: no test
    assert list(design_table(0.02, 2, [2]).columns) == ["1 seed", "2 seeds", "3 seeds", "5 seeds", "10 seeds"]


def test_plan_with_a_given_noise_floor_tabulates_two_to_all_folds(plan):
    lines = plan_text(plan, 0.01).split("\n")
    assert lines[0] == ("Plan for 'tiny-report' (2 arms, profile cpu): the smallest true difference a study finds with 80% power "
                        "as the verdict tests (alpha 0.05 with Holm over the 3 regions; no arm-by-fold interaction assumed, so a "
                        "lower bound), and the training runs it costs.")
    assert lines[1:3] == ["noise floor 0.01 (given with --noise)", ""]
    assert "\n".join(lines[3:]) == design_table(0.01, 2, [2, 3]).to_string()  # data.folds=3: designs of 2 and 3 folds


def test_plan_reads_the_newest_finished_multi_seed_study_of_the_profile(plan, tmp_path, monkeypatch):


    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"no noise floor measured for 'tiny-report' with profile cpu in this store"):
        plan_text(plan)

    def study(name: str, seeds: str | None, profile: str = "cpu", comparison: pd.DataFrame | None = None, status: str = "FINISHED"):
        run = tracking.start_run(plan.experiment, name, "study", {"profile": profile, "study": f"{name}-study"})
        run.log_params({"folds": "3"} if seeds is None else {"seeds": seeds, "folds": "3"})
        if comparison is not None:
            run.log_table(comparison, "comparison.csv")
        run.finish(status)
        time.sleep(0.01)  # newest first, by start time
        return run

    # The measured one: two arms' noise floors per metric, pooled as the root mean square:
    # dice_WT sqrt((0.01^2 + 0.07^2) / 2) = 0.05 (their mean would be 0.04), hd95_WT likewise 5.
    # A metric with no noise floor (NaN) is left out.
    measured = study("measured", "2", comparison=pd.DataFrame({
        "arm": ["a", "b", "a", "b", "a", "b"], "metric": ["dice_WT", "dice_WT", "hd95_WT", "hd95_WT", "dice_ET", "dice_ET"],
        "noise_floor": [0.01, 0.07, 1.0, 7.0, np.nan, np.nan]}))
    # Newer ones passed over: one seed (or no seeds parameter); no noise_floor column (an older report); no comparison.csv
    # (stopped before its report); all NaN; another profile; not finished.
    study("one-seed", "1", comparison=pd.DataFrame({"metric": ["dice_WT"], "noise_floor": [0.5]}))
    study("no-seeds-param", None, comparison=pd.DataFrame({"metric": ["dice_WT"], "noise_floor": [0.5]}))  # as one seed
    study("old-format", "2", comparison=pd.DataFrame({"metric": ["dice_WT"], "p_value": [0.5]}))
    study("stopped", "2")
    study("all-nan", "2", comparison=pd.DataFrame({"metric": ["dice_WT"], "noise_floor": [np.nan]}))
    # A floor of 0 (runs that did not move: a tie in every fold) measured nothing; read as one it
    # would plan an MDE of 0 for every design, 2 folds x 1 seed included.
    study("all-zero", "2", comparison=pd.DataFrame({"metric": ["dice_WT", "dice_WT"], "noise_floor": [0.0, 0.0]}))
    study("paper", "3", profile="paper", comparison=pd.DataFrame({"metric": ["dice_WT"], "noise_floor": [0.5]}))
    study("running", "2", comparison=pd.DataFrame({"metric": ["dice_WT"], "noise_floor": [0.5]}), status="FAILED")

    lines = plan_text(plan).split("\n")
    assert lines[1] == f"noise floor per metric measured by study run {measured.id} (measured-study, 3 folds x 2 seeds)"
    dice, hd95 = design_table(0.05, 2, [2, 3]).to_string(), design_table(5.0, 2, [2, 3]).to_string()
    assert "\n".join(lines[2:]) == "\n".join(["", "dice_WT: noise floor 0.05", dice, "", "hd95_WT: noise floor 5", hd95])


def markdown_rows(block: str) -> list[list[str]]:
    lines = block.split("\n")
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines), block
    return [line[2:-2].split(" | ") for line in lines]


def test_gather_reads_every_arm_fold_and_seed_from_mlflow_and_report_md_pins_both_tables(plan, tmp_path, monkeypatch, tiny_shape):
    # A real store holding the finished fold runs a study would leave, each with its
    # per_case_metrics.csv; report() must gather them by config hash, fold and seed.
    monkeypatch.chdir(tmp_path)
    # The data the runs were trained on: a run counts only for the data's current manifest hash.
    synthesize(Path(plan.dataset), cases=2, seed=0, shape=tiny_shape, progress=False)

    with pytest.raises(DataError, match=r"^\(equiunet, fold 0, seed 0\) has no finished run; rerun the ablation to finish it$"):
        report(plan)  # an empty store: the first cell is named
    table = hand_table()
    for arm in (BASE, ARM):
        for seed in SEEDS:
            arm_run = tracking.arm_run(plan.experiment, config_hash(plan.config(arm, seed)), f"{arm}-{seed}", {})
            arm_run.set_tags({"arm": arm, "seed": seed})
            for fold in FOLDS:
                run = tracking.fold_run(arm_run, fold, f"{arm}-{seed}-{fold}")
                run.set_tags({"manifest_hash": data_hash(plan.config(arm, seed))})
                part = table[(table["arm"] == arm) & (table["fold"] == fold) & (table["seed"] == seed)]
                run.log_table(part.drop(columns=["arm", "fold", "seed"]).reset_index(drop=True), "per_case_metrics.csv")
                run.finish()
    # Newer runs of one cell with other numbers must not be read: a failed one, and a finished one
    # of other data (another manifest hash: other cases, content or preprocessing).
    arm_run = tracking.arm_run(plan.experiment, config_hash(plan.config(BASE, 0)), f"{BASE}-0", {})
    bad = table[(table["arm"] == BASE) & (table["fold"] == 0) & (table["seed"] == 0)].drop(columns=["arm", "fold", "seed"])
    for status, data in (("FAILED", data_hash(plan.config(BASE, 0))), ("FINISHED", "0" * 64)):
        other = tracking.fold_run(arm_run, 0, f"other-{status}")
        other.set_tags({"manifest_hash": data})
        other.log_table(bad.assign(dice_ET=0.0).reset_index(drop=True), "per_case_metrics.csv")
        other.finish(status)

    result = report(plan)
    key = ["arm", "fold", "seed", "case"]
    gathered = result.per_case.sort_values(key).reset_index(drop=True)
    assert gathered[key + METRICS].equals(table.sort_values(key).reset_index(drop=True)[key + METRICS])
    assert result.table.loc[BASE, "dice_ET"] == "0.750 (0.037)"

    study = tracking.start_run(plan.experiment, "study", "study")
    # With a hyperparameter search's trials too (search.csv is what `brats-lab review` reads).
    search = pd.DataFrame({"trial": [1, 0], "train.lr": [3e-4, 1e-4], "dice_WT": [0.9, 0.8]})
    result = dataclasses.replace(result, search=search)
    result.log(study)
    md = (study.artifact_dir() / "report.md").read_text()
    table3, comparison = md.rstrip("\n").split("\n\n")
    # Table 3 as markdown, read by hand from the chosen run means (mean (std), ddof 1).
    assert table3 == "\n".join([
        "| arm | dice_ET | dice_TC | dice_WT | hd95_ET | hd95_TC | hd95_WT |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {BASE} | 0.750 (0.037) | 0.650 (0.032) | 0.870 (0.018) | 10.0 (1.4) | 6.2 (1.2) | 4.8 (0.8) |",
        f"| {ARM} | 0.807 (0.034) | 0.663 (0.022) | 0.880 (0.019) | 8.2 (1.7) | 6.5 (1.5) | 4.9 (0.7) |",
    ])
    rows = markdown_rows(comparison)
    assert rows[0] == ["arm", "metric", "n", "folds", "seeds", "mean_baseline", "mean_arm", "mean_diff", "ci_low", "ci_high",
                       "noise_floor", "spread", "mde", "p_value", "p_holm", "verdict", "case_sd", "family"]
    assert rows[1] == ["---"] * 18
    expected = expected_verdict()
    assert [r[1] for r in rows[2:]] == METRICS
    for r in rows[2:]:
        want = expected[r[1]]
        assert r[0] == ARM and r[2:5] == ["7", "3", "2"]
        numbers = dict(zip(rows[0][5:15], r[5:15]))
        mde = result.comparison.set_index("metric").loc[r[1], "mde"]  # checked by simulation above
        for name, cell in numbers.items():  # report.md writes floats with 4 significant digits
            assert cell == f"{float(want[name] if name != 'mde' else mde):.4g}", (r[1], name)
        assert r[15] == want["verdict"]
        # Each run's cases sit at the same offsets in both arms: the paired case differences of a run
        # are equal, so HD95's case floor is 0 (Dice has none); Dice primary, HD95 secondary.
        assert r[16:] == (["nan", "primary"] if r[1].startswith("dice") else ["0", "secondary"])
    assert (study.artifact_dir() / "report.txt").read_text() == result.text() + "\n"
    # The CSV tables beside it, one per part of the report, each readable on its own.
    out = study.artifact_dir()
    assert {p.name for p in out.iterdir()} == {"report.md", "report.txt", "per_case_out_of_fold.csv", "table3.csv",
                                               "comparison.csv", "comparison_per_case.csv", "seed_spread.csv", "search.csv"}
    assert pd.read_csv(out / "search.csv").equals(search)
    csv = {name: pd.read_csv(out / name) for name in ("table3.csv", "seed_spread.csv", "comparison.csv",
                                                       "comparison_per_case.csv", "per_case_out_of_fold.csv")}
    assert list(csv["table3.csv"].columns) == ["arm", *METRICS] and list(csv["table3.csv"]["arm"]) == [BASE, ARM]
    assert csv["table3.csv"].set_index("arm").loc[ARM, "hd95_ET"] == "8.2 (1.7)"
    assert list(csv["seed_spread.csv"].columns) == ["arm", *METRICS]
    assert csv["seed_spread.csv"].set_index("arm").loc[BASE, "dice_ET"] == pytest.approx(0.0115)
    assert list(csv["comparison.csv"]["metric"]) == METRICS
    # No index column in either comparison: the rows of the two metrics are numbered as one table.
    assert list(csv["comparison.csv"].columns) == rows[0]
    assert list(csv["comparison_per_case.csv"].columns) == ["arm", "metric", "n", "mean_baseline", "mean_arm", "mean_diff",
                                                            "ci_low", "ci_high", "p_value", "p_holm", "verdict", "left_out",
                                                            "mean_diff_all_cases"]
    assert csv["comparison.csv"].set_index("metric").loc["dice_ET", "p_value"] == pytest.approx(expected["dice_ET"]["p_value"], rel=1e-9)
    assert list(csv["comparison_per_case.csv"]["metric"]) == METRICS  # the description, per case
    assert len(csv["per_case_out_of_fold.csv"]) == len(table)
    # One row per (arm, fold, seed, case) and no index column: the gathered rows are numbered anew.
    assert sorted(csv["per_case_out_of_fold.csv"].columns) == sorted(["case", *METRICS, "arm", "fold", "seed"])


def test_lesion_wise_table3_and_verdict_average_each_run_over_its_defined_cases(plan):
    # Lesion-wise scoring: a region absent from the reference and the prediction is NaN. Here the
    # baseline leaves case 002's ET undefined while the arm predicts a false-positive lesion there
    # (Dice 0, HD95 373, which must count), and the arm leaves case 005's ET undefined.
    table = hand_table().rename(columns={m: f"lesion_{m}" for m in METRICS})
    et = ["lesion_dice_ET", "lesion_hd95_ET"]
    table.loc[(table["arm"] == BASE) & (table["case"] == "BraTS20_Training_002"), et] = np.nan
    table.loc[(table["arm"] == ARM) & (table["case"] == "BraTS20_Training_002"), et] = [0.0, 373.0]
    table.loc[(table["arm"] == ARM) & (table["case"] == "BraTS20_Training_005"), et] = np.nan
    result = summarise(plan, table)
    assert list(result.table.columns) == [f"lesion_{m}" for m in METRICS]

    def runs(arm: str, col: str) -> np.ndarray:  # (folds, seeds): each run's mean over its defined cases
        out = np.empty((len(FOLDS), len(SEEDS)))
        for f in FOLDS:
            for s in SEEDS:
                values = table.loc[(table["arm"] == arm) & (table["fold"] == f) & (table["seed"] == s), col].to_numpy(dtype=float)
                out[f, s] = np.mean(values[~np.isnan(values)])
        return out

    # By hand: the baseline's fold-0 ET runs skip the middle case (offset 0), so their means stay
    # 0.70 and 0.72; the arm's fold-0 runs average (m - 0.02, 0, m + 0.02) = 2m/3 and its fold-1
    # runs keep only case 004, at m - 0.02.
    assert runs(BASE, "lesion_dice_ET") == pytest.approx(np.array(BASE_MEANS["dice_ET"]), abs=1e-12)
    arm_et = run_means(ARM, "dice_ET")
    assert runs(ARM, "lesion_dice_ET") == pytest.approx(np.vstack([2 * arm_et[0] / 3, arm_et[1] - 0.02, arm_et[2]]), abs=1e-12)
    for arm in (BASE, ARM):
        for col in result.table.columns:
            r = runs(arm, col).ravel()
            digits = 3 if "dice" in col else 1
            assert result.table.loc[arm, col] == f"{r.mean():.{digits}f} ({r.std(ddof=1):.{digits}f})", (arm, col)
    got = result.comparison.set_index("metric")
    for family in ("lesion_dice", "lesion_hd95"):
        cols = [f"{family}_{r}" for r in REGIONS]
        p = [sps.ttest_1samp((runs(ARM, c) - runs(BASE, c)).mean(axis=1), 0.0).pvalue for c in cols]
        assert got.loc[cols, "p_value"].to_numpy() == pytest.approx(p, rel=1e-9)
        assert got.loc[cols, "p_holm"].to_numpy() == pytest.approx(hand_holm(p), rel=1e-9)
    # n: the cases the arm was scored on, its undefined case 005 left out of ET only.
    assert got.loc["lesion_dice_ET", "n"] == 6 and got.loc["lesion_hd95_ET", "n"] == 6 and got.loc["lesion_dice_WT", "n"] == 7
    assert result.text().split("\n")[2] == (
        "Scored lesion-wise (BraTS 2023+ labels, brats-evaluation's gli rules): lesion_dice and lesion_hd95. A region absent "
        "from both the reference and the prediction is undefined (NaN) and left out of that run's mean; an arm's "
        "false-positive lesion there still counts (Dice 0, HD95 373).")
    # The per-case description pairs cases defined in both arms for every region of the metric:
    # 002 and 005 (ET undefined in one arm) leave all three regions' pairs, 5 of 7 cases remain.
    described = result.per_case_comparison.set_index("metric")
    assert (described["n"] == 5).all()
    kept = table[~table["case"].isin(["BraTS20_Training_002", "BraTS20_Training_005"])]
    wt = kept[kept["arm"] == BASE].groupby("case")["lesion_dice_WT"].mean()  # seeds averaged per case
    assert described.loc["lesion_dice_WT", "mean_baseline"] == pytest.approx(wt.mean(), rel=1e-12)
    # Nothing left out quietly: each row counts the 2 cases it left out (002: the arm's false-positive
    # lesion; 005), and gives the mean difference with every case each arm has a value for, as the
    # run means count them: the arm's Dice 0 on 002 is in it.
    assert (described["left_out"] == 2).all()
    by_case = table.groupby(["arm", "case"])[[f"lesion_{m}" for m in METRICS]].mean()  # seeds averaged, NaN skipped
    for col in described.index:
        want = by_case.loc[ARM, col].mean() - by_case.loc[BASE, col].mean()
        assert described.loc[col, "mean_diff_all_cases"] == pytest.approx(want, rel=1e-12, abs=1e-12), col
    et = described.loc["lesion_dice_ET"]
    assert et["mean_diff_all_cases"] < et["mean_diff"] - 0.05  # the penalty moves the description's mean
    assert ("\nIt pairs only the cases with a value in both arms; left out (undefined in one arm, the false-positive lesions "
            "among them, whose penalty the verdict counts), and the mean difference with them counted (mean_diff_all_cases):\n"
            f"  {ARM} lesion_dice_ET: 2 cases left out, mean difference {et['mean_diff']:.4f} without them, "
            f"{et['mean_diff_all_cases']:.4f} with them\n") in result.text()


def test_a_lesion_wise_run_with_no_defined_case_leaves_only_that_region_untested(plan):
    # The arm's fold-1 seed-1 run has ET undefined in both its cases: no mean to compare there. The
    # ET rows say so and why; TC and WT are tested, Holm over those two; the rest of the report stands.
    table = hand_table().rename(columns={m: f"lesion_{m}" for m in METRICS})
    table.loc[(table["arm"] == ARM) & (table["fold"] == 1) & (table["seed"] == 1), ["lesion_dice_ET", "lesion_hd95_ET"]] = np.nan
    result = summarise(plan, table)
    got = result.comparison.set_index("metric")
    for col in ("lesion_dice_ET", "lesion_hd95_ET"):
        assert got.loc[col, "verdict"] == (
            f"undefined: run (att_equiunet, fold 1, seed 1) has no case where {col} is defined (the region is absent from both "
            "the reference and the prediction in every case), so this region is not tested; the others are"), col
        assert np.isnan(got.loc[col, ["mean_diff", "ci_low", "ci_high", "p_value", "p_holm", "mde"]].to_numpy(dtype=float)).all()
    for family in ("lesion_dice", "lesion_hd95"):
        cols = [f"{family}_{r}" for r in ("TC", "WT")]
        p = [sps.ttest_1samp((run_means(ARM, c.removeprefix("lesion_")) - run_means(BASE, c.removeprefix("lesion_"))).mean(axis=1),
                             0.0).pvalue for c in cols]
        assert got.loc[cols, "p_value"].to_numpy(dtype=float) == pytest.approx(p, rel=1e-9)
        assert got.loc[cols, "p_holm"].to_numpy(dtype=float) == pytest.approx(hand_holm(p), rel=1e-9)  # over 2 regions
    assert got.loc["lesion_dice_WT", "verdict"].startswith("better")
    assert result.seed_spread.loc[ARM, "lesion_dice_ET"] == "undefined" and result.seed_spread.loc[BASE, "lesion_dice_ET"] != "undefined"
    text = result.text()
    assert "secondary: undefined: run (att_equiunet, fold 1, seed 1) has no case where lesion_hd95_ET is defined" in text
    assert "  undefined: run (att_equiunet, fold 1, seed 1) has no case where lesion_dice_ET is defined" in text


@pytest.mark.parametrize("short", [ARM, BASE])
def test_a_lesion_wise_run_on_fewer_cases_than_its_pair_is_refused_either_way(plan, short):
    # One run scored on 2 cases where its pair in the other arm was scored on 3 (fold 0, seed 0):
    # refused as on BraTS 2020 data, whichever arm is short, never averaged over other cases.
    for rename in (lambda m: m, lambda m: f"lesion_{m}"):
        table = hand_table().rename(columns={m: rename(m) for m in METRICS})
        gone = (table["arm"] == short) & (table["fold"] == 0) & (table["seed"] == 0) & (table["case"] == "BraTS20_Training_003")
        with pytest.raises(ValueError, match=re.escape("cases must be paired: fold 0, seed 0 has cases ['BraTS20_Training_003'] in "
                                                       f"only one of '{ARM}' and '{BASE}'")):
            summarise(plan, table[~gone].reset_index(drop=True))


def test_the_verdict_lists_the_arms_in_the_per_case_tables_order_lesion_wise_too(tmp_path, tiny_ablation, tiny_training):
    # A third arm, "unet", whose rows come between the baseline's and att_equiunet's: not the
    # alphabetical order. Both scoring rules list the arms as the per-case table has them.
    toml = tmp_path / "three.toml"
    toml.write_text(tiny_ablation("tiny-three", "data.folds=3", seeds=2)
                    + 'unet = ["model.name=unet", ' + ", ".join(f'"{o}"' for o in tiny_training) + "]\n")
    plan = Plan(load_ablation(toml), "cpu", FOLDS, str(tmp_path / "data"), DEFAULT_STORAGE, seeds=SEEDS)
    table = hand_table()
    third = table[table["arm"] == ARM].assign(arm="unet")
    third[METRICS] = third[METRICS] + 0.001
    table = pd.concat([table[table["arm"] == BASE], third, table[table["arm"] == ARM]], ignore_index=True)
    for per_case in (table, table.rename(columns={m: f"lesion_{m}" for m in METRICS})):
        result = summarise(plan, per_case)
        for comparison in (result.comparison, result.per_case_comparison):  # the verdict and the per-case description
            assert list(comparison["arm"]) == ["unet"] * 3 + [ARM] * 3 + ["unet"] * 3 + [ARM] * 3  # per metric: its three regions

