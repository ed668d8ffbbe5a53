"""evaluate_folder end to end, on small cases and predictions written to disk."""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from brats_lab import DataError
from brats_lab.evaluation import EMPTY_HD95, case_metrics, evaluate_folder, format_summary, metric_columns
from brats_lab.io import read_image, write_image
from brats_lab.labels import BRATS_2020, REGIONS

IDS = [f"BraTS20_Training_{i:03d}" for i in range(1, 4)]


def seg_of(root: Path, case_id: str) -> tuple[np.ndarray, object]:
    return read_image(root / case_id / f"{case_id}_seg.nii.gz")


def write_prediction(pred_dir: Path, case_id: str, labels: np.ndarray, geometry, ext: str = ".nii.gz") -> Path:
    path = pred_dir / f"{case_id}{ext}"
    write_image(labels.astype(np.uint8), geometry, path)
    return path


def row(result, case_id: str) -> pd.Series:
    return result.table.set_index("case").loc[case_id]


def test_perfect_predictions(simple_dataset: Path, tmp_path: Path) -> None:
    pred_dir = tmp_path / "pred"
    for case_id in IDS:
        seg, geometry = seg_of(simple_dataset, case_id)
        write_prediction(pred_dir, case_id, seg, geometry, ext=".nii" if case_id.endswith("2") else ".nii.gz")
    result = evaluate_folder(pred_dir, simple_dataset, progress=False)
    assert result.problems == []
    assert list(result.table.columns) == ["case", "status", *metric_columns()]
    assert "dice_ET" in result.table and "hd95_WT" in result.table and "specificity_TC" in result.table
    assert list(result.table["case"]) == IDS
    assert (result.table["status"] == "ok").all()
    for region in REGIONS:
        assert (result.table[f"dice_{region}"] == 1.0).all()
        assert (result.table[f"hd95_{region}"] == 0.0).all()


def test_imperfect_prediction_scored_like_case_metrics(simple_dataset: Path, tmp_path: Path) -> None:
    pred_dir = tmp_path / "pred"
    expected = {}
    for i, case_id in enumerate(IDS):
        seg, geometry = seg_of(simple_dataset, case_id)
        pred = np.roll(seg, i, axis=2)
        pred[pred == 1] = 4 if i == 2 else 1
        write_prediction(pred_dir, case_id, pred, geometry)
        expected[case_id] = case_metrics(pred, seg, geometry.spacing_zyx, BRATS_2020)
    result = evaluate_folder(pred_dir, simple_dataset, progress=False)
    for case_id, metrics in expected.items():
        r = row(result, case_id)
        for region, m in metrics.items():
            for name, value in m.as_dict().items():
                assert r[f"{name}_{region}"] == value


def test_problems_named_and_scored_worst(simple_dataset: Path, tmp_path: Path) -> None:
    pred_dir = tmp_path / "pred"
    seg1, geometry = seg_of(simple_dataset, IDS[0])
    write_prediction(pred_dir, IDS[0], seg1, geometry)  # perfect
    # IDS[1]: no prediction at all.
    seg3, _ = seg_of(simple_dataset, IDS[2])
    write_prediction(pred_dir, IDS[2], seg3, replace(geometry, spacing=(1.0, 1.0, 2.0)))
    write_prediction(pred_dir, "BraTS20_Training_999", seg1, geometry)  # a case the dataset lacks
    (pred_dir / "notes.txt").write_text("not a prediction")  # ignored: not an image

    result = evaluate_folder(pred_dir, simple_dataset, progress=False)

    assert list(result.table["case"]) == IDS
    assert list(result.table["status"]) == ["ok", "missing", "geometry"]
    text = "\n".join(result.problems)
    assert len(result.problems) == 3, text
    assert any(IDS[1] in p and "missing" in p for p in result.problems)
    assert any(IDS[2] in p and "spacing" in p and f"{IDS[2]}.nii.gz" in p for p in result.problems)
    assert any("BraTS20_Training_999.nii.gz" in p for p in result.problems)
    for case_id in IDS[1:]:
        r = row(result, case_id)
        for region in REGIONS:
            assert (r[f"dice_{region}"], r[f"sensitivity_{region}"], r[f"hd95_{region}"]) == (0.0, 0.0, EMPTY_HD95)
    assert EMPTY_HD95 == pytest.approx(373.1287, abs=1e-4)  # no image to measure: the BraTS grid's diagonal
    # The worst-case rows pull the means down; nothing is NaN.
    summary = result.summary()
    assert list(summary.index) == ["mean", "std", "median", "25%", "75%"]
    assert list(summary.columns) == metric_columns()
    assert not summary.isna().any().any()
    assert summary.loc["mean", "dice_WT"] == pytest.approx(1 / 3)
    assert summary.loc["mean", "hd95_WT"] == pytest.approx(2 * EMPTY_HD95 / 3)


def test_unreadable_and_unknown_labels(simple_dataset: Path, tmp_path: Path) -> None:
    pred_dir = tmp_path / "pred"
    pred_dir.mkdir()
    (pred_dir / f"{IDS[0]}.nii.gz").write_bytes(b"not a nifti at all")
    seg, geometry = seg_of(simple_dataset, IDS[1])
    pred = seg.copy()
    pred[seg == 4] = 3  # the 2023 ET label in a 2020 dataset
    write_prediction(pred_dir, IDS[1], pred, geometry)
    seg, geometry = seg_of(simple_dataset, IDS[2])
    write_prediction(pred_dir, IDS[2], seg, geometry)

    result = evaluate_folder(pred_dir, simple_dataset, progress=False)

    assert list(result.table["status"]) == ["unreadable", "labels", "ok"]
    assert any(IDS[0] in p and f"{IDS[0]}.nii.gz" in p for p in result.problems)
    assert any(IDS[1] in p and "[3]" in p for p in result.problems)
    assert row(result, IDS[1])["dice_ET"] == 0.0


def test_one_case_summary_has_no_nan(tmp_path: Path, case_writer) -> None:
    root = tmp_path / "data"
    case_writer(root, IDS[0])
    seg, geometry = seg_of(root, IDS[0])
    empty = np.zeros_like(seg)
    write_prediction(tmp_path / "pred", IDS[0], empty, geometry)
    result = evaluate_folder(tmp_path / "pred", root, progress=False)
    assert result.problems == []
    summary = result.summary()
    assert not summary.isna().any().any()
    assert (summary.loc["std"] == 0.0).all()
    # An empty prediction: HD95 is this image's diagonal in mm (CaPTk's rule), not the BraTS grid's.
    diagonal = math.sqrt(sum((n * s) ** 2 for n, s in zip(seg.shape, geometry.spacing_zyx)))
    assert summary.loc["mean", "hd95_ET"] == pytest.approx(diagonal, rel=1e-12) and diagonal < 100
    assert summary.loc["mean", "sensitivity_WT"] == 0.0


def test_csv_and_formatted_summary(simple_dataset: Path, tmp_path: Path) -> None:
    pred_dir = tmp_path / "pred"
    seg, geometry = seg_of(simple_dataset, IDS[0])
    write_prediction(pred_dir, IDS[0], seg, geometry)
    result = evaluate_folder(pred_dir, simple_dataset, progress=False)

    out = tmp_path / "out" / "metrics.csv"
    result.write_csv(out)
    back = pd.read_csv(out)
    assert list(back.columns) == list(result.table.columns)
    assert list(back["status"]) == ["ok", "missing", "missing"]
    assert [p.name for p in out.parent.iterdir()] == ["metrics.csv"]  # no temporary left behind

    text = format_summary(result)
    for word in ("ET", "TC", "WT", "Dice", "HD95", "Sensitivity", "Specificity", "±", "median [q1, q3]"):
        assert word in text
    assert "1 ok, 2 missing" in text
    assert f"{IDS[1]}: prediction missing" in text
    assert "nan" not in text.lower()
    mean_dice_wt = result.summary().loc["mean", "dice_WT"]
    assert f"{mean_dice_wt:.4f}" in text and math.isclose(mean_dice_wt, 1 / 3)


def test_progress_bar_goes_to_stderr(simple_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "pred").mkdir()
    evaluate_folder(tmp_path / "pred", simple_dataset, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "evaluating" in captured.err


def test_bad_folders(simple_dataset: Path, tmp_path: Path, case_writer) -> None:
    with pytest.raises(DataError, match="prediction folder"):
        evaluate_folder(tmp_path / "nowhere", simple_dataset, progress=False)
    no_seg = tmp_path / "validation"
    case_writer(no_seg, "BraTS20_Validation_001", with_seg=False)
    (tmp_path / "pred").mkdir()
    with pytest.raises(DataError, match="no case has a segmentation"):
        evaluate_folder(tmp_path / "pred", no_seg, progress=False)


# --- `brats-lab evaluate` on 2023 references (the cases of conftest's `valid_inputs`) ------------

CASE_2023, OTHER_2023 = "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"


def test_a_2023_prediction_that_writes_et_as_4_is_refused_not_scored_as_resection_cavity(valid_inputs, run_cli, tmp_path):
    """A perfect 2023 map with ET written as 4 (the 2020 label), scored against 2023 references
    without resection cavity: refused by name (it used to score ET Dice 0 and exit 0); the other
    case, written in 2023 labels, is scored as it should be (perfect)."""
    pred = tmp_path / "pred"
    shutil.copytree(valid_inputs / "pred-data2023", pred)
    name = pred / f"{CASE_2023}.nii.gz"
    array, geometry = read_image(name)
    write_image(np.where(array == 3, 4, array).astype(np.uint8), geometry, name)
    out = tmp_path / "out" / "metrics.csv"
    result = run_cli(["evaluate", "--pred", str(pred), "--gt", str(valid_inputs / "data2023"), "--out", str(out)], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and "Traceback" not in output, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("brats-lab: error:")]
    assert errors and CASE_2023 in errors[-1], output[-3000:]
    assert any(str(name) in line and "follow the brats2020 convention (ET = 4), not the reference's brats2023 (ET = 3; 4 = RC" in line
               for line in output.splitlines()), output[-3000:]
    table = pd.read_csv(out).set_index("case")
    assert table.loc[CASE_2023, "status"] == "labels" and table.loc[CASE_2023, "dice_WT"] == 0.0  # worst-case, not scored
    assert table.loc[OTHER_2023, "status"] == "ok" and table.loc[OTHER_2023, ["dice_ET", "lesion_dice_ET"]].tolist() == [1.0, 1.0]


def test_lesion_wise_rules_fit_2023_data_and_a_2020_map_scored_with_2020_rules_is_not_refused(valid_inputs, run_cli, tmp_path):
    """The controls of the refusal above and of `--rules gli` on 2020 data (tests/test_bad_input.py):
    2023 rules on 2023 data, and a 2020 prediction holding ET = 4 against a 2020 reference, go
    through with perfect scores."""
    for data, rules in (("data2023", "brats2023-gli"), ("data", None)):
        out = tmp_path / data / "metrics.csv"
        argv = ["evaluate", "--pred", str(valid_inputs / f"pred-{data}"), "--gt", str(valid_inputs / data), "--out", str(out)]
        result = run_cli(argv + (["--rules", rules] if rules else []), tmp_path)
        assert result.returncode == 0 and "brats-lab: error" not in result.stderr, result.stderr[-3000:]
        table = pd.read_csv(out)
        assert (table["status"] == "ok").all() and (table["dice_ET"] == 1.0).all()
