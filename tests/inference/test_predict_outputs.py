"""What `brats-lab predict` writes, checked against a second, simple implementation: the label map is
the written probabilities thresholded at 0.5 and painted by hand, several folds average their
probabilities, and `--small-et` turns a small ET into NCR/NET. Real trained folds, real files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from brats_lab import tracking
from brats_lab.cli import main
from brats_lab.training.trainer import EXPERIMENT

pytestmark = pytest.mark.xdist_group("predict-outputs")  # one worker trains the two folds once

NCR, ED, ET = 1, 2, 4  # BraTS 2020's labels (the phantoms' layout)


# Pipeline B learns enough in 12 steps at a high learning rate to predict all three regions; the
# folds start from different seeds, so that their probabilities differ. (Pipeline A's tiny folds,
# in a few epochs, stay at the heads' "no tumour" prior: 0.02 everywhere, nothing to threshold.)
# After `tiny_network`'s settings.
TRAINING = ["train.epochs=12", "train.amp=off", "optim.lr=3e-2", "train.val_every=12", "train.keep=last"]


@pytest.fixture(scope="module")
def folds(copy_phantoms, tiny_network, tmp_path_factory: pytest.TempPathFactory):
    """Two tiny trained folds of pipeline B: (project folder, dataset, [fold 0 run id, fold 1 run id])."""
    project = tmp_path_factory.mktemp("project")
    dataset = copy_phantoms(project / "phantom")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)  # the store is ./mlruns
        for fold in (0, 1):
            argv = ["train", "--pipeline", "B", "--fold", str(fold), "--profile", "cpu", "--data", str(dataset)]
            for item in [*tiny_network, *TRAINING, f"train.seed={fold + 1}"]:
                argv += ["--set", item]
            assert main(argv) == 0
    runs = {r.tags["fold"]: r.id for r in tracking.find_runs(EXPERIMENT, {"kind": "fold"}, root=project)}
    return project, dataset, [runs["0"], runs["1"]]


@pytest.fixture
def predict(folds, monkeypatch, tmp_path):
    """`brats-lab predict` with these runs and options into a new folder; returns the folder."""
    project, dataset, _ = folds
    monkeypatch.chdir(project)
    made = iter(range(100))

    def run(runs: list[str], *options: str) -> Path:
        out = tmp_path / f"pred{next(made)}"
        argv = ["predict", "--input", str(dataset), "--output", str(out), "--probabilities", *options]
        for run_id in runs:
            argv += ["--run", run_id]
        assert main(argv) == 0
        return out

    return run


def _cases(folder: Path) -> list[str]:
    return sorted(p.name.removesuffix(".nii.gz") for p in folder.glob("*.nii.gz"))


def _labels(folder: Path, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))  # (z, y, x)


def _probabilities(folder: Path, case: str) -> np.ndarray:
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "probabilities" / f"{case}.nii.gz")))
    return np.moveaxis(image, -1, 0)  # (ET, TC, WT, z, y, x)


def _painted(probabilities: np.ndarray) -> np.ndarray:
    """BraTS 2020's label map of region probabilities, by hand: a voxel is in a region when its
    probability is above 0.5; ET wins over TC (NCR/NET), TC over WT (edema)."""
    et, tc, wt = probabilities > 0.5
    return np.where(et, ET, np.where(tc, NCR, np.where(wt, ED, 0))).astype(np.uint8)


def test_the_label_map_is_the_probabilities_thresholded_at_one_half(folds, predict):
    out = predict(folds[2][:1])
    between = 0
    for case in _cases(out):
        probs = _probabilities(out, case)
        np.testing.assert_array_equal(_labels(out, case), _painted(probs), err_msg=case)
        between += int(((probs > 0.5) & (probs <= 0.95)).sum())
    print(f"voxels of a region with a probability in (0.5, 0.95]: {between}")
    assert between > 100  # so another threshold (0.95, say) would paint other labels (measured: 1637)


def test_several_folds_average_their_probabilities(folds, predict):
    runs = folds[2]
    one, other, both = predict(runs[:1]), predict(runs[1:]), predict(runs)
    assert _cases(one) == _cases(other) == _cases(both) and len(_cases(both)) == 4
    for case in _cases(both):
        p, q, mean = _probabilities(one, case), _probabilities(other, case), _probabilities(both, case)
        assert np.abs(p - q).max() > 0.05, "the folds agree: the test would not see which one was used"
        # float32 (p + q) / 2, rounded once, is within one unit in the last place of the exact mean.
        exact = (p.astype(np.float64) + q) / 2
        np.testing.assert_array_max_ulp(mean, exact.astype(np.float32), maxulp=1)
        np.testing.assert_array_equal(_labels(both, case), _painted(mean), err_msg=case)


def test_small_et_turns_a_smaller_et_into_ncr(folds, predict):
    runs = folds[2][:1]
    plain = predict(runs)
    counts = {case: int((_labels(plain, case) == ET).sum()) for case in _cases(plain)}
    print(f"predicted ET voxels per case: {counts}")
    assert any(counts.values()), "no ET predicted: --small-et would have nothing to change"  # measured: 131-196
    threshold = sorted(c for c in counts.values() if c)[0] + 1  # the smallest non-empty ET is below it
    small = predict(runs, "--small-et", str(threshold))
    for case in _cases(plain):
        before, after = _labels(plain, case), _labels(small, case)
        expected = np.where(before == ET, NCR, before) if counts[case] < threshold else before
        np.testing.assert_array_equal(after, expected, err_msg=case)


def _dice_by_hand(prediction: np.ndarray, reference: np.ndarray, labels: tuple[int, ...]) -> float:
    """The Dice of the voxels carrying `labels` in two label maps."""
    return _dice_of_masks(np.isin(prediction, labels), np.isin(reference, labels))


def test_the_trainers_scores_are_those_of_the_predictions_it_writes(folds):
    project, dataset, runs = folds
    regions = {"ET": (ET,), "TC": (NCR, ET), "WT": (NCR, ED, ET)}
    for run_id in runs:
        run = tracking.get_run(run_id, root=project)
        table = pd.read_csv(run.artifact_dir() / "per_case_metrics.csv")
        assert len(table) == 2  # two folds of four cases: two validation cases each
        for row in table.itertuples():
            prediction = _labels(run.artifact_dir() / "predictions", row.case)
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / row.case / f"{row.case}_seg.nii.gz")))
            for region, labels in regions.items():
                assert getattr(row, f"dice_{region}") == pytest.approx(_dice_by_hand(prediction, reference, labels), abs=1e-12), (row.case, region)


def test_the_last_validation_dice_is_that_of_each_region_thresholded_on_its_own(folds, predict):
    """The last epoch's validation (the same weights: no SWA, keep = last) scores each region's
    probability map thresholded on its own, against the segmentation's regions. That is not the
    Dice of the written label map (per_case_metrics.csv): painting ET over TC over WT puts a voxel
    predicted ET but not TC into TC (measured on one fold: validation TC 0.514, label map 0.505;
    ET equal). The probabilities `predict` writes for the fold's model give the expected values."""
    project, dataset, runs = folds
    for run_id in runs:
        run = tracking.get_run(run_id, root=project)
        cases = list(pd.read_csv(run.artifact_dir() / "per_case_metrics.csv")["case"])
        out = predict([run_id], "--precision", "fp32")  # the folds trained and validated with amp off
        dice = {r: [] for r in ("ET", "TC", "WT")}
        for case in cases:
            probabilities = _probabilities(out, case)
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset / case / f"{case}_seg.nii.gz")))
            for channel, (region, labels) in enumerate({"ET": (ET,), "TC": (NCR, ET), "WT": (NCR, ED, ET)}.items()):
                dice[region].append(_dice_of_masks(probabilities[channel] > 0.5, np.isin(reference, labels)))
        last = max(step for step, _ in run.metric_history("val_dice_WT"))
        for region, values in dice.items():
            logged = dict(run.metric_history(f"val_dice_{region}"))[last]
            assert logged == pytest.approx(float(np.mean(values)), abs=1e-12), (run_id, region)


def _dice_of_masks(p: np.ndarray, r: np.ndarray) -> float:
    """2 |P & R| / (|P| + |R|); 1 when both are empty (BraTS)."""
    total = int(p.sum() + r.sum())
    return 1.0 if total == 0 else 2 * int((p & r).sum()) / total


def test_a_folder_of_maps_made_with_other_settings_is_refused_and_small_et_is_recorded(folds, predict, capsys):
    """Maps made without TTA and --small-et: a second `predict` into the folder with --tta or
    another --small-et would skip them and rewrite ensemble.json with settings they were not made
    with; it is refused, the record and maps left as they were; --overwrite remakes them and says
    so in the record. --top 2 with the same run given twice refuses to choose it twice (issue 27
    item 9)."""
    import json

    project, dataset, runs = folds
    out = predict(runs[:1])
    record = out / "ensemble.json"
    assert json.loads(record.read_text())["small_et"] == 0 and json.loads(record.read_text())["tta"] is False
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    base = ["predict", "--input", str(dataset), "--output", str(out), "--run", runs[0]]
    capsys.readouterr()
    for extra, said in ((["--tta"], "not tta=true"), (["--small-et", "50"], "small_et=50")):
        assert main([*base, *extra]) == 1
        err = capsys.readouterr().err
        assert f"brats-lab: error: {record}: the {len(_cases(out))} label map(s) in this folder were made with tta=false" in err
        assert said in err, err
        assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main([*base, "--small-et", "50", "--overwrite"]) == 0
    assert json.loads(record.read_text())["small_et"] == 50
    capsys.readouterr()
    assert main(["predict", "--input", str(dataset), "--output", str(out.parent / "top"), "--run", runs[0], "--run", runs[0],
                 "--top", "2"]) == 1
    err = capsys.readouterr().err
    assert f"--top 2 needs 2 (given more than once, counted once: {runs[0]})" in err, err
    assert not (out.parent / "top").exists()
