"""`brats_lab/review.py`, the review dashboard's data shaping, on a real SQLite MLflow store
(conftest's `review_store`: two ablations, an A/A study with seeds and a plain training)."""

from __future__ import annotations

import pandas as pd
import pytest

from brats_lab import review as db
from brats_lab import run_files, tracking

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")


def _study_id(runs: pd.DataFrame, name: str) -> str:
    return db.studies(runs).set_index("name").loc[name, "run_id"]


def test_studies_lists_ablations_and_trainings_with_progress(in_review_store):
    runs = tracking.read_runs()
    table = db.studies(runs).set_index("name")
    assert set(table.index) == {"attention", "norm", "seeds", "pipeline A"}
    assert (table.loc["seeds", "folds_done"], table.loc["seeds", "folds_planned"]) == (8, 8)  # 2 arms x 2 folds x 2 seeds
    assert table.loc["attention", "type"] == "ablation"
    assert table.loc["attention", "state"] == "FINISHED"
    assert (table.loc["attention", "folds_done"], table.loc["attention", "folds_planned"]) == (4, 4)
    assert (table.loc["norm", "folds_done"], table.loc["norm", "folds_planned"]) == (1, 2)
    assert table.loc["norm", "state"] == "RUNNING"
    assert table.loc["pipeline A", "type"] == "training"
    assert table.loc["pipeline A", "folds_done"] == 1
    assert (table["wall_time"] >= pd.Timedelta(0)).all()


def test_studies_of_an_empty_store_is_empty():
    empty = pd.DataFrame(columns=["run_id", "experiment_id", "experiment", "name", "kind", "parent_run_id", "status",
                                  "start_time", "end_time", "artifact_uri"])
    assert db.studies(empty).empty


def test_fold_runs_and_per_case_of_a_study(in_review_store):
    runs = tracking.read_runs()
    cells = db.fold_runs(runs, _study_id(runs, "attention"))
    assert list(zip(cells["arm"], cells["fold"])) == [("attention", 0), ("attention", 1), ("baseline", 0), ("baseline", 1)]
    assert (cells["status"] == "FINISHED").all()
    per_case, notes = db.load_per_case(cells)
    assert notes == []
    assert len(per_case) == 12 and {"arm", "fold", "run_id", "case", "dice_ET"} <= set(per_case.columns)

    half = db.fold_runs(runs, _study_id(runs, "norm"))
    per_case, notes = db.load_per_case(half)
    assert len(per_case) == 3
    assert notes == ["instance fold 0: running, no metrics yet"]


def test_fold_table_metric_long_and_worst_cases(review_per_case):
    per_case = pd.concat([review_per_case(off, f).assign(arm=arm, fold=f, run_id=f"r{arm}{f}")
                          for arm, off in (("a", 0.0), ("b", 0.1)) for f in range(2)], ignore_index=True)
    table = db.fold_table(per_case)
    assert list(table.columns) == ["ET", "TC", "WT", "folds", "seeds"]
    assert table.loc["a", "ET"] == "0.600 (0.000)"  # fold means 0.9, 0.6, 0.3 -> 0.6 each fold
    assert table.loc["b", "folds"] == 2

    long = db.metric_long(per_case)
    assert len(long) == 3 * len(per_case) and set(long["region"]) == {"ET", "TC", "WT"}
    hd95 = db.metric_long(per_case, "hd95")
    assert hd95["value"].max() == 12.0 and set(hd95["region"]) == {"ET", "TC", "WT"}

    worst = db.worst_cases(per_case, "b", "ET", n=2)
    assert worst["dice_ET"].tolist() == sorted(worst["dice_ET"].tolist())
    assert worst["dice_ET"].iloc[0] == pytest.approx(0.9 - 0.1 - 0.6)
    assert {"fold", "case", "run_id", "hd95_WT"} <= set(worst.columns)
    by_hd95 = db.worst_cases(per_case, "b", "WT", n=3, by="hd95")
    assert by_hd95["hd95_WT"].tolist() == [12.0, 12.0, 7.0]  # the largest distances first


def test_a_study_with_seeds_shows_each_seed_as_its_own_run(in_review_store):
    runs = tracking.read_runs()
    cells = db.fold_runs(runs, _study_id(runs, "seeds"))
    assert list(zip(cells["arm"], cells["seed"], cells["fold"])) == [
        (arm, seed, fold) for arm in ("equiunet", "reseeded") for seed in (0, 1) for fold in (0, 1)]
    fold_seed = {r.id: r.tags["seed"] for r in tracking.find_runs("ablation-seeds", {"kind": "fold"})}
    assert [fold_seed[r] for r in cells["run_id"]] == [str(s) for s in cells["seed"]]  # the fold run's own tag agrees
    per_case, notes = db.load_per_case(cells)
    assert notes == [] and len(per_case) == 24 and set(per_case["seed"]) == {0, 1}
    table = db.fold_table(per_case)
    assert table.loc["equiunet", "folds"] == 2 and table.loc["equiunet", "seeds"] == 2
    marks = db.run_table(per_case)
    assert len(marks) == 2 * 2 * 2 * 3  # one mark per run and region: the seeds are not averaged away
    # equiunet, ET: runs (fold, seed) have means 0.6 and 0.59 (seed 1 is 0.01 lower) in both folds.
    equi = marks[(marks["arm"] == "equiunet") & (marks["region"] == "ET")].sort_values(["fold", "seed"])
    assert [round(v, 10) for v in equi["value"]] == [0.6, 0.59, 0.6, 0.59]
    comparison = db.read_artifact_table(_study_id(runs, "seeds"), run_files.COMPARISON)
    assert {"noise_floor", "mde", "folds", "seeds"} <= set(comparison.columns)
    assert (comparison["verdict"] == "no evidence of a difference").all()


def test_comparison_table(in_review_store):
    runs = tracking.read_runs()
    comparison = db.read_artifact_table(_study_id(runs, "attention"), run_files.COMPARISON)
    assert comparison is not None and comparison["arm"].tolist() == ["attention"]
    assert db.read_artifact_table(_study_id(runs, "norm"), run_files.COMPARISON) is None
    rows = db.comparison_rows(comparison, "dice")
    assert rows[["region", "label"]].values.tolist() == [["ET", "attention ET"]]
    assert db.comparison_rows(comparison, "hd95").empty
