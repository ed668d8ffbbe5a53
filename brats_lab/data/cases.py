"""Find BraTS cases on disk, for every release's layout, auto-detected.

A `Case` is paths plus geometry; it reads no voxels. Layouts and their label conventions are data
(`LAYOUTS`); adding a release is adding a row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from brats_lab import DataError
from brats_lab.io import Geometry, read_header
from brats_lab.labels import BRATS_2020, BRATS_2023, LabelConvention

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")  # channel order of every image tensor
IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Layout:
    name: str
    case_dir: re.Pattern[str]  # a case folder's name
    separator: str  # between the case id and the file suffix
    suffixes: tuple[str, ...]  # file suffix of each modality, in MODALITIES order
    seg_suffix: str
    convention: LabelConvention
    example: str  # shown in error messages

    def file_name(self, case_id: str, suffix: str) -> str:
        return f"{case_id}{self.separator}{suffix}.nii.gz"


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="brats2020",
        case_dir=re.compile(r"^BraTS20_(Training|Validation|Testing)_\d+$"),
        separator="_",
        suffixes=("t1", "t1ce", "t2", "flair"),
        seg_suffix="seg",
        convention=BRATS_2020,
        example="BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz",
    ),
    Layout(
        name="brats2021",
        case_dir=re.compile(r"^BraTS2021_\d+$"),
        separator="_",
        suffixes=("t1", "t1ce", "t2", "flair"),
        seg_suffix="seg",
        convention=BRATS_2020,
        example="BraTS2021_00000/BraTS2021_00000_t1.nii.gz",
    ),
    Layout(
        name="brats2023",
        case_dir=re.compile(r"^BraTS-[A-Z]+-\d+-\d+$"),
        separator="-",
        suffixes=("t1n", "t1c", "t2w", "t2f"),
        seg_suffix="seg",
        convention=BRATS_2023,
        example="BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz",
    ),
)


@dataclass(frozen=True)
class Case:
    id: str
    dir: Path
    images: tuple[Path, ...]  # MODALITIES order; a missing file keeps its expected path
    seg: Path | None
    layout: Layout
    notes: tuple[str, ...] = field(default=())  # tolerated oddities, e.g. a seg file's odd name

    @property
    def convention(self) -> LabelConvention:
        return self.layout.convention

    @cached_property
    def geometry(self) -> Geometry:
        """Geometry of the first modality (all must agree; `data check` verifies it)."""
        return read_header(self.images[0])[0]

    def files(self) -> dict[str, Path]:
        """Modality name (or 'seg') -> path."""
        out = dict(zip(MODALITIES, self.images))
        if self.seg is not None:
            out["seg"] = self.seg
        return out


def detect_layout(root: Path) -> tuple[Layout, Path]:
    """The layout of a dataset folder and the folder that holds the case folders.

    Accepts the dataset folder itself or a folder with exactly one dataset folder inside (as the
    official archives unpack, e.g. `MICCAI_BraTS2020_TrainingData/`).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    for folder in (root, *_only_subfolder(root)):
        names = [p.name for p in folder.iterdir() if p.is_dir()]
        counts = [(sum(bool(l.case_dir.match(n)) for n in names), l) for l in LAYOUTS]
        best, layout = max(counts, key=lambda c: c[0])
        if best:
            return layout, folder
    examples = ", ".join(l.example for l in LAYOUTS)
    raise DataError(f"{root}: no BraTS case folders found (expected one of the layouts: {examples})")


def _only_subfolder(root: Path) -> list[Path]:
    subs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return subs if len(subs) == 1 else []


def discover(root: Path) -> list[Case]:
    """Every case of a dataset folder, sorted by id. Reads no voxels."""
    layout, folder = detect_layout(root)
    dirs = sorted(p for p in folder.iterdir() if p.is_dir() and layout.case_dir.match(p.name))
    return [_case(d, layout) for d in dirs]


def _case(folder: Path, layout: Layout) -> Case:
    case_id = folder.name
    files = {p.name.lower(): p for p in folder.iterdir() if p.is_file()}
    images = tuple(_find(files, folder, case_id, layout, s) for s in layout.suffixes)
    seg = _find(files, folder, case_id, layout, layout.seg_suffix)
    notes: tuple[str, ...] = ()
    if not seg.is_file():
        seg, notes = _find_odd_seg(files, images, case_id, layout)
    return Case(id=case_id, dir=folder, images=images, seg=seg, layout=layout, notes=notes)


def _find(files: dict[str, Path], folder: Path, case_id: str, layout: Layout, suffix: str) -> Path:
    for ext in IMAGE_EXTENSIONS:
        name = f"{case_id}{layout.separator}{suffix}{ext}"
        if name.lower() in files:
            return files[name.lower()]
    return folder / layout.file_name(case_id, suffix)


def _find_odd_seg(
    files: dict[str, Path], images: tuple[Path, ...], case_id: str, layout: Layout
) -> tuple[Path | None, tuple[str, ...]]:
    # BraTS 2020 ships case 355's seg as 'W39_1998.09.19_Segm.nii': accept any one NIfTI file
    # whose name says 'seg' and which is not a modality, and say which name was used.
    taken = {p.name.lower() for p in images}
    odd = [
        p
        for name, p in sorted(files.items())
        if name not in taken and "seg" in name and name.endswith(IMAGE_EXTENSIONS)
    ]
    if len(odd) != 1:
        return None, ()
    expected = layout.file_name(case_id, layout.seg_suffix)
    return odd[0], (f"segmentation read from '{odd[0].name}' (expected '{expected}')",)
