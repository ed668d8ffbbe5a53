"""Find BraTS cases on disk, for every release's layout, auto-detected.

A `Case` is paths plus geometry; it reads no voxels. Layouts and their label conventions are data
(`LAYOUTS`); adding a release is adding a row.
"""

from __future__ import annotations

import errno
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from brats_lab import DataError
from brats_lab.files import why_not_a_file
from brats_lab.io import Geometry, read_header
from brats_lab.labels import BRATS_2020, BRATS_2023, LabelConvention

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")  # channel order of every image tensor
IMAGE_EXTENSIONS: tuple[str, ...] = (".nii.gz", ".nii")


@dataclass(frozen=True)
class Layout:
    name: str
    case_dir: re.Pattern[str]  # a case folder's whole name, ASCII only: use `is_case_dir`
    separator: str  # between the case id and the file suffix
    suffixes: tuple[str, ...]  # file suffix of each modality, in MODALITIES order
    seg_suffix: str
    convention: LabelConvention
    example: str  # shown in error messages

    def file_name(self, case_id: str, suffix: str) -> str:
        return f"{case_id}{self.separator}{suffix}.nii.gz"

    def is_case_dir(self, name: str) -> bool:
        """Whether `name` is a case folder of this layout: the whole name, ASCII digits only (a
        trailing newline or fullwidth digits would put odd characters in every file and run name)."""
        return self.case_dir.fullmatch(name) is not None

    def looks_like_case_dir(self, name: str) -> bool:
        """Not a case folder, but one with whitespace around the name or non-ASCII digits: a
        mistake to report rather than a folder to ignore."""
        loose = self.case_dir.pattern.replace("[0-9]", r"\d")
        return not self.is_case_dir(name) and re.fullmatch(loose, name.strip()) is not None


LAYOUTS: tuple[Layout, ...] = (
    Layout(
        name="brats2020",
        case_dir=re.compile(r"BraTS20_(Training|Validation|Testing)_[0-9]+"),
        separator="_",
        suffixes=("t1", "t1ce", "t2", "flair"),
        seg_suffix="seg",
        convention=BRATS_2020,
        example="BraTS20_Training_001/BraTS20_Training_001_t1.nii.gz",
    ),
    Layout(
        name="brats2021",
        case_dir=re.compile(r"BraTS2021_[0-9]+"),
        separator="_",
        suffixes=("t1", "t1ce", "t2", "flair"),
        seg_suffix="seg",
        convention=BRATS_2020,
        example="BraTS2021_00000/BraTS2021_00000_t1.nii.gz",
    ),
    Layout(
        name="brats2023",
        case_dir=re.compile(r"BraTS-[A-Z]+-[0-9]+-[0-9]+"),
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
    # What makes the case unusable, found without reading voxels: (file name, why), e.g. two files
    # for one modality. The file name is the case id when the folder itself is at fault.
    problems: tuple[tuple[str, str], ...] = field(default=())

    @property
    def convention(self) -> LabelConvention:
        return self.layout.convention

    @cached_property
    def geometry(self) -> Geometry:
        """Geometry of the first modality (all must agree; `data check` verifies it)."""
        return read_header(self.images[0])[0]

    def require_usable(self) -> None:
        """Raise DataError naming the case and each file if discovery found it unusable."""
        if self.problems:
            raise DataError("; ".join(f"{self.id}: {self.dir if name == self.id else self.dir / name}: {why}"
                                      for name, why in self.problems))

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
        names = sorted(p.name for p in _list(folder))
        if odd := [n for n in names if any(l.looks_like_case_dir(n) for l in LAYOUTS)]:
            raise DataError(f"{folder}: {ascii(odd[0])}: named like a case folder but not a case id "
                            "(whitespace around it or non-ASCII digits); rename it or move it out"
                            + (f" (and {len(odd) - 1} more such folders)" if len(odd) > 1 else ""))
        found = {l.name: [n for n in names if l.is_case_dir(n)] for l in LAYOUTS}
        found = {name: cases for name, cases in found.items() if cases}
        if len(found) > 1:  # e.g. a 2021 copy of 2020 cases: the same patients twice
            kinds = "; ".join(f"{name}: {len(cases)} ({', '.join(cases[:3])}{', ...' if len(cases) > 3 else ''})"
                              for name, cases in found.items())
            raise DataError(f"{folder}: case folders of {len(found)} layouts ({kinds}); keep one dataset per folder")
        if found:
            return next(l for l in LAYOUTS if l.name in found), folder
    examples = ", ".join(l.example for l in LAYOUTS)
    raise DataError(f"{root}: no BraTS case folders found (expected one of the layouts: {examples})")


def _list(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError as e:
        raise DataError(f"{folder}: cannot list the folder ({(e.strerror or str(e)).lower()})") from None


def _only_subfolder(root: Path) -> list[Path]:
    subs = [p for p in _list(root) if p.is_dir() and not p.name.startswith(".")]
    return subs if len(subs) == 1 else []


def discover(root: Path) -> list[Case]:
    """Every case of a dataset folder, sorted by id. Reads no voxels.

    A case whose folder cannot be listed (a symlink loop, no permission) or that holds two files
    for one modality is still returned, with `problems` saying why it cannot be used.
    """
    layout, folder = detect_layout(root)
    entries = sorted(p for p in _list(folder) if layout.is_case_dir(p.name))
    return [_case(d, layout) for d in entries]


def _case(folder: Path, layout: Layout) -> Case:
    case_id = folder.name
    try:
        listed = [p for p in folder.iterdir() if p.is_file()]
    except OSError as e:  # not a folder at all, a symlink loop, no permission to list it
        why = (e.strerror or str(e)).lower()
        if e.errno in (errno.ELOOP, errno.ENOENT):
            why = why_not_a_file(folder)
        elif e.errno == errno.ENOTDIR:
            why = "named like a case folder, but a file"
        expected = tuple(folder / layout.file_name(case_id, s) for s in layout.suffixes)
        return Case(id=case_id, dir=folder, images=expected, seg=None, layout=layout,
                    problems=((case_id, f"cannot list the case folder ({why})"),))
    files: dict[str, list[Path]] = {}  # lower-cased name -> files: names are matched without case
    for p in sorted(listed):
        files.setdefault(p.name.lower(), []).append(p)
    problems: list[tuple[str, str]] = []
    for path in sorted(listed):  # e.g. case 002's files copied into the folder of case 003
        other = re.match(layout.case_dir.pattern, path.name, flags=re.IGNORECASE)
        if other and other.group(0).lower() != case_id.lower():
            problems.append((path.name, f"a file of case {other.group(0)} in the folder of case {case_id}; "
                                        "move it to its own case folder"))
    images = tuple(_find(files, folder, case_id, layout, s, problems) for s in layout.suffixes)
    seg = _find(files, folder, case_id, layout, layout.seg_suffix, problems)
    notes: tuple[str, ...] = ()
    if not seg.is_file():
        seg, notes = _find_odd_seg({n: ps[0] for n, ps in files.items()}, images, case_id, layout)  # type: ignore[assignment]
    return Case(id=case_id, dir=folder, images=images, seg=seg, layout=layout, notes=notes, problems=tuple(problems))


def _find(
    files: dict[str, list[Path]], folder: Path, case_id: str, layout: Layout, suffix: str, problems: list
) -> Path:
    found = [p for ext in IMAGE_EXTENSIONS for p in files.get(f"{case_id}{layout.separator}{suffix}{ext}".lower(), [])]
    if len(found) > 1:  # which one is right cannot be told: refuse rather than pick one
        others = ", ".join(p.name for p in found[1:])
        problems.append((found[0].name, f"also {others}: {len(found)} files for {suffix}; keep one"))
    return found[0] if found else folder / layout.file_name(case_id, suffix)


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
        and not re.match(layout.case_dir.pattern, name, flags=re.IGNORECASE)  # another case's seg
    ]
    if len(odd) != 1:
        return None, ()
    expected = layout.file_name(case_id, layout.seg_suffix)
    return odd[0], (f"segmentation read from '{odd[0].name}' (expected '{expected}')",)
