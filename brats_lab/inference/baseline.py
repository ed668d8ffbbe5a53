"""A non-learned intensity-threshold segmenter: the floor any trained model must beat.

It reads the same files the models do and writes label maps the same way, so `brats-lab evaluate`
can be tried end to end before anything is trained.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from brats_lab import DataError
from brats_lab.data.cases import MODALITIES, Case
from brats_lab.data.preprocess import paste_back, preprocess_case
from brats_lab.io import write_image


@dataclass(frozen=True)
class Thresholds:
    """In standard deviations of each modality's brain voxels (pipeline B's z-score)."""

    flair_wt: float = 1.5  # edema and tumour are FLAIR-bright...
    flair_seed: float = 2.5  # ...and their brightest part is brighter than any normal tissue
    t1ce_et: float = 2.0  # enhancing tumour is T1ce-bright


def segment(images: np.ndarray, thresholds: Thresholds = Thresholds()) -> np.ndarray:
    """Z-scored images (4, z, y, x) -> boolean regions (3, z, y, x): ET, TC, WT."""
    flair, t1ce = images[MODALITIES.index("flair")], images[MODALITIES.index("t1ce")]
    wt = _grow(flair, thresholds.flair_seed, thresholds.flair_wt)
    et = wt & (t1ce > thresholds.t1ce_et)
    # The core is what the enhancing rim encloses (necrosis), so fill the rim's holes slice by slice.
    tc = np.stack([ndimage.binary_fill_holes(s) for s in et]) & wt
    return np.stack([et, tc | et, wt | tc | et])


def _grow(image: np.ndarray, seed_level: float, level: float) -> np.ndarray:
    """Hysteresis: the region above `level` connected to the brightest blob above `seed_level`.

    Grey matter also crosses the lower level in places; only the tumour has a large blob above
    the higher one.
    """
    seeds, n = ndimage.label(image > seed_level)
    if n == 0:
        return np.zeros(image.shape, dtype=bool)
    weight = ndimage.sum_labels(image, seeds, index=np.arange(1, n + 1))
    seed = seeds == 1 + int(np.argmax(weight))
    regions, _ = ndimage.label(image > level)
    return np.isin(regions, np.unique(regions[seed]))


def predict_case(case: Case, out: Path, thresholds: Thresholds = Thresholds()) -> Path:
    """Segment one case and write `<out>/<case id>.nii.gz` in the case's original geometry."""
    pre = preprocess_case(case, "zscore")
    regions = segment(pre.images, thresholds)
    labels = paste_back(case.convention.from_regions(regions), pre.bbox, pre.geometry.shape)
    path = Path(out) / f"{case.id}.nii.gz"
    write_image(labels.astype(np.uint8), pre.geometry, path)
    return path


def predict_folder(
    cases: list[Case], out: Path, thresholds: Thresholds = Thresholds(), progress: bool = True
) -> tuple[list[Path], list[str]]:
    """Segment every case; a case that fails is reported by name and the others go on."""
    written, failures = [], []
    iterator = cases
    if progress:
        iterator = tqdm(cases, desc="baseline", unit="case")
    for case in iterator:
        try:
            written.append(predict_case(case, out, thresholds))
        except DataError as e:
            failures.append(str(e))
    return written, failures
