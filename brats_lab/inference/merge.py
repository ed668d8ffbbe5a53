"""The paper's second pass (merging the label maps of pipelines A and B) and the small-ET rule.

Labels are never written as numbers here: each tissue's label is what the convention's own
`from_regions` paints for that tissue's region pattern, so the same code serves BraTS 2020
(ET = 4) and 2023+ (ET = 3).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from brats_lab import DataError
from brats_lab.io import read_volume, write_image
from brats_lab.labels import REGIONS, LabelConvention


@dataclass(frozen=True)
class Tissues:
    """The label of each tissue class in one convention."""

    background: int  # in no region
    edema: int  # WT only (ED in 2020, SNFH in 2023)
    ncr: int  # TC but not ET (NCR/NET in 2020, NETC in 2023)
    et: int  # ET (and so TC and WT)

    @classmethod
    def of(cls, convention: LabelConvention) -> "Tissues":
        # The region patterns of the four nested tissues, in REGIONS order (ET, TC, WT).
        patterns = {
            "background": (False, False, False),
            "edema": (False, False, True),
            "ncr": (False, True, True),
            "et": (True, True, True),
        }
        channels = np.array(list(patterns.values()), dtype=bool).T  # (3, 4)
        assert channels.shape[0] == len(REGIONS)
        labels = convention.from_regions(channels)
        return cls(**{name: int(label) for name, label in zip(patterns, labels)})


def merge_label_maps(a: np.ndarray, b: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """The second pass of the paper (section 3.4): pipeline A's label map, with B's say on edema.

    In the paper's words: "We hypothesized that models from pipeline B were better for predicting
    edema. To keep the score intact on ET and TC from models A, ET and NET/NCR predicted labels had
    to be left untouched. Accordingly, if models A predicted background or edema and models B
    predicted edema or background respectively, models B predicted labels were kept."

    So, voxel by voxel:

    ========== ========== ==========
    A          B          result
    ========== ========== ==========
    background edema      edema
    edema      background background
    anything else          A
    ========== ========== ==========

    A's ET and NCR/NET are never changed, and B's ET and NCR/NET are never taken, so ET and TC
    are exactly A's; only WT changes. Any other label (e.g. the 2024 resection cavity) is A's.
    Returns a new array with `a`'s dtype.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: A {a.shape}, B {b.shape}")
    _check_labels(a, convention, "A")
    _check_labels(b, convention, "B")
    t = Tissues.of(convention)
    out = a.copy()
    out[(a == t.background) & (b == t.edema)] = t.edema
    out[(a == t.edema) & (b == t.background)] = t.background
    return out


def small_et_to_ncr(labels: np.ndarray, convention: LabelConvention, min_voxels: int) -> np.ndarray:
    """Relabel all predicted ET as NCR/NET when there are fewer than `min_voxels` ET voxels.

    The BraTS 2020 winner's post-processing (Isensee et al., nnU-Net): a case without enhancing
    tumour is scored Dice 1 for an empty ET prediction and 0 for even a single false voxel, so a
    tiny ET prediction is more likely to cost than to gain; they chose the threshold by
    cross-validation. The voxels stay in the tumour core, so TC and WT are unchanged.
    `min_voxels=0` disables the rule (the default of the pipeline). Returns a new array.
    """
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0 (0 disables the rule), got {min_voxels}")
    labels = np.asarray(labels)
    _check_labels(labels, convention, "labels")
    t = Tissues.of(convention)
    out = labels.copy()
    et = labels == t.et
    if np.count_nonzero(et) < min_voxels:
        out[et] = t.ncr
    return out


def _check_labels(labels: np.ndarray, convention: LabelConvention, what: str) -> None:
    unexpected = sorted(_values(labels) - convention.allowed)
    if unexpected:
        raise ValueError(
            f"{what}: labels {unexpected} are not in the {convention.name} convention "
            f"(allowed {sorted(convention.allowed)})"
        )


def _values(labels: np.ndarray) -> set:
    # A full volume has ~9M voxels; counting small non-negative integers is far cheaper than a sort.
    small_ints = labels.dtype.kind in "ui" and labels.dtype.itemsize <= 4  # bincount casts them safely
    if small_ints and labels.size and labels.min() >= 0 and labels.max() < 1024:
        return set(np.flatnonzero(np.bincount(labels.ravel())).tolist())
    return set(np.unique(labels).tolist())


def merge_folders(a_dir: Path, b_dir: Path, out_dir: Path, convention: LabelConvention) -> tuple[list[Path], list[str]]:
    """Merge every `<case>.nii.gz` of `a_dir` with its namesake in `b_dir` into `out_dir`.

    Returns (written, problems): a case missing from B, unreadable, or in another geometry is
    named in `problems` and not written; the others go on.
    """
    a_dir, b_dir = Path(a_dir), Path(b_dir)
    listed = {}
    for folder in (a_dir, b_dir):
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder")
        try:
            listed[folder] = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
        except OSError as e:
            raise DataError(f"{folder}: cannot list the folder ({(e.strerror or str(e)).lower()})") from None
    names = [n for n in listed[a_dir] if n.endswith(".nii.gz")]
    if not names:
        raise DataError(f"{a_dir}: no label maps (<case id>.nii.gz)")
    problems = [f"{b_dir / n}: no label map in A ({a_dir})" for n in listed[b_dir] if n.endswith(".nii.gz") and n not in names]
    # Label maps are <case id>.nii.gz: a .nii would be silently left out, and a .nii beside a
    # .nii.gz leaves open which of the two is the case's prediction.
    ambiguous = set()
    for folder in (a_dir, b_dir):
        for n in (n for n in listed[folder] if n.endswith(".nii")):
            if n + ".gz" in listed[folder]:
                ambiguous.add(n + ".gz")
                problems.append(f"{folder / n}: both {n} and {n}.gz in {folder}; keep one")
            else:
                problems.append(f"{folder / n}: a .nii label map; merge reads <case id>.nii.gz only")
    written = []
    for name in names:
        if name in ambiguous:
            continue
        try:
            a, geometry = read_volume(a_dir / name)
            b, b_geometry = read_volume(b_dir / name)
        except DataError as e:
            problems.append(str(e))
            continue
        if diffs := geometry.differences(b_geometry):
            problems.append(f"{b_dir / name}: geometry differs from {a_dir / name}: " + "; ".join(diffs))
            continue
        try:
            merged = merge_label_maps(a, b, convention)
        except ValueError as e:
            problems.append(f"{name}: {e}")
            continue
        write_image(merged.astype(np.uint8), geometry, Path(out_dir) / name)
        written.append(Path(out_dir) / name)
    return written, problems
