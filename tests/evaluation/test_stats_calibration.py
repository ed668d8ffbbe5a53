"""Calibration of the verdict's test (`run_level_test`), by simulation with known noise.

A simulated study: 40 cases split into F folds; two arms, each trained once per (fold, seed). A
case's score = a difficulty shared by both arms and every run + a per-run offset (standard
deviation `s_run`, the training noise of a seed) + per-case run noise (0.04) + the arm's effect.
This is the model of issue 10, under which the per-case Wilcoxon test gave 18% to 62% false alarms.

Run as a script to print the table of benchmarks/README.md:
    python tests/evaluation/test_stats_calibration.py
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from brats_lab.evaluation.stats import compare_runs, run_level_test

ALPHA = 0.05
RUN_STDS = (0.0, 0.01, 0.02, 0.04)
FOLDS = (2, 3, 4, 5)
SEEDS = (1, 2, 3)
STUDIES = 4000  # per cell: the false-alarm rate's standard error is then 0.0035, so alpha + 0.02 is ~6 of them
CASES = 40
CASE_NOISE = 0.04


def simulate(rng: np.random.Generator, studies: int, folds: int, seeds: int, s_run: float, effect: float) -> np.ndarray:
    """Per-case scores, shape (study, arm, fold, seed, case): arm 0 is the baseline."""
    per_fold = CASES // folds
    difficulty = rng.normal(0.0, 0.1, size=(studies, 1, folds, 1, per_fold))
    offset = s_run * rng.normal(size=(studies, 2, folds, seeds, 1))
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
