"""Label conventions per BraTS release, and the tumour regions the network predicts, as data.

Nothing else in the code base should know that ET is label 4 in 2020 and label 3 from 2023 on:
ask a `LabelConvention`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REGIONS: tuple[str, ...] = ("ET", "TC", "WT")  # channel order of every region tensor


@dataclass(frozen=True)
class LabelConvention:
    name: str
    labels: dict[int, str]  # every value a seg file may hold, background included
    regions: dict[str, tuple[int, ...]]  # region name -> the labels it is made of
    # Region -> label, painted in this order so inner regions overwrite outer ones.
    paint: tuple[tuple[str, int], ...]

    @property
    def allowed(self) -> frozenset[int]:
        return frozenset(self.labels)

    def to_regions(self, seg: np.ndarray) -> np.ndarray:
        """Label map (...) -> boolean region channels (3, ...) in `REGIONS` order."""
        return np.stack([np.isin(seg, self.regions[r]) for r in REGIONS])

    def from_regions(self, regions: np.ndarray) -> np.ndarray:
        """Boolean region channels (3, ...) -> uint8 label map (...).

        Painted outer to inner (`paint`: WT, TC, ET), so the innermost region a voxel is in
        wins, nested channels or not: the map's ET is the ET channel, its TC the union of TC and
        ET, its WT the union of all three. The authors paint edema last instead, so a voxel in ET
        and WT but not TC is edema there and ET here (docs/fidelity.md, "label-map rebuild").
        """
        if regions.shape[0] != len(REGIONS):
            raise ValueError(f"expected {len(REGIONS)} region channels {REGIONS}, got shape {regions.shape}")
        out = np.zeros(regions.shape[1:], dtype=np.uint8)
        for region, label in self.paint:
            out[regions[REGIONS.index(region)].astype(bool)] = label
        return out


BRATS_2020 = LabelConvention(
    name="brats2020",
    labels={0: "background", 1: "NCR/NET", 2: "ED", 4: "ET"},
    regions={"ET": (4,), "TC": (1, 4), "WT": (1, 2, 4)},
    paint=(("WT", 2), ("TC", 1), ("ET", 4)),
)

# 2023 GLI relabelled ET to 3; 2024 added 4 = resection cavity, which belongs to no tumour region.
BRATS_2023 = LabelConvention(
    name="brats2023",
    labels={0: "background", 1: "NETC", 2: "SNFH", 3: "ET", 4: "RC (2024+)"},
    regions={"ET": (3,), "TC": (1, 3), "WT": (1, 2, 3)},
    paint=(("WT", 2), ("TC", 1), ("ET", 3)),
)

CONVENTIONS: dict[str, LabelConvention] = {c.name: c for c in (BRATS_2020, BRATS_2023)}


def foreign_convention(pred_labels: set[int], ref_labels: set[int], convention: LabelConvention) -> LabelConvention | None:
    """The other convention a prediction's labels belong to, when it is scored against a
    reference of `convention`; None when nothing says so.

    The tell is the ET label: the prediction holds another convention's ET label and not its
    own, and the reference holds no voxel of that label (a 2023 prediction that writes ET as 4,
    the 2020 label, scored against a 2023 reference without resection cavity). Such a map would
    be scored as if its ET were something else (resection cavity, which no region holds).
    """
    own = set(convention.regions["ET"])
    for other in CONVENTIONS.values():
        theirs = set(other.regions["ET"])
        if other is convention or theirs == own:
            continue
        if pred_labels & theirs and not pred_labels & own and not ref_labels & theirs and pred_labels <= other.allowed:
            return other
    return None
