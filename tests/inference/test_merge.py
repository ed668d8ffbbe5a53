"""The second pass (A's map, B's say on edema) and the small-ET rule, for each label convention."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import numpy as np
import pytest

from brats_lab import DataError
from brats_lab.cli import main
from brats_lab.inference.merge import Tissues, merge_folders, merge_label_maps, small_et_to_ncr
from brats_lab.io import BRATS_ORIGIN, IDENTITY, Geometry, read_header, read_image, write_image
from brats_lab.labels import BRATS_2020, BRATS_2023, LabelConvention

CONVENTIONS = [BRATS_2020, BRATS_2023]
TISSUES = ("background", "edema", "ncr", "et")


def _expected(a: str, b: str) -> str:
    """The paper's rule, written once more as plainly as possible, on tissue names."""
    if a == "background" and b == "edema":
        return "edema"
    if a == "edema" and b == "background":
        return "background"
    return a


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name)
def test_tissue_labels_agree_with_the_regions(convention: LabelConvention) -> None:
    t = Tissues.of(convention)
    r = convention.regions
    assert (t.et,) == r["ET"]
    assert {t.ncr} == set(r["TC"]) - set(r["ET"])
    assert {t.edema} == set(r["WT"]) - set(r["TC"])
    assert t.background in convention.allowed and not any(t.background in v for v in r.values())


def test_tissue_labels_per_release() -> None:
    assert Tissues.of(BRATS_2020) == Tissues(background=0, edema=2, ncr=1, et=4)
    assert Tissues.of(BRATS_2023) == Tissues(background=0, edema=2, ncr=1, et=3)


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name)
def test_merge_truth_table(convention: LabelConvention) -> None:
    # All 16 (A, B) tissue pairs, one voxel each.
    t = Tissues.of(convention)
    pairs = list(itertools.product(TISSUES, TISSUES))
    a = np.array([getattr(t, pa) for pa, _ in pairs], dtype=np.uint8)
    b = np.array([getattr(t, pb) for _, pb in pairs], dtype=np.uint8)
    out = merge_label_maps(a, b, convention)
    expected = np.array([getattr(t, _expected(pa, pb)) for pa, pb in pairs], dtype=np.uint8)
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) <= convention.allowed


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name)
def test_merge_keeps_a_et_and_tc_exactly(convention: LabelConvention) -> None:
    rng = np.random.default_rng(0)
    t = Tissues.of(convention)
    values = np.array([t.background, t.edema, t.ncr, t.et], dtype=np.uint8)
    a = rng.choice(values, size=(6, 7, 8))
    b = rng.choice(values, size=(6, 7, 8))
    out = merge_label_maps(a, b, convention)
    regions_a, regions_out = convention.to_regions(a), convention.to_regions(out)
    np.testing.assert_array_equal(regions_out[:2], regions_a[:2])  # ET and TC are A's
    # WT: A's core; outside it, B's edema on A's background, and A's edema unless B says background.
    gained = (a == t.background) & (b == t.edema)
    kept = (a == t.edema) & (b != t.background)
    np.testing.assert_array_equal(regions_out[2], regions_a[1] | gained | kept)
    assert set(np.unique(out)) <= set(values.tolist())


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name)
def test_merge_symmetric_cases(convention: LabelConvention) -> None:
    t = Tissues.of(convention)
    for x in (t.background, t.edema, t.ncr, t.et):
        same = np.full((2, 2, 2), x, np.uint8)
        np.testing.assert_array_equal(merge_label_maps(same, same, convention), same)
    # The two swaps mirror each other: bg/edema -> edema and edema/bg -> background, i.e. B wins.
    a = np.array([t.background, t.edema], np.uint8)
    np.testing.assert_array_equal(merge_label_maps(a, a[::-1], convention), a[::-1])
    np.testing.assert_array_equal(merge_label_maps(a[::-1], a, convention), a)
    # Between the core labels it is always A, whichever way round.
    c = np.array([t.ncr, t.et], np.uint8)
    np.testing.assert_array_equal(merge_label_maps(c, c[::-1], convention), c)
    np.testing.assert_array_equal(merge_label_maps(c[::-1], c, convention), c[::-1])


def test_merge_leaves_the_resection_cavity_to_a() -> None:
    # 2024's label 4 belongs to no region: it is neither background nor edema, so A's stays.
    a = np.array([4, 0, 2, 4], np.uint8)
    b = np.array([2, 4, 4, 0], np.uint8)
    np.testing.assert_array_equal(merge_label_maps(a, b, BRATS_2023), [4, 0, 2, 4])


def test_merge_preserves_dtype_and_does_not_modify_inputs() -> None:
    a = np.array([[0, 2], [1, 4]], np.int16)
    b = np.array([[2, 0], [2, 2]], np.int16)
    a0, b0 = a.copy(), b.copy()
    out = merge_label_maps(a, b, BRATS_2020)
    np.testing.assert_array_equal(out, [[2, 0], [1, 4]])
    assert out.dtype == np.int16
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, b0)


def test_merge_takes_label_maps_of_any_numeric_dtype() -> None:
    """Float and 64-bit label maps, and negative values, are checked by the general path (the
    fast count takes only small non-negative integers): the same merge, the same messages."""
    a = [0, 2, 1, 4, 0, 2]
    b = [2, 0, 2, 2, 0, 2]
    merged = [2, 0, 1, 4, 0, 2]  # by the rule: bg/ed -> ed, ed/bg -> bg, else A
    for dtype in (np.float32, np.float64, np.int64, np.uint64, np.int8):
        out = merge_label_maps(np.array(a, dtype), np.array(b, dtype), BRATS_2020)
        np.testing.assert_array_equal(out, merged)
        assert out.dtype == dtype
    with pytest.raises(ValueError, match=r"B: labels \[3\.0\] are not in the brats2020"):
        merge_label_maps(np.array(a, np.float32), np.array([0, 3, 2, 2, 0, 2], np.float32), BRATS_2020)
    with pytest.raises(ValueError, match=r"A: labels \[-1, 5\] are not in the brats2020"):
        merge_label_maps(np.array([-1, 5, 0], np.int16), np.zeros(3, np.int16), BRATS_2020)
    with pytest.raises(ValueError, match=r"A: labels \[2000\] are not in the brats2023"):
        merge_label_maps(np.array([2000, 0], np.uint16), np.zeros(2, np.uint16), BRATS_2023)


def test_merge_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        merge_label_maps(np.zeros((2, 2), np.uint8), np.zeros((2, 3), np.uint8), BRATS_2020)
    with pytest.raises(ValueError, match=r"B: labels \[3\] are not in the brats2020"):
        merge_label_maps(np.zeros(3, np.uint8), np.array([0, 3, 2], np.uint8), BRATS_2020)
    with pytest.raises(ValueError, match=r"A: labels \[5\]"):
        merge_label_maps(np.array([5, 0, 0], np.uint8), np.zeros(3, np.uint8), BRATS_2023)


def _with_et(convention: LabelConvention, n_et: int) -> np.ndarray:
    t = Tissues.of(convention)
    labels = np.full((4, 5, 6), t.edema, np.uint8)
    labels[0] = t.background
    labels[1, :2] = t.ncr
    labels.reshape(-1)[-n_et:] = t.et if n_et else labels.reshape(-1)[-1]
    assert np.count_nonzero(labels == t.et) == n_et
    return labels


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name)
@pytest.mark.parametrize(
    "n_et, min_voxels, relabelled", [(9, 10, True), (10, 10, False), (11, 10, False), (1, 2, True)]
)
def test_small_et_threshold_boundary(convention: LabelConvention, n_et: int, min_voxels: int, relabelled: bool) -> None:
    t = Tissues.of(convention)
    labels = _with_et(convention, n_et)
    out = small_et_to_ncr(labels, convention, min_voxels)
    et = labels == t.et
    if relabelled:
        assert not np.any(out == t.et)
        assert np.all(out[et] == t.ncr)
    else:
        np.testing.assert_array_equal(out, labels)
    np.testing.assert_array_equal(out[~et], labels[~et])  # nothing else moves
    regions_in, regions_out = convention.to_regions(labels), convention.to_regions(out)
    np.testing.assert_array_equal(regions_out[1:], regions_in[1:])  # TC and WT unchanged
    assert set(np.unique(out)) <= convention.allowed


@pytest.mark.parametrize("convention", CONVENTIONS, ids=lambda c: c.name)
def test_small_et_zero_disables_and_input_untouched(convention: LabelConvention) -> None:
    labels = _with_et(convention, 1)
    before = labels.copy()
    np.testing.assert_array_equal(small_et_to_ncr(labels, convention, 0), labels)
    small_et_to_ncr(labels, convention, 100)
    np.testing.assert_array_equal(labels, before)
    empty = _with_et(convention, 0)
    np.testing.assert_array_equal(small_et_to_ncr(empty, convention, 100), empty)


def test_small_et_rejects_negative_threshold_and_foreign_labels() -> None:
    with pytest.raises(ValueError, match="min_voxels must be >= 0 .*, got -1"):
        small_et_to_ncr(np.zeros(3, np.uint8), BRATS_2020, -1)
    with pytest.raises(ValueError, match=r"^labels: labels \[3\] are not in the brats2020 convention"):
        small_et_to_ncr(np.array([0, 3, 4], np.uint8), BRATS_2020, 2)


def test_merge_command_on_files(tmp_path, capsys):
    geometry = Geometry((6, 5, 4), (1.0, 1.0, 1.0), BRATS_ORIGIN, IDENTITY)
    a = np.zeros(geometry.shape, np.uint8)
    b = np.zeros(geometry.shape, np.uint8)
    a[0, 0, :3] = [4, 1, 2]  # ET, NCR/NET, edema in A
    b[0, 0, :4] = [2, 2, 0, 2]  # B: edema, edema, background, edema
    for folder, labels in (("a", a), ("b", b)):
        write_image(labels, geometry, tmp_path / folder / "BraTS20_Validation_001.nii.gz")
    other = Geometry((6, 5, 4), (2.0, 1.0, 1.0), BRATS_ORIGIN, IDENTITY)
    write_image(a, geometry, tmp_path / "a" / "BraTS20_Validation_002.nii.gz")
    write_image(b, other, tmp_path / "b" / "BraTS20_Validation_002.nii.gz")

    assert main(["merge", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--output", str(tmp_path / "m")]) == 1
    merged, g = read_image(tmp_path / "m" / "BraTS20_Validation_001.nii.gz")
    assert g == geometry and merged[0, 0, :4].tolist() == [4, 1, 0, 2]  # A's ET and NCR kept; ED by the rule
    err = capsys.readouterr().err
    assert "BraTS20_Validation_002.nii.gz: geometry differs" in err
    assert not (tmp_path / "m" / "BraTS20_Validation_002.nii.gz").exists()


# `merge_folders`, in the test process on real NIfTI files (the CLI tests run it in a subprocess,
# which the mutation run does not see). Volumes are (z, y, x) = (2, 3, 4).
def _geometry(spacing: float = 1.0, origin_shift: float = 0.0):
    return Geometry((4, 3, 2), (spacing, 1.0, 1.0), (origin_shift, -239.0, 0.0), IDENTITY)


def _write(path, labels, geometry=None) -> None:
    write_image(np.asarray(labels).reshape(2, 3, 4), geometry or _geometry(), path)


def test_merge_folders_writes_each_mergeable_case_and_names_every_problem(tmp_path) -> None:
    """One folder pair with every kind of case: the problems, written out by hand from the rules
    of `merge_folders` (B-only cases first, then the .nii files of A and B, then the cases of A in
    name order), name the file, and only the good cases are written."""

    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    # c1: merged. A is int16 (the output is uint8 all the same); the rule, voxel by voxel:
    # (A bg, B ed) -> ed; (A ed, B bg) -> bg; otherwise A.
    a1 = np.array([0, 0, 2, 2, 1, 4, 0, 2, 1, 4, 0, 0] * 2, np.int16)
    b1 = np.array([2, 0, 0, 2, 2, 0, 1, 4, 0, 2, 4, 2] * 2, np.uint8)
    merged1 = np.array([2, 0, 0, 2, 1, 4, 0, 2, 1, 4, 0, 2] * 2, np.uint8)
    _write(a / "c1.nii.gz", a1)
    _write(b / "c1.nii.gz", b1)
    # c2: B in another spacing and origin: two differences.
    _write(a / "c2.nii.gz", a1)
    _write(b / "c2.nii.gz", b1, _geometry(spacing=2.0, origin_shift=5.0))
    # c3: B has label 3, not a BraTS 2020 label.
    _write(a / "c3.nii.gz", a1)
    _write(b / "c3.nii.gz", np.where(b1 == 4, 3, b1).astype(np.uint8))
    # c4: a .nii beside the .nii.gz in A (both mergeable): ambiguous, not written.
    _write(a / "c4.nii.gz", a1)
    _write(a / "c4.nii", a1)
    _write(b / "c4.nii.gz", b1)
    # c1b: only in A (not the last case of A, so the cases after it are still merged or named);
    # c6: a lone .nii in B; c7: only in B.
    _write(a / "c1b.nii.gz", a1)
    _write(b / "c6.nii", b1)
    _write(b / "c7.nii.gz", b1)
    # c9: merged too (the last case: every problem before it goes on to the next case).
    _write(a / "c9.nii.gz", a1)
    _write(b / "c9.nii.gz", b1)
    # Hidden files and other files are not label maps: ignored on both sides.
    _write(a / ".c0.nii.gz", a1)
    _write(b / ".c8.nii.gz", b1)
    (a / "notes.txt").write_text("not a label map")

    written, problems = merge_folders(a, b, out, BRATS_2020)

    assert written == [out / "c1.nii.gz", out / "c9.nii.gz"]
    for name in ("c1.nii.gz", "c9.nii.gz"):
        merged, geometry = read_image(out / name)
        np.testing.assert_array_equal(merged.ravel(), merged1)
        assert geometry == _geometry() and read_header(out / name)[1] == "8-bit unsigned integer"
    assert sorted(p.name for p in out.iterdir()) == ["c1.nii.gz", "c9.nii.gz"]
    assert problems[:6] == [
        f"{b / 'c7.nii.gz'}: no label map in A ({a})",
        f"{a / 'c4.nii'}: both c4.nii and c4.nii.gz in {a}; keep one",
        f"{b / 'c6.nii'}: a .nii label map; merge reads <case id>.nii.gz only",
        f"{b / 'c1b.nii.gz'}: file not found",
        f"{b / 'c2.nii.gz'}: geometry differs from {a / 'c2.nii.gz'}: spacing (1, 1, 1) vs (2, 1, 1); "
        "origin (0, -239, 0) vs (5, -239, 0)",
        "c3.nii.gz: B: labels [3] are not in the brats2020 convention (allowed [0, 1, 2, 4])",
    ]
    assert len(problems) == 6


def test_merge_folders_accepts_a_clean_pair_without_problems(tmp_path) -> None:
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    labels = np.array([0, 2, 1, 4] * 6, np.uint8)
    for name in ("x.nii.gz", "y.nii.gz"):
        _write(a / name, labels)
        _write(b / name, labels)
    assert merge_folders(a, b, out, BRATS_2020) == ([out / "x.nii.gz", out / "y.nii.gz"], [])


def test_merge_folders_refuses_a_missing_folder_or_one_without_label_maps(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a / "c1.nii", np.zeros(24, np.uint8))
    (b / "c1.nii.gz").parent.mkdir()
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope'}: not a folder")):
        merge_folders(tmp_path / "nope", b, tmp_path / "out", BRATS_2020)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'file'}: not a folder")):
        merge_folders(a, tmp_path / "file", tmp_path / "out", BRATS_2020)
    with pytest.raises(DataError, match=re.escape(f"{a}: no label maps (<case id>.nii.gz)")):
        merge_folders(a, b, tmp_path / "out", BRATS_2020)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "error, reason",
    [(PermissionError(13, "Permission denied"), "permission denied"), (OSError("Stale Handle"), "stale handle")],
)
def test_merge_folders_says_why_a_folder_cannot_be_listed(tmp_path, monkeypatch, error, reason) -> None:
    """A folder that cannot be listed: the OS's reason (its strerror, else the message), in lower case.
    The failure is injected (this container runs as root, which lists a chmod 000 folder)."""


    a, b = tmp_path / "a", tmp_path / "b"
    _write(a / "c1.nii.gz", np.zeros(24, np.uint8))
    b.mkdir()
    real = Path.iterdir

    def iterdir(self):
        if self == b:
            raise error
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(DataError, match=re.escape(f"{b}: cannot list the folder ({reason})") + "$"):
        merge_folders(a, b, tmp_path / "out", BRATS_2020)
