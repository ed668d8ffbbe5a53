"""Preprocessing of one case, in numpy: normalisation (pipelines A and B), brain crop, patches, paste-back.

Arrays are (z, y, x), or (C, z, y, x) with channels first; every spatial helper works on the last
three axes so the same call serves images (4, z, y, x), label maps (z, y, x) and regions (3, z, y, x).

Randomness follows one rule: sample parameters with a numpy Generator (`sample_crop`), then call a
deterministic function with them (`crop`), so every patch can be replayed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from brats_lab import DataError
from brats_lab.config import MODEL_STRIDE
from brats_lab.data.cases import MODALITIES, Case
from brats_lab.io import Geometry, read_volume
from brats_lab.labels import LabelConvention

METHODS: tuple[str, ...] = ("minmax", "zscore")  # pipeline A, pipeline B
PERCENTILES: tuple[float, float] = (1.0, 99.0)  # minmax clipping, of the non-zero voxels
BBOX_MARGIN = 1  # voxels kept around the brain on each side (the seed code kept one before)
# Bump when preprocess_case's output changes for the same input: caches built before then rebuild.
PREPROCESS_VERSION = 2  # 2: huge or tiny intensities no longer zero a channel

BBox = tuple[slice, slice, slice]  # (z, y, x), into the original volume


# --- normalisation ---------------------------------------------------------------------------


def normalize(volume: np.ndarray, method: str) -> np.ndarray:
    """One modality (z, y, x) -> float32, normalised on its non-zero (brain) voxels; background stays 0.

    - "minmax" (pipeline A): clip to the 1st/99th percentiles of the non-zero voxels, then scale
      that range to [0, 1]. When the two percentiles agree although the brain is not constant
      (more than 98% of it at one value), the full range is used instead, so what varies is kept.
    - "zscore" (pipeline B): subtract the mean and divide by the std of the non-zero voxels.

    Only non-zero voxels change, so the background stays exactly 0 whatever the intensities. Any
    finite input gives a finite output: the statistics are taken in float64 after dividing by a
    power of two that brings the largest magnitude into [0.5, 1), which is exact (ordinary
    intensities give the same bits as without it) and keeps values near the float64 limits
    (1e300, 1e-310) from overflowing the variance or underflowing. An all-zero modality stays
    zeros and a constant one becomes zeros (no division by zero); `preprocess_case` refuses both
    (`flat_channel`) and `data check` reports them. The input is never modified.
    """
    if method not in METHODS:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {METHODS}")
    out = np.zeros(volume.shape, dtype=np.float32)
    brain = volume != 0
    # float64 for the statistics: float32 sums over millions of voxels lose digits.
    values = volume[brain].astype(np.float64)
    if values.size == 0:
        return out
    values = np.ldexp(values, -int(np.frexp(np.abs(values).max())[1]))
    if method == "minmax":
        low, high = np.percentile(values, PERCENTILES)
        if high == low:
            low, high = values.min(), values.max()
        if high > low:
            out[brain] = (np.clip(values, low, high) - low) / (high - low)
    else:
        mean, std = values.mean(), values.std()
        if std > 0:
            out[brain] = (values - mean) / std
    return out


def flat_channel(volume: np.ndarray) -> str | None:
    """Why `normalize` would turn this modality into an all-zero channel (every voxel zero, or
    every non-zero voxel one value); None when it would not. A blank channel would train and
    predict as if it were data."""
    values = volume[volume != 0]
    if values.size == 0:
        return "all voxels are zero"
    if values.min() == values.max():
        return (f"every non-zero voxel has the value {values.flat[0]:g} ({values.size} voxels): "
                "normalised, the modality would be all zeros")
    return None


# --- brain bounding box and paste-back -------------------------------------------------------


def brain_bbox(images: np.ndarray, margin: int = BBOX_MARGIN) -> BBox:
    """Smallest box (z, y, x slices) holding every voxel that is non-zero in any channel, plus `margin`.

    `images` is (C, z, y, x) or (z, y, x). The margin is clipped to the volume. Raises DataError
    when there is no non-zero voxel at all.
    """
    if images.ndim < 3:
        raise ValueError(f"expected (C, z, y, x) or (z, y, x), got shape {images.shape}")
    mask = np.any(images != 0, axis=tuple(range(images.ndim - 3))) if images.ndim > 3 else images != 0
    if not mask.any():
        raise DataError("no non-zero voxel in any modality: empty image, no brain to crop to")
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(int(hits[0]) - margin, 0), min(int(hits[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def crop_to_bbox(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """The box's voxels of the last three axes (a view)."""
    return array[(..., *bbox)]


def paste_back(pred_crop: np.ndarray, bbox: BBox, original_shape: Sequence[int]) -> np.ndarray:
    """Put a (..., z, y, x) crop back at `bbox` in a zero canvas of the original (z, y, x) shape.

    Keeps the crop's dtype and leading axes: a label map stays a label map, regions stay regions.
    """
    extent = tuple(s.stop - s.start for s in bbox)
    if tuple(pred_crop.shape[-3:]) != extent:
        raise ValueError(f"crop shape {pred_crop.shape[-3:]} does not match the box {extent} (z, y, x)")
    if any(s.stop > n for s, n in zip(bbox, original_shape)):
        raise ValueError(f"box {bbox_to_list(bbox)} does not fit in the shape {tuple(original_shape)}")
    out = np.zeros((*pred_crop.shape[:-3], *original_shape), dtype=pred_crop.dtype)
    out[(..., *bbox)] = pred_crop
    return out


def label_map(regions: np.ndarray, pads: Pads, convention: LabelConvention, bbox: BBox, original_shape: Sequence[int]) -> np.ndarray:
    """The uint8 label map, in the case's original (z, y, x) shape, of region masks (3, Z, Y, X:
    ET, TC, WT) predicted on a brain crop padded by `pad_to_multiple` with `pads`: unpadded, the
    labels rebuilt from the regions (`convention.from_regions`) and pasted back at `bbox`.
    `brats-lab predict` and the trainer's final scoring both go this way, so validation scores
    exactly what `predict` writes."""
    return paste_back(convention.from_regions(unpad(regions, pads)), bbox, original_shape)  # uint8, as from_regions makes it


def bbox_to_list(bbox: BBox) -> list[list[int]]:
    """[[start, stop], ...] for JSON."""
    return [[int(s.start), int(s.stop)] for s in bbox]


def bbox_from_list(values: Sequence[Sequence[int]]) -> BBox:
    return tuple(slice(int(a), int(b)) for a, b in values)  # type: ignore[return-value]


# --- padding and patches ---------------------------------------------------------------------

Pads = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]  # (before, after) per z, y, x


def pad_to_multiple(array: np.ndarray, multiple: int = MODEL_STRIDE) -> tuple[np.ndarray, Pads]:
    """Zero-pad the end of each spatial axis up to a multiple of `multiple` (by default
    `config.MODEL_STRIDE`, 8: the networks halve the size three times; callers pass
    `data.pad_multiple`). Returns the padded array and the pads `unpad` needs."""
    if multiple < 1:
        raise ValueError(f"multiple must be >= 1, got {multiple}")
    pads = tuple((0, -n % multiple) for n in array.shape[-3:])
    return _pad(array, pads), pads  # type: ignore[return-value]


def unpad(array: np.ndarray, pads: Pads) -> np.ndarray:
    """Inverse of `pad_to_multiple` (or of any (before, after) padding of the last three axes)."""
    index = tuple(slice(before, n - after) for (before, after), n in zip(pads, array.shape[-3:]))
    return array[(..., *index)]  # type: ignore[arg-type]


def _pad(array: np.ndarray, pads: Sequence[tuple[int, int]]) -> np.ndarray:
    if not any(b or a for b, a in pads):
        return array
    return np.pad(array, [(0, 0)] * (array.ndim - 3) + [tuple(p) for p in pads])


@dataclass(frozen=True)
class CropParams:
    """Where a fixed-size patch sits: per spatial axis, the first voxel taken from the volume and the
    zeros added before and after (non-zero only on axes smaller than the patch)."""

    starts: tuple[int, int, int]
    sizes: tuple[int, int, int]  # voxels taken from the volume per axis
    pads: Pads


def sample_crop(shape: Sequence[int], size: int | Sequence[int], rng: np.random.Generator) -> CropParams:
    """Draw a patch position for a volume of spatial `shape` (z, y, x) and a patch of `size`.

    Axes longer than the patch get a uniform random start; shorter axes are taken whole and
    zero-padded to the patch size with a random before/after split (as the seed code did).
    """
    sizes = (size,) * 3 if isinstance(size, int) else tuple(size)
    if len(shape) != 3 or len(sizes) != 3:
        raise ValueError(f"expected 3 spatial axes, got shape {tuple(shape)} and size {sizes}")
    starts, taken, pads = [], [], []
    for n, s in zip(shape, sizes):
        if n >= s:
            starts.append(int(rng.integers(0, n - s + 1)))
            taken.append(s)
            pads.append((0, 0))
        else:
            before = int(rng.integers(0, s - n + 1))
            starts.append(0)
            taken.append(n)
            pads.append((before, s - n - before))
    return CropParams(tuple(starts), tuple(taken), tuple(pads))  # type: ignore[arg-type]


def crop(array: np.ndarray, params: CropParams) -> np.ndarray:
    """Apply a sampled patch to the last three axes of `array` (deterministic)."""
    index = tuple(slice(a, a + n) for a, n in zip(params.starts, params.sizes))
    return _pad(array[(..., *index)], params.pads)  # type: ignore[arg-type]


def random_crop(
    images: np.ndarray, target: np.ndarray | None, size: int | Sequence[int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """The same random fixed-size patch of images (C, z, y, x) and target (..., z, y, x) (training)."""
    if target is not None and target.shape[-3:] != images.shape[-3:]:
        raise ValueError(f"images {images.shape} and target {target.shape} differ in (z, y, x)")
    params = sample_crop(images.shape[-3:], size, rng)
    return crop(images, params), None if target is None else crop(target, params)


# --- one case --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessed:
    """One case, normalised and cropped to the brain.

    `labels` is the cropped label map in the case's own convention (uint8), None without a seg
    file; `regions` derives the network's target from it. `bbox` and `geometry` put a prediction
    back into the original image (`paste_back(pred, bbox, geometry.shape)`, then write with
    `geometry`).
    """

    case_id: str
    images: np.ndarray  # float32 (4, z, y, x), MODALITIES order
    labels: np.ndarray | None  # uint8 (z, y, x)
    bbox: BBox
    geometry: Geometry  # of the original, uncropped images
    convention: LabelConvention

    @property
    def regions(self) -> np.ndarray | None:
        """bool (3, z, y, x) in REGIONS order (ET, TC, WT), or None without labels."""
        return None if self.labels is None else self.convention.to_regions(self.labels)


def preprocess_case(case: Case, method: str) -> Preprocessed:
    """Read a case, check that its files agree, normalise each modality and crop to the brain.

    Raises DataError naming the case and the file: unreadable, missing or duplicated file, not
    3-D, NaN or infinite voxels, an all-zero modality, a modality (or the seg) whose geometry
    differs from the first modality's, labels outside the case's convention.
    """
    if method not in METHODS:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {METHODS}")
    case.require_usable()  # what discovery found: two files for one modality, an unlistable folder
    volumes, geometry = [], None
    for name, path in zip(MODALITIES, case.images):
        array, geo = _read(case, path)
        if geometry is None:
            geometry = geo
        else:
            _check_same_geometry(case, path, geo, geometry, case.images[0])
        if why := flat_channel(array):
            raise DataError(f"{case.id}: {path}: {why}")
        channel = normalize(array, method)
        # A guard: for finite, non-constant input `normalize` gives neither; a cache must never
        # hold such a channel silently.
        if not np.isfinite(channel).all() or not channel.any():
            raise DataError(f"{case.id}: {path}: {method} normalisation gave a "
                            f"{'non-finite' if not np.isfinite(channel).all() else 'all-zero'} channel "
                            f"(intensities {array.min():g} to {array.max():g})")
        volumes.append(channel)
    assert geometry is not None
    # Stacking after the check: a shape mismatch would otherwise surface as a bare numpy error.
    images = np.stack(volumes)
    labels = None
    if case.seg is not None:
        seg, geo = _read(case, case.seg)
        _check_same_geometry(case, case.seg, geo, geometry, case.images[0])
        bad = sorted(set(np.unique(seg).tolist()) - case.convention.allowed)
        if bad:
            raise DataError(
                f"{case.id}: {case.seg}: unexpected label values {bad} "
                f"(expected {sorted(case.convention.allowed)}, {case.convention.name} convention)"
            )
        labels = seg.astype(np.uint8)
    try:
        bbox = brain_bbox(images)
    except DataError as e:
        raise DataError(f"{case.id}: {', '.join(str(p) for p in case.images)}: {e}") from None
    return Preprocessed(
        case_id=case.id,
        images=np.ascontiguousarray(crop_to_bbox(images, bbox)),
        labels=None if labels is None else np.ascontiguousarray(crop_to_bbox(labels, bbox)),
        bbox=bbox,
        geometry=geometry,
        convention=case.convention,
    )


def _read(case: Case, path: Path) -> tuple[np.ndarray, Geometry]:
    try:
        return read_volume(path)
    except DataError as e:
        raise DataError(f"{case.id}: {e}") from None


def _check_same_geometry(case: Case, path: Path, geo: Geometry, reference: Geometry, reference_path: Path) -> None:
    diffs = geo.differences(reference)
    if diffs:
        raise DataError(
            f"{case.id}: {path}: geometry differs from {reference_path.name}: {'; '.join(diffs)}"
        )
