"""Calibration of the verdict's test (`run_level_test`), by simulation with known noise.

A simulated study: 40 cases split into F folds; two arms, each trained once per (fold, seed). A
case's score = a difficulty shared by both arms and every run + a per-run offset (standard
deviation `s_run`, the training noise of a seed) + per-case run noise (0.04) + the arm's effect.
This is the model of issue 10, under which the per-case Wilcoxon test gave 18% to 62% false alarms.

Part of a run's offset comes with its seed (initial weights, patch order, augmentation): runs
that train with the same seed share it (`carry`, the fraction of the offset's variance). Which
runs do is read from the code (`TrainConfig.run_seed`), not assumed: each fold run has its own
seed, so the share is independent across folds and calibration holds; with seed k the same in
every fold (`train.seed + k`, before issue 22) it is not.

Run as a script to print the table of benchmarks/README.md:
    python tests/evaluation/test_stats_calibration.py
"""

from __future__ import annotations

import numpy as np
import pytest
import pandas as pd

from brats_lab.config import TrainConfig
from brats_lab.evaluation.metrics import EMPTY_HD95
from brats_lab.evaluation.stats import case_floor, compare_runs, holm, minimum_detectable_effect, run_level_test

ALPHA = 0.05
RUN_STDS = (0.0, 0.01, 0.02, 0.04)
FOLDS = (2, 3, 4, 5)
SEEDS = (1, 2, 3)
STUDIES = 4000  # per cell: the false-alarm rate's standard error is then 0.0035, so alpha + 0.02 is ~6 of them
CASES = 40
CASE_NOISE = 0.04


def run_seeds(folds: int, seeds: int) -> np.ndarray:
    """The seed each run trains with, shape (arm, fold, seed): both arms at pipeline A's train.seed."""
    grid = [[TrainConfig(seed_index=k).run_seed(f) for k in range(seeds)] for f in range(folds)]
    return np.array([grid, grid])


def old_run_seeds(folds: int, seeds: int) -> np.ndarray:
    """The seeds before issue 22: train.seed + k, in every fold."""
    return np.broadcast_to(TrainConfig().seed + np.arange(seeds), (2, folds, seeds))


def seed_luck(rng: np.random.Generator, studies: int, seeds: np.ndarray) -> np.ndarray:
    """The share of each run's offset that comes with its seed, shape (study, arm, fold, seed):
    one standard normal draw per (study, arm, distinct seed), so that the runs of an arm that
    train with the same seed share it. Each arm draws its own: the cautious case, in which the
    seed two arms share brings their paired difference no gain."""
    distinct, index = np.unique(seeds, return_inverse=True)
    draws = rng.normal(size=(studies, 2, distinct.size))
    return draws[:, np.arange(2)[:, None, None], index.reshape(seeds.shape)]


def simulate(rng: np.random.Generator, studies: int, folds: int, seeds: int, s_run: float, effect: float,
             carry: float = 0.0, seeds_of=run_seeds) -> np.ndarray:
    """Per-case scores, shape (study, arm, fold, seed, case): arm 0 is the baseline. A fraction
    `carry` of the run offset's variance comes with the run's seed (`seeds_of(folds, seeds)`)."""
    per_fold = CASES // folds
    difficulty = rng.normal(0.0, 0.1, size=(studies, 1, folds, 1, per_fold))
    own = rng.normal(size=(studies, 2, folds, seeds))
    luck = seed_luck(rng, studies, seeds_of(folds, seeds)) if carry else 0.0
    offset = s_run * (np.sqrt(1 - carry) * own + np.sqrt(carry) * luck)[..., None]
    noise = CASE_NOISE * rng.normal(size=(studies, 2, folds, seeds, per_fold))
    arm_effect = np.array([0.0, effect]).reshape(1, 2, 1, 1, 1)
    return 0.8 + difficulty + offset + noise + arm_effect


def run_sd(folds: int, s_run: float) -> float:
    """The standard deviation of one run's mean score between seeds: what the noise floor measures."""
    return float(np.sqrt(s_run**2 + CASE_NOISE**2 / (CASES // folds)))


def verdict_rate(scores: np.ndarray) -> float:
    """How often the test says "better" or "worse" (p < alpha; one region, so Holm changes nothing)."""
    means = scores.mean(axis=-1)  # run means: (study, arm, fold, seed)
    p = run_level_test(means[:, 1] - means[:, 0])[3]
    return float((p < ALPHA).mean())


def calibration_table(seed: int = 0) -> pd.DataFrame:
    """One row per (s_run, folds, seeds): the false-alarm rate under no effect, and the power for
    an effect of two run standard deviations."""
    rng = np.random.default_rng(seed)
    rows = []
    for s_run in RUN_STDS:
        for folds in FOLDS:
            for seeds in SEEDS:
                null = verdict_rate(simulate(rng, STUDIES, folds, seeds, s_run, 0.0))
                power = verdict_rate(simulate(rng, STUDIES, folds, seeds, s_run, 2 * run_sd(folds, s_run)))
                rows.append({"s_run": s_run, "folds": folds, "seeds": seeds, "false_alarms": null, "power": power})
    return pd.DataFrame(rows)


def test_false_alarms_stay_within_alpha_in_every_cell_and_power_reaches_80_percent():
    table = calibration_table()
    assert len(table) == len(RUN_STDS) * len(FOLDS) * len(SEEDS)
    worst = table.loc[table["false_alarms"].idxmax()]
    assert (table["false_alarms"] <= ALPHA + 0.02).all(), f"false alarms above alpha + 0.02:\n{table[table['false_alarms'] > ALPHA + 0.02]}"
    assert worst["false_alarms"] > 0.02  # the test does say "different" sometimes: not calibrated by never answering
    design = table[(table["folds"] == 5) & (table["seeds"] == 3)]
    assert (design["power"] >= 0.8).all(), design


def test_the_share_of_run_noise_a_seed_carries_is_independent_across_folds_so_calibration_holds():
    # A quarter or half of the run variance comes with the seed. Each fold trains with its own
    # seed, so the folds stay independent replicates: false alarms within alpha + 0.02 in every
    # cell. Had seed k been the same in every fold, its share would repeat in every fold and the
    # t-test over the folds would read it as an effect (issue 22: 8% to 22% with half).
    rng = np.random.default_rng(3)
    for carry in (0.25, 0.5):
        for folds in (2, 3, 5):
            for seeds in (1, 2, 3):
                assert len(np.unique(run_seeds(folds, seeds)[0])) == folds * seeds
                null = verdict_rate(simulate(rng, STUDIES, folds, seeds, 0.04, 0.0, carry))
                assert null <= ALPHA + 0.02, (carry, folds, seeds, null)
    old = verdict_rate(simulate(rng, STUDIES, 5, 1, 0.04, 0.0, 0.5, seeds_of=old_run_seeds))
    assert old > ALPHA + 0.05, old  # the model does see the old scheme's carry-over


def hd95_studies(rng: np.random.Generator, studies: int, folds: int, seeds: int, cases: int = 8, miss: float = 0.1) -> np.ndarray:
    """Per-case HD95 of A/A studies, shape (study, arm, fold, seed, case): every case found is at
    the same distance (2 mm) in every run, and each run misses a case with probability `miss`,
    which scores the 373.13 mm penalty. So a run difference is a whole number of penalties over the
    fold's cases, and folds tie often (one more miss on the same side in each)."""
    missed = rng.random(size=(studies, 2, folds, seeds, cases)) < miss
    return np.where(missed, 373.13, 2.0)


@pytest.mark.parametrize("folds, seeds", [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_hd95_penalties_tie_folds_and_a_tie_is_no_false_alarm(folds, seeds):
    # Issue 22: at 8 cases per fold a tie between folds (a zero spread) is common; read as p = 0 it
    # gave 11.7% false alarms at 2 folds x 2 seeds. A tie is "cannot tell" (p = 1) now.
    rng = np.random.default_rng(10 + 10 * folds + seeds)
    means = hd95_studies(rng, STUDIES, folds, seeds).mean(axis=-1)
    d = means[:, 1] - means[:, 0]
    fold_means = d.mean(axis=-1)
    ties = np.mean(np.isclose(fold_means.max(axis=-1), fold_means.min(axis=-1), rtol=0, atol=1e-9) & (np.abs(fold_means[:, 0]) > 1))
    if folds == 2:
        assert ties > 0.02  # the case the fix is for does happen in this model (about 3% to 6%)
    p = run_level_test(d)[3]
    assert np.mean(p < ALPHA) <= ALPHA + 0.02


def hd95_regions(rng: np.random.Generator, studies: int, folds: int, seeds: int, extra_miss: float = 0.0,
                 cases: int = 8) -> np.ndarray:
    """Per-case HD95 of three regions, shape (study, region, arm, fold, seed, case): a case found
    scores 2 mm plus an exponential 1 mm plus its run's offset (SD 0.5 mm), so no two runs tie
    exactly; a case missed (ET 15%, TC 10%, WT 5%; the arm `extra_miss` more) scores the BraTS
    grid's penalty. A fold mean of paired differences is then a whole number of penalties over 8
    cases (46.6 mm) plus a few mm: two or three folds land on the same number often, a near-tie."""
    shape = (studies, 3, 2, folds, seeds, cases)
    miss = np.array([0.15, 0.10, 0.05]).reshape(1, 3, 1, 1, 1, 1) + np.array([0.0, extra_miss]).reshape(1, 1, 2, 1, 1, 1)
    found = 2.0 + rng.standard_exponential(shape) + rng.normal(0.0, 0.5, size=(studies, 3, 2, folds, seeds, 1))
    return np.where(rng.random(shape) < miss, EMPTY_HD95, found)


def holm_rejects(p: np.ndarray, alpha: float = ALPHA) -> np.ndarray:
    """Holm's step-down over the last axis (the regions), vectorised: which regions it calls different."""
    order = np.argsort(p, axis=-1, kind="stable")
    ranked = np.take_along_axis(p, order, axis=-1)
    m = p.shape[-1]
    passed = np.logical_and.accumulate(ranked < alpha / (m - np.arange(m)), axis=-1)
    out = np.empty_like(passed)
    np.put_along_axis(out, order, passed, axis=-1)
    return out


def test_holm_rejects_is_the_adjusted_p_below_alpha():
    p = np.random.default_rng(4).uniform(0, 0.06, size=(500, 3))
    assert (holm_rejects(p) == (np.array([holm(row) for row in p]) < ALPHA)).all()


@pytest.mark.parametrize("folds, seeds", [(2, 1), (2, 2), (3, 1), (3, 2)])
def test_hd95_near_ties_are_no_false_alarm_at_its_family_level(folds, seeds):
    # Issue 22: HD95's penalties make fold means nearly equal (a spread of a few mm against a mean
    # of 46 mm), and the t-test with 1 or 2 degrees of freedom read that as certainty: measured here
    # 11% to 12% per region at 2 folds, and 28% to 29% for HD95's Holm family of three regions. The
    # verdict floors HD95's spread at what its cases alone give (`case_floor`): within alpha + 0.02
    # at the family level, per region too.
    rng = np.random.default_rng(100 + 10 * folds + seeds)
    scores = hd95_regions(rng, STUDIES, folds, seeds)
    base, arm = scores[:, :, 0], scores[:, :, 1]
    d = arm.mean(axis=-1) - base.mean(axis=-1)  # (study, region, fold, seed)
    _, low, high, p = run_level_test(d, floor=case_floor(base, arm))
    assert holm_rejects(p).any(axis=-1).mean() <= ALPHA + 0.02
    assert (p > 0).all() and (high - low > 0).all()  # no p = 0 and no zero-width interval, ties (infinite) included
    assert (p < ALPHA).mean(axis=0).max() <= ALPHA + 0.02
    if folds == 2:  # the model does make the near-ties the floor is for: without it, false alarms
        plain = run_level_test(d)[3]
        assert holm_rejects(plain).any(axis=-1).mean() > ALPHA + 0.1


def test_hd95_still_finds_a_large_difference_at_five_folds():
    # The floor's price: HD95 at 8 cases per fold is read at its cases' spread. An arm that misses
    # 40% more ET cases (Holm's first step over three regions) is still found in most 5 x 3 studies.
    rng = np.random.default_rng(9)
    scores = hd95_regions(rng, 1000, 5, 3, extra_miss=0.4)
    base, arm = scores[:, :, 0], scores[:, :, 1]
    p = run_level_test(arm.mean(axis=-1) - base.mean(axis=-1), floor=case_floor(base, arm))[3]
    assert holm_rejects(p)[:, 0].mean() > 0.5


def dice_regions(rng: np.random.Generator, studies: int, folds: int, seeds: int, s_run: float, effect: np.ndarray,
                 carry: float = 0.0) -> np.ndarray:
    """Per-case Dice of the three regions, shape (study, region, arm, fold, seed, case): `simulate`'s
    model per region, its run offsets and case noise correlated 0.5 between the regions (a run that
    does well on WT tends to on TC), the arm's `effect` per region."""
    one = [simulate(rng, studies, folds, seeds, s_run, 0.0, carry) for _ in range(4)]  # a shared part and one per region
    shared = one[3]
    regions = np.stack([np.sqrt(0.5) * (shared - 0.8) + np.sqrt(0.5) * (r - 0.8) + 0.8 for r in one[:3]], axis=1)
    return regions + np.asarray(effect, dtype=float).reshape(1, 3, 1, 1, 1, 1) * np.array([0.0, 1.0]).reshape(1, 1, 2, 1, 1, 1)


def dice_p(scores: np.ndarray) -> np.ndarray:
    """The verdict's p-values of each region, shape (study, region): Dice is not floored."""
    means = scores.mean(axis=-1)
    return run_level_test(means[:, :, 1] - means[:, :, 0])[3]


def test_the_promised_family_dice_three_regions_with_holm_is_calibrated():
    # What the footnote promises: Dice's three regions together wrong at most alpha under no
    # difference (Holm), here within alpha + 0.02 in every design, with and without seed carry-over.
    rng = np.random.default_rng(11)
    rates = []
    for folds, seeds in ((2, 1), (2, 2), (3, 1), (3, 2), (5, 1), (5, 3)):
        for s_run, carry in ((0.0, 0.0), (0.02, 0.0), (0.02, 0.5)):
            rate = holm_rejects(dice_p(dice_regions(rng, STUDIES, folds, seeds, s_run, np.zeros(3), carry))).any(axis=-1).mean()
            assert rate <= ALPHA + 0.02, (folds, seeds, s_run, carry, rate)
            rates.append(rate)
    assert max(rates) > 0.02  # calibrated by answering, not by never answering


@pytest.mark.parametrize("folds, seeds", [(3, 2), (5, 1), (5, 3)])
def test_the_planned_mde_is_found_as_often_as_promised(folds, seeds):
    # --plan's MDE (minimum_detectable_effect at the run SD the noise floor measures, Holm's first
    # step over three regions): a true difference of that size in one region, none in the others,
    # is found by the verdict as printed (Holm over the three regions) in 75% to 85% of studies.
    rng = np.random.default_rng(20 + folds + seeds)
    mde = minimum_detectable_effect(run_sd(folds, 0.02), folds, seeds, alpha=ALPHA / 3)
    found = holm_rejects(dice_p(dice_regions(rng, STUDIES, folds, seeds, 0.02, np.array([mde, 0.0, 0.0]))))[:, 0].mean()
    assert 0.75 <= found <= 0.85, found


def test_an_arm_by_fold_interaction_and_lesionwise_nan_keep_the_verdict_calibrated():
    # The arm helps on some folds and hurts on others (mean 0): the fold spread the test reads
    # includes that, so it is no false alarm. And lesion-wise NaN (regions absent from both maps)
    # dropped per run before the run means, as the report does, changes nothing.
    rng = np.random.default_rng(7)
    scores = simulate(rng, STUDIES, 5, 1, 0.02, 0.0)
    scores[:, 1] += rng.normal(0.0, 0.03, size=(STUDIES, 5, 1, 1))  # arm x fold interaction, mean 0
    undefined = rng.random(size=scores.shape) < 0.15
    means = np.nanmean(np.where(undefined, np.nan, scores), axis=-1)
    p = run_level_test(means[:, 1] - means[:, 0])[3]
    assert np.mean(p < ALPHA) <= ALPHA + 0.02


def test_two_folds_one_seed_is_calibrated_but_rarely_sees_two_run_sds():
    # One degree of freedom (critical t 12.7): an effect of two run SDs is found in about one
    # study in eight (measured 12%), hence the honest answer there is usually "cannot tell".
    rng = np.random.default_rng(1)
    power = verdict_rate(simulate(rng, STUDIES, 2, 1, 0.02, 2 * run_sd(2, 0.02)))
    assert power < 0.3


def test_compare_runs_gives_the_simulated_studies_the_same_p_values():
    # The vectorised core is what the calibration measured; the report's path must be the same test.
    rng = np.random.default_rng(2)
    scores = simulate(rng, 5, 3, 2, 0.02, 0.01)
    means = scores.mean(axis=-1)
    expected = run_level_test(means[:, 1] - means[:, 0])[3]
    for study in range(5):
        rows = [{"arm": arm, "fold": f, "seed": s, "case": f"c{f}-{i}", "dice_WT": scores[study, a, f, s, i]}
                for a, arm in enumerate(("base", "other")) for f in range(3) for s in range(2) for i in range(scores.shape[-1])]
        result = compare_runs(pd.DataFrame(rows), "base", ["dice_WT"])
        assert abs(result["p_value"].iloc[0] - expected[study]) < 1e-9


def markdown(table: pd.DataFrame) -> str:
    """Rows: folds x seeds; columns: run-to-run SD; cells: false alarms / power."""
    out = ["| folds x seeds | " + " | ".join(f"run SD {s:.2f}" for s in RUN_STDS) + " |", "|---" * (1 + len(RUN_STDS)) + "|"]
    for (folds, seeds), part in table.groupby(["folds", "seeds"]):
        cells = [f"{100 * r.false_alarms:.1f}% / {100 * r.power:.0f}%" for r in part.sort_values("s_run").itertuples()]
        out.append(f"| {folds} x {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    print(f"false alarms (no true difference) / power (true difference of two run SDs); {STUDIES} studies per cell, alpha {ALPHA}")
    print(markdown(calibration_table()))
