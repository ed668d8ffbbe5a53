"""The metrics equal an independent oracle: medpy's dc, sensitivity, specificity and hd95, with the
BraTS rules for empty masks laid over them."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from scipy import ndimage

from brats_lab import DataError
from brats_lab.evaluation.lesionwise import LESION_METRICS, RULES
from brats_lab.evaluation.metrics import (
    DIRECTIONS,
    METRIC_REGIONS,
    METRICS,
    RegionMetrics,
    case_metrics,
    dice_from_counts,
    lower_is_better,
    metric_direction,
    region_metrics,
)
from brats_lab.labels import BRATS_2020, BRATS_2023

TOL = 1e-9


def image_diagonal(shape: tuple[int, ...], spacing: tuple[float, ...]) -> float:
    """CaPTk's HD95 where exactly one mask is empty, the diagonal of the image, here in mm."""
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


def oracle(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]) -> RegionMetrics:
    """medpy where it is defined, the BraTS conventions where a mask is empty."""
    # Imported here, not skipped at the top: without medpy (a dev dependency) the oracle tests fail
    # and the tests that do not need it still run.
    from medpy.metric import binary as medpy_binary

    pred, ref = pred.astype(bool), ref.astype(bool)
    if not pred.any() and not ref.any():
        return RegionMetrics(dice=1.0, sensitivity=1.0, specificity=1.0, hd95=0.0)
    return RegionMetrics(
        dice=float(medpy_binary.dc(pred, ref)),
        sensitivity=float(medpy_binary.sensitivity(pred, ref)) if ref.any() else 0.0,  # CaPTk's rule
        specificity=float(medpy_binary.specificity(pred, ref)) if not ref.all() else 1.0,
        hd95=float(medpy_binary.hd95(pred, ref, voxelspacing=spacing)) if pred.any() and ref.any() else image_diagonal(pred.shape, spacing),
    )


def assert_same(ours: RegionMetrics, expected: RegionMetrics) -> None:
    for name in ("dice", "sensitivity", "specificity", "hd95"):
        value = getattr(ours, name)
        assert isinstance(value, float) and np.isfinite(value), (name, value)
        assert value == pytest.approx(getattr(expected, name), abs=TOL, rel=TOL), name


def blobs(rng: np.random.Generator, shape: tuple[int, ...], sigma: float, fraction: float) -> np.ndarray:
    """A random mask of smooth blobs covering about `fraction` of the volume."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return field > np.quantile(field, 1 - fraction)


SHAPES_SPACINGS = [
    ((20, 24, 28), (1.0, 1.0, 1.0)),
    ((16, 30, 22), (2.0, 1.0, 0.5)),
    ((12, 12, 40), (3.0, 0.8, 0.8)),
    ((25, 25, 25), (1.2, 1.2, 1.2)),
]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("shape", "spacing"), SHAPES_SPACINGS)
def test_random_blobs_match_medpy(seed: int, shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    rng = np.random.default_rng(seed)
    ref = blobs(rng, shape, sigma=2.5, fraction=rng.uniform(0.02, 0.3))
    # A prediction near the reference: the reference smoothed, shifted and thresholded afresh.
    noisy = ndimage.gaussian_filter(ref.astype(float) + rng.normal(0, 0.6, shape), 1.0)
    pred = np.roll(noisy > 0.5, rng.integers(-2, 3, size=3), axis=(0, 1, 2))
    assert_same(region_metrics(pred, ref, spacing), oracle(pred, ref, spacing))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("shape", "spacing"), SHAPES_SPACINGS)
def test_unrelated_masks_match_medpy(seed: int, shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    # Independent masks: most surface voxels lie far from the other surface (the k-d tree path).
    rng = np.random.default_rng(100 + seed)
    pred = blobs(rng, shape, sigma=1.5, fraction=0.1)
    ref = blobs(rng, shape, sigma=3.0, fraction=0.05)
    assert_same(region_metrics(pred, ref, spacing), oracle(pred, ref, spacing))


@pytest.mark.parametrize("seed", range(3))
def test_speckle_matches_medpy(seed: int) -> None:
    # Salt-and-pepper masks: every voxel is surface, nothing is smooth.
    rng = np.random.default_rng(200 + seed)
    pred = rng.random((14, 15, 16)) < 0.05
    ref = rng.random((14, 15, 16)) < 0.2
    spacing = (1.5, 0.7, 1.1)
    assert_same(region_metrics(pred, ref, spacing), oracle(pred, ref, spacing))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5), (5.0, 0.2, 0.2)])
def test_distant_objects(spacing: tuple[float, float, float]) -> None:
    pred = np.zeros((30, 40, 50), bool)
    ref = np.zeros_like(pred)
    ref[5:10, 5:12, 5:9] = True
    pred[6:10, 5:11, 5:10] = True
    pred[25:28, 30:38, 40:49] = True  # a false positive far from everything
    assert_same(region_metrics(pred, ref, spacing), oracle(pred, ref, spacing))


def test_both_empty() -> None:
    empty = np.zeros((8, 9, 10), bool)
    assert region_metrics(empty, empty, (1.0, 1.0, 1.0)) == RegionMetrics(1.0, 1.0, 1.0, 0.0)


def test_reference_empty() -> None:
    ref = np.zeros((8, 9, 10), bool)
    pred = ref.copy()
    pred[2:4, 3:5, 4:6] = True
    m = region_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert m.dice == 0.0
    assert m.sensitivity == 0.0  # CaPTk: 0/0 with exactly one mask empty scores 0 (region_metrics' docstring)
    assert m.specificity == pytest.approx((ref.size - 8) / ref.size)
    assert m.hd95 == pytest.approx(15.652475842498529, rel=1e-12)  # CaPTk's sqrt(8^2 + 9^2 + 10^2)


def test_prediction_empty() -> None:
    pred = np.zeros((8, 9, 10), bool)
    ref = pred.copy()
    ref[2:4, 3:5, 4:6] = True
    m = region_metrics(pred, ref, (1.0, 1.0, 1.0))
    assert (m.dice, m.sensitivity, m.specificity) == (0.0, 0.0, 1.0)
    assert m.hd95 == pytest.approx(15.652475842498529, rel=1e-12)


@pytest.mark.parametrize(
    "shape, spacing, diagonal",
    [
        ((155, 240, 240), (1.0, 1.0, 1.0), 373.1286641361127),  # the BraTS grid: CaPTk's 373.13
        ((8, 9, 10), (1.0, 1.0, 1.0), 15.652475842498529),  # CaPTk's, on a 1 mm grid
        # Not 1 mm: CaPTk would still give 15.65 (voxels); brats-lab the diagonal in mm,
        # sqrt(16^2 + 9^2 + 5^2), the departure docs/fidelity.md names.
        ((8, 9, 10), (2.0, 1.0, 0.5), 19.026297590440446),
        ((62, 96, 96), (2.5, 2.5, 2.5), 373.1286641361127),  # a 96 x 96 x 62 phantom: the same field of view
    ],
)
def test_one_empty_mask_scores_the_image_diagonal(shape, spacing, diagonal) -> None:
    full = np.zeros(shape, bool)
    part = full.copy()
    part[2:4, 3:5, 4:6] = True
    assert region_metrics(part, full, spacing).hd95 == pytest.approx(diagonal, rel=1e-12)
    assert region_metrics(full, part, spacing).hd95 == pytest.approx(diagonal, rel=1e-12)
    labels = part.astype(np.uint8) * 4  # ET, in TC and WT too
    assert case_metrics(labels, np.zeros_like(labels), spacing, BRATS_2020)["WT"].hd95 == pytest.approx(diagonal, rel=1e-12)


def test_reference_fills_volume() -> None:
    ref = np.ones((4, 5, 6), bool)
    pred = ref.copy()
    pred[0, 0, 0] = False
    m = region_metrics(pred, ref, (1.0, 1.0, 1.0))
    expected = oracle(pred, ref, (1.0, 1.0, 1.0))
    assert_same(m, expected)
    assert m.specificity == 1.0


@pytest.mark.parametrize(
    ("pred_at", "ref_at", "spacing"),
    [
        ((3, 4, 5), (3, 4, 5), (1.0, 1.0, 1.0)),
        ((3, 4, 5), (3, 4, 6), (1.0, 1.0, 1.0)),
        ((0, 0, 0), (7, 8, 9), (1.0, 1.0, 1.0)),
        ((1, 2, 3), (6, 2, 7), (2.0, 1.0, 0.5)),
    ],
)
def test_single_voxels(pred_at: tuple[int, ...], ref_at: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    pred = np.zeros((8, 9, 10), bool)
    ref = np.zeros_like(pred)
    pred[pred_at] = True
    ref[ref_at] = True
    m = region_metrics(pred, ref, spacing)
    assert_same(m, oracle(pred, ref, spacing))
    if pred_at == ref_at:
        assert (m.dice, m.hd95) == (1.0, 0.0)
    else:
        distance = float(np.sqrt(np.sum(((np.array(pred_at) - ref_at) * spacing) ** 2)))
        assert m.hd95 == pytest.approx(distance)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_masks_touching_the_volume_border(spacing: tuple[float, float, float]) -> None:
    # Voxels on the image's faces are surface (erosion's border_value=0); the crop must keep that.
    shape = (12, 14, 16)
    ref = np.zeros(shape, bool)
    ref[0:6, 0:14, 3:10] = True  # touches three faces
    pred = np.zeros(shape, bool)
    pred[0:5, 2:14, 4:16] = True
    assert_same(region_metrics(pred, ref, spacing), oracle(pred, ref, spacing))
    full = np.ones(shape, bool)
    assert_same(region_metrics(full, ref, spacing), oracle(full, ref, spacing))
    assert_same(region_metrics(ref, full, spacing), oracle(ref, full, spacing))


def test_two_dimensional_masks() -> None:
    rng = np.random.default_rng(7)
    ref = blobs(rng, (40, 50), sigma=3, fraction=0.2)
    pred = blobs(rng, (40, 50), sigma=3, fraction=0.2) | ref
    assert_same(region_metrics(pred, ref, (0.9, 1.3)), oracle(pred, ref, (0.9, 1.3)))


@pytest.mark.parametrize("score", ["region", "case"])
@pytest.mark.parametrize(
    ("ref_shape", "spacing", "message"),
    [
        ((3, 4, 6), (1.0, 1.0, 1.0), "prediction shape (3, 4, 5) differs from reference shape (3, 4, 6)"),
        ((3, 4, 5), (1.0, 1.0), "spacing (1.0, 1.0) has 2 values for a 3-d array"),
        ((3, 4, 5), (1.0, 1.0, 1.0, 1.0), "spacing (1.0, 1.0, 1.0, 1.0) has 4 values for a 3-d array"),
        ((3, 4, 5), (1.0, 0.0, 1.0), "spacing (1.0, 0.0, 1.0) must be positive and finite (mm)"),
        ((3, 4, 5), (-1.0, 1.0, 1.0), "spacing (-1.0, 1.0, 1.0) must be positive and finite (mm)"),
        ((3, 4, 5), (1.0, 1.0, np.inf), "spacing (1.0, 1.0, inf) must be positive and finite (mm)"),
        ((3, 4, 5), (np.nan, 1.0, 1.0), "spacing (nan, 1.0, 1.0) must be positive and finite (mm)"),
    ],
)
def test_bad_arguments_are_named_in_the_error(score: str, ref_shape, spacing, message: str) -> None:
    pred = np.zeros((3, 4, 5), np.uint8)
    ref = np.zeros(ref_shape, np.uint8)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        if score == "region":
            region_metrics(pred, ref, spacing)
        else:
            case_metrics(pred, ref, spacing, BRATS_2020)


def label_map(rng: np.random.Generator, shape: tuple[int, ...], et: int) -> np.ndarray:
    """Nested tumour labels: edema (2) around a core of necrosis (1) and enhancing tumour."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), 3.0)
    field /= field.max()
    out = np.zeros(shape, np.uint8)
    out[field > 0.3] = 2
    out[field > 0.55] = et
    out[field > 0.75] = 1
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("convention", [BRATS_2020, BRATS_2023], ids=lambda c: c.name)
def test_case_metrics_regions_match_oracle(seed: int, convention) -> None:
    rng = np.random.default_rng(seed)
    et = convention.regions["ET"][0]
    shape, spacing = (24, 30, 28), (1.0, 1.0, 1.0) if seed % 2 else (2.0, 1.0, 0.5)
    ref = label_map(rng, shape, et)
    pred = np.roll(label_map(rng, shape, et), 1, axis=1)
    pred[ref == 2] = np.where(rng.random(int((ref == 2).sum())) < 0.7, 2, 0)
    if seed == 3:
        pred[pred == et] = 0  # a missed enhancing tumour
    result = case_metrics(pred, ref, spacing, convention)
    assert list(result) == ["ET", "TC", "WT"]
    for region, labels in convention.regions.items():
        assert_same(result[region], oracle(np.isin(pred, labels), np.isin(ref, labels), spacing))
    if seed == 3:
        assert result["ET"].dice == 0.0 and result["ET"].hd95 == pytest.approx(math.sqrt(24**2 + 30**2 + 28**2))


def test_case_metrics_nested_regions_by_label() -> None:
    # ET in the prediction sits where the reference has necrosis: TC and WT are perfect, ET is not.
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:8, 2:8, 2:8] = 2
    ref[3:7, 3:7, 3:7] = 4
    ref[4:6, 4:6, 4:6] = 1
    pred = ref.copy()
    pred[4:6, 4:6, 4:6] = 4
    m = case_metrics(pred, ref, (1.0, 1.0, 1.0), BRATS_2020)
    assert m["WT"] == m["TC"] == RegionMetrics(1.0, 1.0, 1.0, 0.0)
    assert m["ET"].sensitivity == 1.0 and m["ET"].dice == pytest.approx(2 * 56 / (56 + 64))
    # Every voxel of the reference's hollow ET cube is on its outer face too: same surfaces.
    assert_same(m["ET"], oracle(pred == 4, ref == 4, (1.0, 1.0, 1.0)))
    assert m["ET"].hd95 == 0.0


def test_case_metrics_empty_volumes() -> None:
    zero = np.zeros((6, 7, 8), np.uint8)
    m = case_metrics(zero, zero, (1.0, 1.0, 1.0), BRATS_2020)
    assert all(v == RegionMetrics(1.0, 1.0, 1.0, 0.0) for v in m.values())


def test_case_metrics_rejects_unknown_prediction_labels() -> None:
    ref = np.zeros((6, 7, 8), np.uint8)
    pred = ref.copy()
    pred[1, 1, 1] = 3  # a 2023 ET in a 2020 map
    pred[2, 2, 2] = 7
    message = "prediction holds labels [3, 7] unknown to the brats2020 convention (expected [0, 1, 2, 4])"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        case_metrics(pred, ref, (1.0, 1.0, 1.0), BRATS_2020)


def test_case_metrics_accepts_other_dtypes() -> None:
    rng = np.random.default_rng(3)
    ref = label_map(rng, (16, 18, 20), 4)
    pred = np.roll(ref, 1, axis=2)
    expected = case_metrics(pred, ref, (1.0, 1.0, 1.0), BRATS_2020)
    assert case_metrics(pred.astype(np.float32), ref.astype(np.int16), (1.0, 1.0, 1.0), BRATS_2020) == expected


@pytest.mark.slow
def test_full_size_case_matches_medpy() -> None:
    rng = np.random.default_rng(0)
    shape = (155, 240, 240)
    ref = np.zeros(shape, np.uint8)
    pred = np.zeros(shape, np.uint8)
    box = (slice(40, 110), slice(80, 160), slice(100, 180))
    ref[box] = label_map(rng, (70, 80, 80), 4)
    other = label_map(rng, (70, 80, 80), 4)
    pred[box] = np.roll(np.where(other > 0, other, ref[box]), 2, axis=0)
    pred[0:3, 0:5, 230:240] = 2  # a false positive on the image border
    result = case_metrics(pred, ref, (1.0, 1.0, 1.0), BRATS_2020)
    for region, labels in BRATS_2020.regions.items():
        assert_same(result[region], oracle(np.isin(pred, labels), np.isin(ref, labels), (1.0, 1.0, 1.0)))


@pytest.mark.parametrize(
    ("overlap", "n_pred", "n_ref", "expected"),
    [
        (0, 0, 0, 1.0),  # both empty: the BraTS rule, a perfect score
        (0, 0, 3, 0.0),  # prediction empty
        (0, 0, 1, 0.0),
        (0, 3, 0, 0.0),  # reference empty
        (0, 1, 0, 0.0),
        (3, 4, 6, 0.6),  # 2 * 3 / (4 + 6)
        (5, 5, 5, 1.0),
    ],
)
def test_dice_from_counts_by_hand(overlap: int, n_pred: int, n_ref: int, expected: float) -> None:
    assert dice_from_counts(overlap, n_pred, n_ref) == pytest.approx(expected, abs=1e-15)


def test_dice_from_counts_equals_the_dice_of_the_masks() -> None:
    # The trainer's validation counts on its own; its Dice must be the one `evaluate` reports.
    rng = np.random.default_rng(11)
    pred, ref = rng.random((2, 6, 7, 8)) < 0.3
    counts = int((pred & ref).sum()), int(pred.sum()), int(ref.sum())
    assert dice_from_counts(*counts) == region_metrics(pred, ref, (1.0, 1.0, 1.0)).dice


def test_region_metrics_as_dict_names_each_metric() -> None:
    m = RegionMetrics(dice=0.25, sensitivity=0.5, specificity=0.75, hd95=3.0)
    assert m.as_dict() == {"dice": 0.25, "sensitivity": 0.5, "specificity": 0.75, "hd95": 3.0}
    assert tuple(m.as_dict()) == METRICS


@pytest.mark.parametrize(
    ("pred_dtype", "ref_dtype"),
    [
        (np.uint8, np.uint8),
        (np.int16, np.int16),
        (np.float32, np.float32),
        (np.float32, np.int16),
        (np.uint8, np.float32),
    ],
)
def test_case_metrics_finds_labels_in_whole_slabs_of_any_dtype(pred_dtype, ref_dtype) -> None:
    """Two slabs of necrosis (label 1) at the bottom of the prediction, two at the top of the
    reference, nothing in between: the box of the case must hold all four slabs, whatever the dtypes.

    By hand, 6 x 5 x 4 voxels, 40 in each mask, none shared: TC and WT have Dice 0, sensitivity 0,
    specificity TN / (TN + FP) = (120 - 80) / (40 + 40) = 0.5. Every voxel of a 2-voxel slab is
    on its surface; a predicted voxel at z = 0 or 1 is 4 or 3 mm from the reference at z = 4, and
    a reference voxel at z = 5 or 4 is 4 or 3 mm from the prediction at z = 1: 40 distances of 3
    and 40 of 4, whose 95th percentile is 4. ET is empty in both: perfect.
    """
    pred = np.zeros((6, 5, 4), pred_dtype)
    ref = np.zeros((6, 5, 4), ref_dtype)
    pred[0:2] = 1
    ref[4:6] = 1
    m = case_metrics(pred, ref, (1.0, 1.0, 1.0), BRATS_2020)
    assert m["ET"] == RegionMetrics(1.0, 1.0, 1.0, 0.0)
    assert m["TC"] == m["WT"] == RegionMetrics(dice=0.0, sensitivity=0.0, specificity=0.5, hd95=4.0)


@pytest.mark.parametrize(
    ("spacing", "near", "far"),
    [((2.0, 1.0, 0.5), (0, 0, 1), (0, 1, 0)), ((0.5, 1.0, 2.0), (1, 0, 0), (0, 1, 0))],
)
def test_hd95_takes_the_nearest_voxel_along_the_finest_axis(
    spacing: tuple[float, ...], near: tuple[int, ...], far: tuple[int, ...]
) -> None:
    """One predicted voxel; the reference has one voxel 0.5 mm away along the finest axis and one
    1 mm away along the middle one. By hand: the pooled distances are 0.5 (the prediction to its
    nearest), 0.5 and 1.0 (each reference voxel to the prediction); numpy's 95th percentile of
    three sorted values is v[1] + 0.9 * (v[2] - v[1]) = 0.95."""
    pred = np.zeros((7, 7, 7), bool)
    ref = np.zeros_like(pred)
    centre = np.array([3, 3, 3])
    pred[tuple(centre)] = True
    ref[tuple(centre + near)] = True
    ref[tuple(centre + far)] = True
    assert region_metrics(pred, ref, spacing).hd95 == pytest.approx(0.95, abs=1e-12)


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_hd95_of_two_voxels_is_their_distance_for_every_offset(spacing: tuple[float, ...]) -> None:
    # One voxel each, every offset within 3 voxels per axis: both directed distances are the
    # offset's length in mm, so HD95 is too (0 when they coincide).
    pred = np.zeros((7, 7, 7), bool)
    pred[3, 3, 3] = True
    for offset in np.ndindex(7, 7, 7):
        ref = np.zeros_like(pred)
        ref[offset] = True
        expected = float(np.sqrt(sum(((o - 3) * s) ** 2 for o, s in zip(offset, spacing))))
        assert region_metrics(pred, ref, spacing).hd95 == pytest.approx(expected, abs=1e-12), offset


@pytest.mark.parametrize("side", [1, -1])
def test_hd95_takes_the_nearest_voxel_when_farther_ones_surround_it(side: int) -> None:
    """2-D, 1 x 2 mm pixels. The prediction's centre pixel c has one reference pixel 1 mm away
    (c + (side, 0)) and four 2 mm away (c + (+-2, 0), c + (0, +-1)); the prediction also holds
    every reference pixel. By hand: each reference pixel and each prediction pixel but c is at 0,
    c is at 1 mm: 11 pooled distances, ten 0 and one 1; numpy's 95th percentile of 11 sorted values
    is v[9] + 0.5 * (v[10] - v[9]) = 0.5."""
    ref = np.zeros((7, 5), bool)
    c = np.array([3, 2])
    for offset in [(side, 0), (2, 0), (-2, 0), (0, 1), (0, -1)]:
        ref[tuple(c + offset)] = True
    pred = ref.copy()
    pred[tuple(c)] = True
    assert region_metrics(pred, ref, (1.0, 2.0)).hd95 == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("extra", ["pred", "ref"])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_one_voxel_more_than_the_other_mask(extra: str, axis: int) -> None:
    """Both masks hold voxel v; one of them also holds v's neighbour along `axis`. By hand: the
    surface distances are 0 (v to v, in both directions) and the spacing along `axis` (the extra
    voxel to v), so HD95 of the three is 0 + 0.9 * spacing[axis]; Dice 2 * 1 / 3; sensitivity 1
    with the extra voxel predicted, 1/2 with it missed; specificity TN / (TN + FP), TN = 60 - 2
    voxels, FP = 1 when the extra voxel is predicted (58/59), 0 when it is missed (1)."""
    spacing = (2.0, 1.0, 0.5)
    one = np.zeros((3, 4, 5), bool)
    one[1, 2, 2] = True
    two = one.copy()
    neighbour = [1, 2, 2]
    neighbour[axis] += 1
    two[tuple(neighbour)] = True
    pred, ref = (two, one) if extra == "pred" else (one, two)
    m = region_metrics(pred, ref, spacing)
    assert m.hd95 == pytest.approx(0.9 * spacing[axis], abs=1e-12)
    assert m.dice == pytest.approx(2 / 3, abs=1e-12)
    assert m.sensitivity == (1.0 if extra == "pred" else 0.5)
    assert m.specificity == pytest.approx(58 / 59 if extra == "pred" else 1.0, abs=1e-12)


# The helpers below only make the metrics fast (a small box, a short list of offsets, a padded
# surface): a wrong one still gives the right numbers, only slower or with more memory, so their
# documented contracts are checked directly.


def test_bbox_is_the_smallest_box_plus_one_voxel_clipped_to_the_array() -> None:
    from brats_lab.evaluation.metrics import _bbox

    mask = np.zeros((6, 7, 8), bool)
    assert _bbox(mask) is None
    mask[2, 3, 4] = mask[3, 5, 4] = True
    # By hand: z 2..3, y 3..5, x 4..4, one more voxel on each side, y clipped at 7.
    assert [s.indices(n) for s, n in zip(_bbox(mask), mask.shape)] == [(1, 5, 1), (2, 7, 1), (3, 6, 1)]
    corner = np.zeros((6, 7, 8), bool)
    corner[0, 6, 7] = True  # on three faces: the box stops at the array
    assert [s.indices(n) for s, n in zip(_bbox(corner), corner.shape)] == [(0, 2, 1), (5, 7, 1), (6, 8, 1)]


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5), (0.8, 3.0, 1.25)])
def test_neighbourhood_lists_every_offset_within_three_finest_voxels_nearest_first(spacing) -> None:
    from fractions import Fraction

    from brats_lab.evaluation.metrics import _neighbourhood, _offset_distances

    offsets = _neighbourhood(np.array(spacing))
    # Brute force in exact arithmetic over -3..3 per axis (no axis is finer than the finest):
    # |offset * spacing|^2 <= (3 * finest spacing)^2.
    sp = [Fraction(s) for s in spacing]
    grid = [tuple(a - 3 for a in o) for o in np.ndindex(7, 7, 7)]
    expected = [o for o in grid if sum((a * s) ** 2 for a, s in zip(o, sp)) <= (3 * min(sp)) ** 2]
    assert sorted(map(tuple, offsets.tolist())) == expected
    if spacing == (1.0, 1.0, 1.0):
        assert len(offsets) == 123  # the count the docstring gives
    assert np.all(np.diff(_offset_distances(offsets, np.array(spacing))) >= 0)


def test_surface_is_the_mask_minus_its_erosion_zero_padded() -> None:
    from brats_lab.evaluation.metrics import _surface

    rng = np.random.default_rng(5)
    mask = blobs(rng, (9, 10, 11), sigma=1.5, fraction=0.4)
    mask[0, 2:6, 3:8] = True  # on a face of the array: surface there (border_value=0)
    pad = np.array([1, 2, 3])
    # medpy's surface: mask XOR its erosion by the 6-neighbourhood, voxels outside the array
    # counted as background.
    expected = mask ^ ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1), border_value=0)
    np.testing.assert_array_equal(_surface(mask, pad), np.pad(expected, [(p, p) for p in pad]))


# --- metric_direction: the one declared direction of every metric -------------------------------

# Written out by hand, not read from DIRECTIONS: which way each metric brats-lab logs is better.
EXPECTED_DIRECTIONS = {
    "dice": "higher", "sensitivity": "higher", "specificity": "higher", "hd95": "lower",
    "lesion_dice": "higher", "lesion_hd95": "lower", "volume_dice": "higher", "volume_hd95": "lower",
    "lesion_tp": "higher", "lesion_fp": "lower", "lesion_fn": "lower",
}


def test_every_metric_brats_lab_scores_has_its_direction_declared() -> None:
    assert set(DIRECTIONS) == set(METRICS) | set(LESION_METRICS) == set(EXPECTED_DIRECTIONS)
    # Every region a rule set scores is a region suffix the lookup knows.
    assert {r for rules in RULES.values() for r in rules.regions} <= set(METRIC_REGIONS)


@pytest.mark.parametrize("metric", sorted(EXPECTED_DIRECTIONS))
def test_a_metrics_direction_is_the_same_alone_per_region_and_as_a_fold_run_logs_it(metric: str) -> None:
    expected = EXPECTED_DIRECTIONS[metric]
    names = [metric, *(f"{p}{metric}_{r}" for p in ("", "final_", "val_") for r in ("ET", "TC", "WT", "GTV"))]
    assert [metric_direction(n) for n in names] == [expected] * len(names)
    assert [lower_is_better(n) for n in names] == [expected == "lower"] * len(names)


@pytest.mark.parametrize(
    "name, hint",
    [
        ("dice_wt", "did you mean 'dice_WT'?"),  # region in the wrong case
        ("final_lesion_hd95_wt", "did you mean 'final_lesion_hd95_WT'?"),
        ("HD95", "did you mean 'hd95'?"),
        ("dice_XX", ""),  # no such region
        ("dice_ET_tta", ""),
        ("hd95_", ""),
        ("loss", ""),  # logged, but not a score: no direction declared
        ("final_", ""),
        ("", ""),
    ],
)
def test_an_unknown_metric_is_refused_with_the_known_ones(name: str, hint: str) -> None:
    with pytest.raises(DataError, match=re.escape(f"unknown metric {name!r}: expected one of dice, sensitivity, specificity, hd95, "
                                                  "lesion_dice, lesion_hd95, volume_dice, volume_hd95, lesion_tp, lesion_fp, "
                                                  "lesion_fn, alone or with a region suffix _ET, _TC, _WT, _GTV") + f".*{re.escape(hint)}"):
        metric_direction(name)
