"""Preprocessing: normalisation properties, crops and pads that invert exactly, one case end to end."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brats_lab import DataError
from brats_lab.data.cases import discover
from brats_lab.data.preprocess import (
    CropParams,
    brain_bbox,
    crop,
    crop_to_bbox,
    normalize,
    pad_to_multiple,
    paste_back,
    preprocess_case,
    random_crop,
    sample_crop,
    unpad,
)
from brats_lab.io import read_image, write_image
from brats_lab.labels import BRATS_2020, BRATS_2023, REGIONS


def brain_volume(seed: int = 0, shape=(12, 14, 10), dtype=np.int16) -> np.ndarray:
    """Integer intensities inside a box, zero background around it."""
    rng = np.random.default_rng(seed)
    v = np.zeros(shape, dtype)
    v[2:-2, 3:-3, 2:-2] = rng.integers(50, 1000, size=(shape[0] - 4, shape[1] - 6, shape[2] - 4))
    return v


# --- normalize -------------------------------------------------------------------------------


def test_minmax_range_background_and_clipping() -> None:
    v = brain_volume()
    v[5, 5, 5] = 30000  # an outlier above the 99th percentile
    out = normalize(v, "minmax")
    assert out.dtype == np.float32
    brain = v != 0
    assert np.all(out[~brain] == 0)
    assert out.min() == 0 and out.max() == pytest.approx(1.0)
    low, high = np.percentile(v[brain].astype(np.float64), [1, 99])
    expected = (np.clip(v[brain], low, high) - low) / (high - low)
    np.testing.assert_allclose(out[brain], expected, rtol=1e-6)
    # everything at or above the 99th percentile, the outlier included, is clipped to 1
    assert out[5, 5, 5] == pytest.approx(1.0)
    assert np.sum(out[brain] >= 1 - 1e-6) >= 0.01 * brain.sum() - 1


def test_minmax_keeps_background_zero_with_negative_intensities() -> None:
    v = brain_volume().astype(np.float32) - 500  # brain values below and above 0
    v[v == -500] = 0
    out = normalize(v, "minmax")
    assert np.all(out[v == 0] == 0)
    assert out.min() >= 0 and out.max() <= 1


def test_zscore_statistics_and_input_untouched() -> None:
    v = brain_volume(1)
    before = v.copy()
    out = normalize(v, "zscore")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(v, before)  # never in place, and int input is not truncated
    brain = v != 0
    assert np.all(out[~brain] == 0)
    assert out[brain].mean() == pytest.approx(0, abs=1e-5)
    assert out[brain].std() == pytest.approx(1, abs=1e-5)


@pytest.mark.parametrize("method", ["minmax", "zscore"])
@pytest.mark.parametrize("fill", [0, 7])
def test_empty_and_constant_modalities_become_zeros(method: str, fill: int) -> None:
    v = np.zeros((4, 5, 6), np.int16)
    v[1:3, 1:4, 1:5] = fill
    out = normalize(v, method)
    assert out.dtype == np.float32 and not np.any(out) and np.all(np.isfinite(out))


def test_normalize_rejects_unknown_method() -> None:
    with pytest.raises(ValueError, match="minmax"):
        normalize(brain_volume(), "percentile")


# --- bbox, paste-back ------------------------------------------------------------------------


def test_brain_bbox_margin_and_clipping() -> None:
    images = np.zeros((4, 10, 12, 14), np.float32)
    images[2, 3:5, 0:4, 6:14] = 1  # touches the y start and x end
    assert brain_bbox(images) == (slice(2, 6), slice(0, 5), slice(5, 14))
    assert brain_bbox(images, margin=0) == (slice(3, 5), slice(0, 4), slice(6, 14))


def test_brain_bbox_of_empty_image_is_an_error() -> None:
    with pytest.raises(DataError, match="no non-zero voxel"):
        brain_bbox(np.zeros((4, 5, 5, 5)))


def test_crop_to_bbox_then_paste_back_restores_the_label_map() -> None:
    rng = np.random.default_rng(0)
    images = np.zeros((4, 16, 18, 20), np.float32)
    images[:, 3:12, 2:15, 5:17] = rng.random((4, 9, 13, 12))
    seg = np.zeros((16, 18, 20), np.uint8)
    seg[4:10, 5:12, 6:15] = rng.choice([0, 1, 2, 4], size=(6, 7, 9))
    bbox = brain_bbox(images)
    back = paste_back(crop_to_bbox(seg, bbox), bbox, seg.shape)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, seg)
    # leading axes survive: regions (3, z, y, x) go back the same way
    regions = BRATS_2020.to_regions(seg)
    np.testing.assert_array_equal(paste_back(crop_to_bbox(regions, bbox), bbox, seg.shape), regions)


def test_paste_back_rejects_a_crop_of_the_wrong_size() -> None:
    with pytest.raises(ValueError, match="does not match"):
        paste_back(np.zeros((3, 4, 5)), (slice(0, 3), slice(0, 4), slice(0, 6)), (10, 10, 10))


@pytest.mark.parametrize("convention,labels", [(BRATS_2020, [0, 1, 2, 4]), (BRATS_2023, [0, 1, 2, 3])])
def test_labels_regions_labels_round_trip(convention, labels) -> None:
    seg = np.random.default_rng(3).choice(labels, size=(6, 7, 8)).astype(np.uint8)
    regions = convention.to_regions(seg)
    assert regions.shape == (len(REGIONS), *seg.shape) and regions.dtype == bool
    np.testing.assert_array_equal(convention.from_regions(regions), seg)


def test_2024_resection_cavity_is_in_no_region() -> None:
    seg = np.array([[[0, 1, 2, 3, 4]]], np.uint8)
    np.testing.assert_array_equal(BRATS_2023.from_regions(BRATS_2023.to_regions(seg)), [[[0, 1, 2, 3, 0]]])


# --- pad, crop -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 17, 30, 33), (16, 32, 48), (3, 1, 16, 5)])
def test_pad_to_multiple_then_unpad_is_identity(shape) -> None:
    a = np.random.default_rng(0).random(shape).astype(np.float32)
    padded, pads = pad_to_multiple(a, 16)
    assert all(n % 16 == 0 for n in padded.shape[-3:])
    assert padded.shape[:-3] == a.shape[:-3]
    np.testing.assert_array_equal(padded[(..., *(slice(0, n) for n in a.shape[-3:]))], a)  # pads at the end
    np.testing.assert_array_equal(unpad(padded, pads), a)


def test_random_crop_size_and_alignment() -> None:
    rng = np.random.default_rng(0)
    images = np.arange(4 * 20 * 22 * 24, dtype=np.float32).reshape(4, 20, 22, 24)  # unique values
    target = rng.random((3, 20, 22, 24)) > 0.5
    img, tgt = random_crop(images, target, 8, rng)
    assert img.shape == (4, 8, 8, 8) and tgt.shape == (3, 8, 8, 8) and tgt.dtype == bool
    # the same window of both: find it from the first voxel and compare there
    ((z, y, x),) = np.argwhere(images[0] == img[0, 0, 0, 0])
    np.testing.assert_array_equal(img, images[:, z : z + 8, y : y + 8, x : x + 8])
    np.testing.assert_array_equal(tgt, target[:, z : z + 8, y : y + 8, x : x + 8])


def test_random_crop_is_deterministic_for_a_seed() -> None:
    images = np.random.default_rng(0).random((4, 20, 22, 24)).astype(np.float32)
    a = random_crop(images, None, (8, 10, 12), np.random.default_rng(42))[0]
    b = random_crop(images, None, (8, 10, 12), np.random.default_rng(42))[0]
    np.testing.assert_array_equal(a, b)
    draws = {sample_crop((20, 22, 24), 8, np.random.default_rng(s)).starts for s in range(10)}
    assert len(draws) > 1


def test_crop_of_a_smaller_volume_is_zero_padded() -> None:
    images = np.ones((4, 5, 20, 6), np.float32)
    seen_before = set()
    for seed in range(20):
        params = sample_crop(images.shape[-3:], 8, np.random.default_rng(seed))
        out = crop(images, params)
        assert out.shape == (4, 8, 8, 8)
        assert out.sum() == 4 * 5 * 8 * 6  # the whole small axes, 8 of the long one
        (zb, za), _, (xb, xa) = params.pads
        assert zb + za == 3 and xb + xa == 2
        np.testing.assert_array_equal(out[:, zb : 8 - za, :, xb : 8 - xa], 1)
        seen_before.add((zb, xb))
    assert len(seen_before) > 1  # the before/after split is random


def test_crop_replays_its_params() -> None:
    a = np.arange(6 * 7 * 8).reshape(6, 7, 8)
    params = CropParams(starts=(1, 0, 2), sizes=(4, 7, 5), pads=((0, 0), (1, 2), (0, 0)))
    out = crop(a, params)
    assert out.shape == (4, 10, 5)
    np.testing.assert_array_equal(out[:, 1:8], a[1:5, :, 2:7])


# --- one case --------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["brats2020", "brats2023"])
def test_preprocess_case(tmp_path: Path, case_writer, layout: str) -> None:
    case_id = "BraTS20_Training_001" if layout == "brats2020" else "BraTS-GLI-00001-000"
    case_writer(tmp_path, case_id, layout=layout)
    (case,) = discover(tmp_path)
    pre = preprocess_case(case, "minmax")
    assert pre.case_id == case_id and pre.images.dtype == np.float32 and pre.images.shape[0] == 4
    assert pre.images.shape[1:] == pre.labels.shape and pre.labels.dtype == np.uint8
    assert 0 <= pre.images.min() and pre.images.max() <= 1
    assert pre.regions.shape == (3, *pre.labels.shape) and pre.regions.dtype == bool
    seg, geometry = read_image(case.seg)
    assert pre.geometry == geometry
    np.testing.assert_array_equal(paste_back(pre.labels, pre.bbox, geometry.shape), seg)
    # the crop is the brain plus one voxel: the brain touches no side of the crop
    brain = np.any(pre.images != 0, axis=0)
    assert not brain[[0, -1]].any() and not brain[:, [0, -1]].any() and not brain[:, :, [0, -1]].any()
    t1, _ = read_image(case.images[0])
    np.testing.assert_array_equal(pre.images[0], normalize(t1, "minmax")[pre.bbox])


def test_preprocess_case_without_seg(tmp_path: Path, case_writer) -> None:
    case_writer(tmp_path, "BraTS20_Validation_001", with_seg=False)
    pre = preprocess_case(discover(tmp_path)[0], "zscore")
    assert pre.labels is None and pre.regions is None


def test_modality_of_another_shape_is_named(tmp_path: Path, case_writer) -> None:
    folder = case_writer(tmp_path, "BraTS20_Training_001")
    t2 = folder / "BraTS20_Training_001_t2.nii.gz"
    _, geometry = read_image(t2)
    small = type(geometry)((30, 32, 24), geometry.spacing, geometry.origin, geometry.direction)
    write_image(np.ones(small.shape, np.int16), small, t2)
    with pytest.raises(DataError, match=r"BraTS20_Training_001: .*_t2\.nii\.gz: geometry differs.*size"):
        preprocess_case(discover(tmp_path)[0], "minmax")


def test_unexpected_labels_and_missing_files_are_named(tmp_path: Path, case_writer) -> None:
    folder = case_writer(tmp_path, "BraTS20_Training_001")
    seg_path = folder / "BraTS20_Training_001_seg.nii.gz"
    seg, geometry = read_image(seg_path)
    seg[seg == 4] = 3  # a 2023 label in a 2020 case
    write_image(seg, geometry, seg_path)
    with pytest.raises(DataError, match=r"BraTS20_Training_001: .*_seg\.nii\.gz: unexpected label values \[3\]"):
        preprocess_case(discover(tmp_path)[0], "minmax")
    (folder / "BraTS20_Training_001_flair.nii.gz").unlink()
    with pytest.raises(DataError, match=r"BraTS20_Training_001: .*_flair\.nii\.gz: file not found"):
        preprocess_case(discover(tmp_path)[0], "minmax")
