"""An ablation on 2023-layout phantoms (`brats-lab data synth --layout 2023`) is scored with the
rules of its data: lesion-wise Dice and HD95 from training's held-out scoring up to Table 3, the
run-level verdict and the dashboard."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brats_lab import review as db
from brats_lab import tracking
from brats_lab.ablation.report import _compare_runs
from brats_lab.ablation.study import DEFAULT_STORAGE, make_plan, run_study
from brats_lab.cli import main
from brats_lab.data.cases import discover
from brats_lab.evaluation.evaluate import evaluate_folder
from brats_lab.io import read_image

pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy:DeprecationWarning")

APP = Path(__file__).resolve().parents[2] / "dashboard" / "app.py"
LESION = [f"lesion_{m}_{r}" for m in ("dice", "hd95") for r in ("ET", "TC", "WT")]


def test_run_level_verdict_skips_undefined_lesion_values_per_run_but_keeps_the_other_arms_penalty():
    # Fold 0, case c2: the region is absent from the reference; the baseline predicts nothing there
    # (NaN, nothing to score), the arm predicts a false-positive lesion (Dice 0).
    nan = math.nan
    per_case = pd.DataFrame({
        "arm": ["base"] * 4 + ["arm"] * 4, "fold": [0, 0, 1, 1] * 2, "seed": 0, "case": ["c1", "c2", "c3", "c4"] * 2,
        "lesion_dice_ET": [0.8, nan, 0.6, 0.4, 0.7, 0.0, 0.5, 0.3],
    })
    row = _compare_runs(per_case, "base", ["lesion_dice_ET"], lesionwise=True).iloc[0]
    # Run means over the defined cases: base 0.8 and 0.5, arm 0.35 and 0.4.
    assert row["mean_baseline"] == pytest.approx(0.65, abs=1e-12)
    assert row["mean_arm"] == pytest.approx(0.375, abs=1e-12)
    assert row["mean_diff"] == pytest.approx(-0.275, abs=1e-12)
    assert row["n"] == 4  # the arm is scored on every case
    # The BraTS 2020 path still refuses NaN, as stats.py does on purpose.
    with pytest.raises(ValueError, match="NaN"):
        _compare_runs(per_case.rename(columns={"lesion_dice_ET": "dice_ET"}), "base", ["dice_ET"], lesionwise=False)


def test_worst_cases_rank_lesion_wise_with_undefined_cases_last():
    per_case = pd.DataFrame({"arm": "a", "fold": 0, "case": ["c1", "c2", "c3"], "dice_ET": [0.9, 0.5, 1.0],
                             "lesion_dice_ET": [0.9, 0.2, math.nan], "lesion_hd95_ET": [3.0, 373.0, math.nan]})
    assert db.ranking_metrics(per_case) == ("lesion_dice", "lesion_hd95")
    assert db.ranking_metrics(per_case.drop(columns=["lesion_dice_ET", "lesion_hd95_ET"])) == ("dice", "hd95")
    assert db.worst_cases(per_case, "a", "ET", by="lesion_dice")["case"].tolist() == ["c2", "c1", "c3"]
    assert db.worst_cases(per_case, "a", "ET", by="lesion_hd95")["case"].tolist() == ["c2", "c1", "c3"]
    assert list(db.worst_cases(per_case, "a", "ET"))[:4] == ["fold", "case", "lesion_dice_ET", "lesion_hd95_ET"]


def test_an_ablation_on_2023_phantoms_reports_lesion_wise_table3_verdicts_and_dashboard(tmp_path, monkeypatch, tiny_ablation, tiny_shape):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "phantom23"
    assert main(["data", "synth", "--out", str(data), "--cases", "4", "--seed", "0", "--layout", "2023",
                 "--shape", *map(str, tiny_shape), "--no-et-fraction", "0.4"]) == 0
    (tmp_path / "tiny.toml").write_text(tiny_ablation())
    plan = make_plan(str(tmp_path / "tiny.toml"), "cpu", None, str(data), DEFAULT_STORAGE)
    result = run_study(plan, progress=False)

    # Training's held-out scoring wrote the lesion-wise columns, equal to what `brats-lab evaluate`
    # computes from the predictions the run saved (NaN in the same places).
    runs = tracking.find_runs(plan.experiment, {"kind": "fold"})
    assert len(runs) == 4
    present = {}  # (arm, case, region) -> region in the reference or the prediction
    refs = {c.id: read_image(c.seg)[0] for c in discover(data)}
    arm_of = {a.id: a.tags["arm"] for a in tracking.find_runs(plan.experiment, {"kind": "arm"})}
    for run in runs:
        logged = pd.read_csv(run.artifact_dir() / "per_case_metrics.csv").set_index("case")
        assert set(LESION) <= set(logged.columns)
        scored = evaluate_folder(run.artifact_dir() / "predictions", data, progress=False).table.set_index("case")
        scored = scored.loc[logged.index, LESION]
        assert np.array_equal(logged[LESION].to_numpy(), scored.to_numpy(), equal_nan=True)
        for case in logged.index:
            pred = read_image(run.artifact_dir() / "predictions" / f"{case}.nii.gz")[0]
            for region, labels in (("ET", (3,)), ("TC", (1, 3)), ("WT", (1, 2, 3))):
                present[(arm_of[run.parent_id], case, region)] = bool(np.isin(refs[case], labels).any() or np.isin(pred, labels).any())
    # Case 2 (seed 0, --no-et-fraction 0.4) has no enhancing tumour: the NaN path is exercised.
    assert not all(present.values())

    # Table 3 and the verdict compare lesion-wise Dice and HD95 (Holm within each metric).
    assert list(result.table.columns) == LESION
    assert set(result.comparison["metric"]) == set(LESION)
    assert result.comparison["verdict"].str.len().gt(0).all()
    for row in result.comparison.itertuples():
        region = row.metric.rsplit("_", 1)[1]
        assert row.n == sum(present[(row.arm, case, region)] for case in refs), row.metric
        # The baseline's mean: the runs' means over their defined cases, recomputed from the runs.
        base = result.per_case[result.per_case["arm"] == "equiunet"]
        expected = np.mean([np.nanmean(part[row.metric]) for _, part in base.groupby(["fold", "seed"])])
        assert row.mean_baseline == pytest.approx(expected, abs=1e-9)
    text = result.text()
    assert "Scored lesion-wise" in text and "lesion_dice_ET" in text and "lesion_hd95_WT" in text
    study_run = tracking.find_runs(plan.experiment, {"kind": "study"})[0]
    assert set(pd.read_csv(study_run.artifact_dir() / "comparison.csv")["metric"]) == set(LESION)

    # The dashboard offers the lesion-wise metrics first and draws the lesion-wise Table 3 and verdict.
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=30).run()
    assert not at.exception, at.exception
    at.sidebar.radio[0].set_value("Compare")
    at.sidebar.selectbox[0].select(study_run.id)
    at.run()
    assert not at.exception, at.exception
    assert [c.value for c in at.caption][:2] == ["lesion-wise Dice (0-1, higher is better)", "lesion-wise HD95 (mm, lower is better)"]
    metric = next(r for r in at.radio if r.label == "Metric")
    assert metric.value == "lesion_dice" and "lesion" in str(metric.options[0]).lower()
    at.sidebar.radio[0].set_value("Cases")
    at.run()
    assert not at.exception, at.exception
    worst = at.dataframe[0].value
    assert list(worst.columns)[2:8] == LESION
