import gzip

import numpy as np
import pytest

from brats_lab.cli import main
from brats_lab.data.check import check_dataset
from brats_lab.io import read_image, write_image


def problems_of(root):
    return [str(p) for p in check_dataset(root, progress=False)[1]]


def test_clean_dataset_has_no_problems(simple_dataset, capsys):
    assert problems_of(simple_dataset) == []
    assert main(["data", "check", str(simple_dataset)]) == 0
    assert "3 cases (brats2020 layout): 0 with problems" in capsys.readouterr().out


def rewrite(path, change):
    array, geometry = read_image(path)
    array, geometry = change(array, geometry)
    write_image(array, geometry, path)


def test_every_problem_is_reported_at_once_naming_case_and_file(simple_dataset, capsys):
    c1, c2, c3 = sorted(p for p in simple_dataset.iterdir())
    # case 1: a missing modality, a truncated gzip, NaN voxels
    (c1 / f"{c1.name}_t2.nii.gz").unlink()
    data = (c1 / f"{c1.name}_flair.nii.gz").read_bytes()
    (c1 / f"{c1.name}_flair.nii.gz").write_bytes(data[: len(data) // 2])
    rewrite(c1 / f"{c1.name}_t1ce.nii.gz", lambda a, g: (np.where(a > 520, np.nan, a).astype(np.float32), g))
    # case 2: an all-zero modality, a modality on another grid, a bad label
    rewrite(c2 / f"{c2.name}_t1.nii.gz", lambda a, g: (np.zeros_like(a), g))
    rewrite(c2 / f"{c2.name}_t2.nii.gz", lambda a, g: (a, type(g)(g.size, (1.0, 1.0, 2.0), g.origin, g.direction)))
    rewrite(c2 / f"{c2.name}_seg.nii.gz", lambda a, g: (np.where(a == 1, 3, a).astype(np.uint8), g))
    # case 3: segmentation on another grid, no problem otherwise; plus a garbage image
    rewrite(c3 / f"{c3.name}_seg.nii.gz", lambda a, g: (a, type(g)(g.size, g.spacing, (1.0, 2.0, 3.0), g.direction)))

    problems = problems_of(simple_dataset)
    expected = [
        f"{c1.name}: {c1.name}_t1ce.nii.gz: ",  # NaN
        f"{c1.name}: {c1.name}_t2.nii.gz: missing file",
        f"{c1.name}: {c1.name}_flair.nii.gz: truncated or corrupt gzip",
        f"{c2.name}: {c2.name}_t1.nii.gz: all voxels are zero",
        f"{c2.name}: {c2.name}_t2.nii.gz: geometry differs from t1: spacing (1, 1, 1) vs (1, 1, 2)",
        f"{c2.name}: {c2.name}_seg.nii.gz: labels 3 not allowed by brats2020 (allowed: 0, 1, 2, 4)",
        f"{c3.name}: {c3.name}_seg.nii.gz: geometry differs from the images: origin",
    ]
    assert len(problems) == len(expected), problems
    for line, start in zip(problems, expected):
        assert line.startswith(start), (line, start)
    assert "NaN or infinite voxels" in problems[0]

    assert main(["data", "check", str(simple_dataset)]) == 1
    out = capsys.readouterr().out
    assert "3 cases (brats2020 layout): 3 with problems, 7 problems in all" in out


def test_not_3d_and_unreadable_files(simple_dataset):
    c1 = sorted(simple_dataset.iterdir())[0]
    import SimpleITK as sitk

    sitk.WriteImage(sitk.Image([4, 4], sitk.sitkInt16), str(c1 / f"{c1.name}_t1.nii.gz"))
    with gzip.open(c1 / f"{c1.name}_t2.nii.gz", "wb") as f:
        f.write(b"this is not a NIfTI file")
    problems = problems_of(simple_dataset)
    assert problems[0].startswith(f"{c1.name}: {c1.name}_t1.nii.gz: not 3-D")
    assert problems[1].startswith(f"{c1.name}: {c1.name}_t2.nii.gz: unreadable")
    assert len(problems) == 2


def test_missing_segmentation_when_the_others_have_one(simple_dataset):
    c1 = sorted(simple_dataset.iterdir())[0]
    (c1 / f"{c1.name}_seg.nii.gz").unlink()
    assert problems_of(simple_dataset) == [f"{c1.name}: {c1.name}: no segmentation file (other cases of this dataset have one)"]


def test_not_a_dataset_is_a_clear_error_not_a_traceback(tmp_path, capsys):
    assert main(["data", "check", str(tmp_path / "absent")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("brats-lab: error:") and "absent: not a folder" in err and "Traceback" not in err
