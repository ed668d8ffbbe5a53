import gzip
import shutil

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


# --- every problem's whole line, in the test process -------------------------------------------


def _cases(root):
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_problems_found_while_listing_a_case_come_first_and_the_files_are_still_read(simple_dataset):
    c1, c2, _ = _cases(simple_dataset)
    t1 = c1 / f"{c1.name}_t1.nii.gz"
    shutil.copy(t1, c1 / f"{c1.name}_t1.nii")  # two files for t1
    shutil.copy(c2 / f"{c2.name}_flair.nii.gz", c1)  # another case's file
    (c1 / f"{c1.name}_t2.nii.gz").unlink()
    assert problems_of(simple_dataset) == [
        f"{c1.name}: {c2.name}_flair.nii.gz: a file of case {c2.name} in the folder of case {c1.name}; move it to its own case folder",
        f"{c1.name}: {c1.name}_t1.nii.gz: also {c1.name}_t1.nii: 2 files for t1; keep one",
        f"{c1.name}: {c1.name}_t2.nii.gz: missing file",
    ]


def test_a_case_folder_that_cannot_be_listed_is_one_problem(simple_dataset):
    (simple_dataset / "BraTS20_Training_004").write_text("not a folder")
    assert problems_of(simple_dataset) == [
        "BraTS20_Training_004: BraTS20_Training_004: cannot list the case folder (named like a case folder, but a file)"]


def test_every_difference_every_label_and_every_unreadable_file_is_named(simple_dataset):
    c1, c2, c3 = _cases(simple_dataset)
    rewrite(c1 / f"{c1.name}_t2.nii.gz", lambda a, g: (a, type(g)(g.size, (1.0, 1.0, 2.0), (5.0, 0.0, 0.0), g.direction)))
    rewrite(c1 / f"{c1.name}_seg.nii.gz", lambda a, g: (np.where(a == 1, 3, np.where(a == 2, 5, a)).astype(np.uint8),
                                                         type(g)(g.size, (2.0, 1.0, 1.0), (0.0, 0.0, 7.0), g.direction)))
    (c2 / f"{c2.name}_t1ce.nii.gz").unlink()
    (c2 / f"{c2.name}_t1ce.nii.gz").mkdir()  # a folder where a file should be
    seg = c3 / f"{c3.name}_seg.nii.gz"
    seg.write_bytes(seg.read_bytes()[:-12] + seg.read_bytes()[-8:])  # 4 bytes of the stream gone: its end is damaged
    problems = problems_of(simple_dataset)
    g = read_image(c1 / f"{c1.name}_t1.nii.gz")[1]
    assert problems[:3] == [
        f"{c1.name}: {c1.name}_t2.nii.gz: geometry differs from t1: spacing (1, 1, 1) vs (1, 1, 2); origin "
        f"({g.origin[0]:g}, {g.origin[1]:g}, {g.origin[2]:g}) vs (5, 0, 0)",
        f"{c1.name}: {c1.name}_seg.nii.gz: labels 3, 5 not allowed by brats2020 (allowed: 0, 1, 2, 4)",
        f"{c1.name}: {c1.name}_seg.nii.gz: geometry differs from the images: spacing (1, 1, 1) vs (2, 1, 1); origin "
        f"({g.origin[0]:g}, {g.origin[1]:g}, {g.origin[2]:g}) vs (0, 0, 7)",
    ]
    assert problems[3] == f"{c2.name}: {c2.name}_t1ce.nii.gz: not a file (a folder)"
    assert problems[4].startswith(f"{c3.name}: {c3.name}_seg.nii.gz: truncated or corrupt gzip (") and len(problems) == 5


def test_the_check_verifies_every_gzip_streams_crc(tmp_path, case_writer):
    """A damaged CRC: the length is right and ITK reads the file (of this size, ITK stops before
    the end of the stream), only the CRC of the whole stream tells."""
    c1 = case_writer(tmp_path / "data", size=(64, 64, 48))
    path = c1 / f"{c1.name}_t1.nii.gz"
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the stored CRC
    path.write_bytes(bytes(data))
    read_image(path)  # the quick check of every other read lets it through
    (problem,) = problems_of(tmp_path / "data")
    assert problem.startswith(f"{c1.name}: {c1.name}_t1.nii.gz: truncated or corrupt gzip (CRC check failed"), problem


def test_test_data_without_any_segmentation_has_no_problem(simple_dataset):
    from brats_lab.data.cases import discover
    from brats_lab.data.check import check_case

    for case in _cases(simple_dataset):
        (case / f"{case.name}_seg.nii.gz").unlink()
    assert problems_of(simple_dataset) == []
    assert check_case(discover(simple_dataset)[0]) == []  # a case alone expects no segmentation


def test_the_progress_bar_counts_the_cases_on_stderr(simple_dataset, capsys):
    cases, problems = check_dataset(simple_dataset)
    err = capsys.readouterr().err
    assert len(cases) == 3 and problems == [] and "checking:   0%" in err and "0/3" in err
