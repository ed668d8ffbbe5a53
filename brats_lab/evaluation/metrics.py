"""Dice, sensitivity, specificity and HD95 per case and region, as the BraTS 2020 challenge scored.

The rules are those of `shared/reference/brats_conventions.md`; HD95 is medpy's `hd95` (pooled
symmetric surface distances, 95th percentile), to float precision, and so are Dice, sensitivity
and specificity wherever medpy defines them. Where a mask is empty the BraTS rules decide, and no
function here ever returns NaN or inf.

Speed comes from touching the whole volume only to find where the masks are: everything else
(confusion counts, surfaces, distances) is computed inside the bounding box of the union of the
two masks plus a one-voxel margin. That is exact, not an approximation:
- outside the box both masks are empty, so the voxels there are true negatives, counted as
  `total - TP - FP - FN`;
- a surface voxel is a mask voxel with a 6-neighbour outside the mask (medpy: `mask XOR
  binary_erosion(mask, 6-connectivity, border_value=0)`). The margin holds the neighbours of
  every mask voxel, and where the box was clipped at the image border the missing neighbours
  count as background in both the box and the image, so the surfaces are the same voxels;
- medpy's distance of a surface voxel of A is the Euclidean distance (in mm) to the nearest
  surface voxel of B, all of which lie in the box, read from a distance transform of the whole
  volume. We instead probe the offsets around each surface voxel of A, nearest first (most of a
  prediction's surface lies within a voxel or two of the reference's), and hand the few voxels
  still unsettled a few voxels out to a k-d tree over B's surface. Same nearest voxel, and the
  distance is computed from the integer offset exactly as scipy's transform computes it.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
from scipy.spatial import cKDTree

from brats_lab import DataError
from brats_lab.labels import REGIONS, LabelConvention



def empty_hd95(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """HD95 when exactly one of the two masks is empty: the diagonal of the image in mm,
    sqrt(sum((n * s)^2)) over its axes (`shape` in voxels, `spacing` in mm, same axis order).

    CaPTk (`GetBraTSLabelStatistics`, cbicaITKUtilities.h) takes the diagonal of the image's voxel
    grid, sqrt(nx^2 + ny^2 + nz^2), without the spacing: the same number on a 1 mm grid, which
    every BraTS image is (373.1287 at 240 x 240 x 155, 15.65 at 8 x 9 x 10). Elsewhere we scale by
    the spacing, so that the penalty is a length in mm like every other HD95, the longest distance
    the image holds, and the same for a field of view at any resolution.
    """
    return math.sqrt(sum((n * s) ** 2 for n, s in zip(shape, spacing)))


# The BraTS grid's diagonal (240 x 240 x 155 at 1 mm: 373.1287 mm): what a case that could not be
# scored (no prediction, an unreadable file) gets, since there is no image to take one of.
EMPTY_HD95 = empty_hd95((155, 240, 240), (1.0, 1.0, 1.0))

METRICS: tuple[str, ...] = ("dice", "sensitivity", "specificity", "hd95")

# Which way each metric brats-lab scores is better: the one place that says so (ranking, top-k
# choice, patient removal and the verdict all ask `metric_direction`). The lesion-wise ones are
# `lesionwise.LESION_METRICS`, spelt here because lesionwise imports this module.
DIRECTIONS: dict[str, Literal["higher", "lower"]] = {
    "dice": "higher",
    "sensitivity": "higher",
    "specificity": "higher",
    "hd95": "lower",
    "lesion_dice": "higher",
    "lesion_hd95": "lower",
    "volume_dice": "higher",
    "volume_hd95": "lower",
    "lesion_tp": "higher",  # reference lesions found
    "lesion_fp": "lower",  # predicted lesions matching none
    "lesion_fn": "lower",  # reference lesions missed
}
# The region suffixes of a metric column: ET, TC, WT, and GTV (the only region of the BraTS
# meningioma radiotherapy rules, `lesionwise.RULES["men-rt"]`).
METRIC_REGIONS: tuple[str, ...] = (*REGIONS, "GTV")
# A fold run logs `final_<column>` (its final model on the held-out cases) and `val_<column>` (per epoch).
_RUN_PREFIXES = ("final_", "val_")


@dataclass(frozen=True)
class RegionMetrics:
    """The four BraTS metrics of one region of one case. HD95 in mm."""

    dice: float
    sensitivity: float
    specificity: float
    hd95: float

    def as_dict(self) -> dict[str, float]:
        return {m: getattr(self, m) for m in METRICS}


def metric_direction(name: str) -> Literal["higher", "lower"]:
    """"higher" or "lower": which way the metric `name` is better, from `DIRECTIONS`.

    `name` is a metric (`dice`, `lesion_hd95`), a per-case column (`hd95_WT`), or a metric a fold
    run logs (`final_lesion_fp_ET`, `val_dice_WT`). Names are exact: `dice_wt` or `HD95` is not a
    metric. Raises DataError for an unknown name, listing the known ones.
    """
    base = name
    for prefix in _RUN_PREFIXES:
        if base.startswith(prefix):
            base = base[len(prefix):]
            break
    metric, _, region = base.rpartition("_")
    if not (metric in DIRECTIONS and region in METRIC_REGIONS):
        metric = base
    if metric not in DIRECTIONS:
        known = [*DIRECTIONS, *(f"{m}_{r}" for m in DIRECTIONS for r in METRIC_REGIONS)]
        # The commonest slip is the case of the region (`dice_wt`): suggest that first.
        close = [k for k in known if k.lower() == base.lower()] or difflib.get_close_matches(base, known, n=1)
        hint = f"; did you mean {name[:len(name) - len(base)] + close[0]!r}?" if close else ""
        raise DataError(f"unknown metric {name!r}: expected one of {', '.join(DIRECTIONS)}, alone or with a region "
                        f"suffix {', '.join('_' + r for r in METRIC_REGIONS)} (e.g. dice_WT, lesion_hd95_ET){hint}")
    return DIRECTIONS[metric]


def lower_is_better(name: str) -> bool:
    """True for a metric where lower is better (HD95, lesion false positives...); see `metric_direction`."""
    return metric_direction(name) == "lower"


def ranking_metrics(columns: Iterable[str]) -> tuple[str, str]:
    """The Dice and HD95 metrics that rank cases and compare arms, by the rules of the data:
    lesion-wise (`lesion_dice`, `lesion_hd95`) when the per-case table's `columns` have them (2023+
    labels, see `lesionwise.py`), else the BraTS 2020 `dice` and `hd95`. A DataFrame iterates over
    its column names, so `ranking_metrics(per_case)` reads."""
    if any(str(c).startswith("lesion_dice_") for c in columns):
        return ("lesion_dice", "lesion_hd95")
    return ("dice", "hd95")


def dice_from_counts(overlap: int, n_pred: int, n_ref: int) -> float:
    """Dice from voxel counts (true positives, predicted, reference), with the BraTS rule for
    empty masks: both empty is a perfect score, 1. For callers that count on their own (the
    trainer's per-epoch validation counts on the GPU)."""
    if n_pred == 0 and n_ref == 0:
        return 1.0
    return 2.0 * overlap / (n_pred + n_ref)


def region_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> RegionMetrics:
    """BraTS 2020 metrics of a predicted binary mask against the reference mask.

    `pred` and `ref` are boolean (or 0/1) arrays of the same shape, (z, y, x) for a volume;
    `spacing` is the voxel size in mm in the same axis order.

    Empty masks (medpy raises for HD95 and returns NaN for sensitivity there):
    - both empty: Dice 1, sensitivity 1, specificity 1, HD95 0 (nothing to find, nothing found);
    - reference empty, prediction not: Dice 0, HD95 the image's diagonal (`empty_hd95`),
      specificity TN / (TN + FP) as usual, and sensitivity 0. Sensitivity TP / (TP + FN) is 0/0 here; the challenge's scorer
      (CaPTk, `GetBraTSLabelStatistics` in `cbicaITKUtilities.h`) replaces that NaN with 0 when
      exactly one of the two masks is empty and with 1 only when both are, and so do we: a
      prediction of tumour where there is none scores 0 (BraTS 2020 has ~15-20% of cases
      without ET, so this rule moves mean ET sensitivity);
    - prediction empty, reference not: Dice 0, sensitivity 0, specificity as usual, HD95
      the image's diagonal;
    - specificity when the reference fills the whole volume (no negatives, 0/0): 1, for the same
      reason.
    """
    pred, ref = _as_masks(pred, ref, spacing)
    box = _bbox(pred | ref)
    if box is None:
        return _score(0, 0, 0, pred.shape, None, None, spacing)
    return _score_box(pred[box], ref[box], pred.shape, spacing, tight=True)


def case_metrics(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    spacing_zyx: Sequence[float],
    convention: LabelConvention,
) -> dict[str, RegionMetrics]:
    """Metrics of every region of `convention` (ET, TC, WT), keyed by region name.

    Both label maps are (z, y, x) in the same geometry. A prediction holding a label the
    convention does not know raises ValueError naming the labels: a 2023-style map (ET = 3)
    scored as 2020 would otherwise silently lose its enhancing tumour. The reference is not
    checked here; `brats-lab data check` does that.
    """
    pred_labels = np.asarray(pred_labels)
    ref_labels = np.asarray(ref_labels)
    _check_arguments(pred_labels, ref_labels, spacing_zyx)
    # One pass over the full volumes to find where anything is; all else happens in that box.
    box = _bbox(_nonzero_union(pred_labels, ref_labels))
    pred_box = pred_labels[box] if box is not None else pred_labels.ravel()[:0]
    ref_box = ref_labels[box] if box is not None else ref_labels.ravel()[:0]
    _check_labels(pred_box, convention)
    return {
        region: _score_box(_isin(pred_box, labels), _isin(ref_box, labels), pred_labels.shape, spacing_zyx, tight=False)
        for region, labels in convention.regions.items()
    }


def _check_labels(labels: np.ndarray, convention: LabelConvention) -> None:
    # Counting the known labels is several times faster than np.unique on the box; the unknown
    # values are only looked up when there are some.
    known = [v for v in convention.allowed if v != 0]
    if sum(int(np.count_nonzero(labels == v)) for v in known) == int(np.count_nonzero(labels)):
        return
    unknown = np.unique(labels[~np.isin(labels, list(convention.allowed))])
    raise ValueError(
        f"prediction holds labels {[v.item() for v in unknown]} unknown to the {convention.name} "
        f"convention (expected {sorted(convention.allowed)})"
    )


def _as_masks(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    _check_arguments(pred, ref, spacing)
    return pred.astype(bool, copy=False), ref.astype(bool, copy=False)


def _check_arguments(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> None:
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != pred.ndim:
        raise ValueError(f"spacing {tuple(spacing)} has {len(spacing)} values for a {pred.ndim}-d array")
    if not all(np.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing {tuple(spacing)} must be positive and finite (mm)")


def _nonzero_union(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if a.dtype == b.dtype and a.dtype.kind in "ub":
        return np.bitwise_or(a, b)  # one pass, no two temporary masks
    return (a != 0) | (b != 0)


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of the nonzero voxels plus a 1-voxel margin, clipped to the array; None if empty."""
    box: list[slice] = []
    for axis in range(mask.ndim):
        # Reduce over the other axes of the part already known to hold the object: each axis after
        # the first looks at a smaller block.
        view = mask[tuple(box)] if box else mask
        other = tuple(a for a in range(mask.ndim) if a != axis)
        profile = np.flatnonzero(view.any(axis=other) if other else view)
        if profile.size == 0:
            return None
        # Only earlier axes are sliced, so indices along this axis are absolute.
        box.append(slice(int(profile[0]), int(profile[-1]) + 1))
    # Add the margin after the search so the reductions above stay on the tight box.
    return tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(box, mask.shape))


def _isin(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    out = labels == values[0]
    for v in values[1:]:
        out |= labels == v
    return out


def _score_box(
    pred: np.ndarray, ref: np.ndarray, shape: Sequence[int], spacing: Sequence[float], tight: bool
) -> RegionMetrics:
    """Metrics of two masks cut from volumes of `shape`, by a box that holds both masks
    and a 1-voxel margin (or the image border); `tight` says it is also the smallest such box."""
    tp = int(np.count_nonzero(pred & ref))
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    if not tight and n_pred and n_ref and n_pred + n_ref - 2 * tp:
        # A region's box within the case's box (ET's is much smaller than WT's): the surface work
        # scales with the box. Still exact: the margin is clipped to a box that reaches the image
        # border wherever this one does.
        sub = _bbox(pred | ref)
        pred, ref = pred[sub], ref[sub]
    return _score(tp, n_pred - tp, n_ref - tp, shape, pred, ref, spacing)


def _score(
    tp: int, fp: int, fn: int, shape: Sequence[int], pred: np.ndarray | None, ref: np.ndarray | None, spacing: Sequence[float]
) -> RegionMetrics:
    tn = math.prod(shape) - tp - fp - fn
    n_pred, n_ref = tp + fp, tp + fn
    if n_pred == 0 and n_ref == 0:
        return RegionMetrics(dice=1.0, sensitivity=1.0, specificity=1.0, hd95=0.0)
    dice = 2.0 * tp / (n_pred + n_ref)
    sensitivity = tp / n_ref if n_ref else 0.0  # CaPTk: 0/0 with exactly one mask empty -> 0
    specificity = tn / (tn + fp) if tn + fp else 1.0
    if n_pred == 0 or n_ref == 0:
        hd95 = empty_hd95(shape, spacing)
    elif fp == 0 and fn == 0:
        hd95 = 0.0  # identical masks: every surface distance is 0
    else:
        hd95 = _hd95(pred, ref, spacing)  # type: ignore[arg-type]  # not None: both masks hold voxels here
    return RegionMetrics(dice=dice, sensitivity=sensitivity, specificity=specificity, hd95=hd95)


def _hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """medpy's hd95 of two non-empty masks whose outer layer is empty or lies on the image border."""
    sp = np.asarray(spacing, dtype=np.float64)
    offsets = _neighbourhood(sp)
    pad = offsets.max(axis=0)  # so that every probe idx + offset stays inside the padded array
    surf_pred = _surface(pred, pad)
    surf_ref = _surface(ref, pad)
    distances = (
        _nearest_distances(surf_pred, surf_ref, offsets, sp),
        _nearest_distances(surf_ref, surf_pred, offsets, sp),
    )
    # medpy: numpy.percentile(numpy.hstack((hd1, hd2)), 95); the order of the pooled values is
    # irrelevant to a percentile.
    return float(np.percentile(np.concatenate(distances), 95))


def _surface(mask: np.ndarray, pad: np.ndarray) -> np.ndarray:
    """The voxels of `mask` with a 6-neighbour outside it, zero-padded by `pad` voxels per axis.

    The same voxels as medpy's `mask ^ binary_erosion(mask, generate_binary_structure(ndim, 1))`;
    a voxel on the array's edge has a neighbour outside, as erosion's border_value=0 says.
    """
    eroded = mask.copy()
    for axis in range(mask.ndim):
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[axis], hi[axis] = slice(None, -1), slice(1, None)
        eroded[tuple(hi)] &= mask[tuple(lo)]
        eroded[tuple(lo)] &= mask[tuple(hi)]
        lo[axis], hi[axis] = 0, -1  # type: ignore[call-overload]  # an int index: the border plane
        eroded[tuple(lo)] = False
        eroded[tuple(hi)] = False
    out = np.zeros(tuple(n + 2 * p for n, p in zip(mask.shape, pad)), dtype=bool)
    inner = tuple(slice(p, p + n) for n, p in zip(mask.shape, pad))
    np.greater(mask, eroded, out=out[inner])  # mask & ~eroded
    return out


def _neighbourhood(spacing: np.ndarray) -> np.ndarray:
    """Integer offsets (n, ndim) within 3 voxels of the finest axis of the origin, nearest first.

    Every offset within that radius is listed, so the first offset (in this order) that reaches a
    surface voxel gives the exact nearest distance, and a voxel that none reaches has its nearest
    surface voxel farther out. In 3-D that is at most 123 offsets (isotropic spacing).
    """
    radius = 3.0 * float(spacing.min())
    reach = np.floor(radius / spacing).astype(int)
    grids = np.meshgrid(*[np.arange(-k, k + 1) for k in reach], indexing="ij")
    offsets = np.stack([g.ravel() for g in grids], axis=1)
    dist = _offset_distances(offsets, spacing)
    inside = dist <= radius
    order = np.argsort(dist[inside], kind="stable")
    return offsets[inside][order]


def _offset_distances(offsets: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Length in mm of integer offsets (n, ndim), computed as scipy's distance_transform_edt does
    (scale each axis, square, add in axis order, square root), so the values match medpy's bit
    for bit."""
    d = offsets.T.astype(np.float64)
    for axis in range(len(spacing)):
        d[axis] *= spacing[axis]
    np.multiply(d, d, d)
    return np.sqrt(np.add.reduce(d, axis=0))


def _nearest_distances(src: np.ndarray, dst: np.ndarray, offsets: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distance in mm from every True voxel of `src` to the nearest True voxel of `dst`.

    Most surface voxels of a prediction lie within a voxel or two of the reference surface, so
    probing the nearest offsets first settles them with a few gathers each; the few left (a
    distant false positive, a missed lobe) go to a k-d tree over the `dst` voxels.
    """
    strides = np.array(dst.strides) // dst.itemsize
    flat_offsets = offsets @ strides
    dst_flat = dst.ravel()
    todo = np.flatnonzero(src)  # flat indices of the surface voxels still without a distance
    out = np.empty(todo.size, dtype=np.float64)
    where = np.arange(todo.size)  # position in `out` of each entry of `todo`
    shell_dist = _offset_distances(offsets, spacing)
    i = 0
    while i < len(offsets) and todo.size:
        # One shell: all offsets at the same distance; a voxel found in it is settled.
        j = i + 1
        while j < len(offsets) and shell_dist[j] == shell_dist[i]:
            j += 1
        hit = dst_flat[todo + flat_offsets[i]]
        for k in range(i + 1, j):
            hit |= dst_flat[todo + flat_offsets[k]]
        out[where[hit]] = shell_dist[i]
        todo, where = todo[~hit], where[~hit]
        i = j
    if todo.size:
        targets = np.stack(np.unravel_index(np.flatnonzero(dst), dst.shape), axis=1)
        probes = np.stack(np.unravel_index(todo, dst.shape), axis=1)
        nearest = cKDTree(targets * spacing, leafsize=32, balanced_tree=False, compact_nodes=False).query(
            probes * spacing, k=1
        )[1]
        # Recompute from integer offsets so these distances too are computed as medpy computes them.
        out[where] = _offset_distances(targets[nearest] - probes, spacing)
    return out
