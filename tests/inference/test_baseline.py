import numpy as np

from brats_lab.cli import main
from brats_lab.data.cases import discover
from brats_lab.inference.baseline import predict_folder
from brats_lab.io import read_header, read_image


def test_baseline_writes_label_maps_in_each_cases_geometry(phantom_dataset, tmp_path):
    cases = discover(phantom_dataset)
    written, failures = predict_folder(cases, tmp_path, progress=False)
    assert failures == [] and [p.name for p in written] == [f"{c.id}.nii.gz" for c in cases]
    dice = []
    for case, path in zip(cases, written):
        geometry, pixel = read_header(path)
        assert geometry == case.geometry and pixel == "8-bit unsigned integer"
        pred, _ = read_image(path)
        ref, _ = read_image(case.seg)
        assert set(np.unique(pred).tolist()) <= {0, 1, 2, 4}
        wt_pred, wt_ref = pred > 0, ref > 0
        dice.append(2 * (wt_pred & wt_ref).sum() / (wt_pred.sum() + wt_ref.sum()))
    # A floor, not a model: FLAIR-bright voxels must still find most whole tumours.
    assert np.mean(dice) > 0.5, dice


def test_a_failing_case_is_named_and_the_others_go_on(copy_phantoms, tmp_path, capsys):
    data = copy_phantoms(tmp_path / "data")
    bad = sorted(p for p in data.iterdir() if p.is_dir())[1]
    (bad / f"{bad.name}_flair.nii.gz").write_bytes(b"broken")
    assert main(["baseline", "--input", str(data), "--output", str(tmp_path / "pred")]) == 1
    captured = capsys.readouterr()
    assert f"{bad.name}_flair.nii.gz" in captured.err and "wrote 3 label maps" in captured.out
    assert len(list((tmp_path / "pred").glob("*.nii.gz"))) == 3
