"""Validate a dataset: every problem of every case, one line each, naming the case and the file."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brats_lab import DataError
from brats_lab.data.cases import MODALITIES, Case, discover
from brats_lab.data.preprocess import flat_channel
from brats_lab.files import why_not_a_file
from brats_lab.io import Geometry, nonfinite, read_image


@dataclass(frozen=True)
class Problem:
    case: str
    file: str  # a file name, or the case folder when no single file is at fault
    message: str

    def __str__(self) -> str:
        return f"{self.case}: {self.file}: {self.message}"


def check_case(case: Case, expect_seg: bool = False) -> list[Problem]:
    """Every problem of one case. Reads each file once."""
    problems: list[Problem] = []

    def add(path: Path | str, message: str) -> None:
        problems.append(Problem(case.id, Path(path).name, message))

    for name, message in case.problems:  # found by discovery: duplicate files, an unlistable folder
        add(name, message)
    if any(name == case.id for name, _ in case.problems):
        return problems  # the folder itself is at fault: nothing in it can be read

    reference: tuple[str, Geometry] | None = None  # first readable modality
    for modality, path in zip(MODALITIES, case.images):
        volume = _read(path, add)
        if volume is None:
            continue
        array, geometry = volume
        if why := nonfinite(path, array):
            add(path, why)
        elif why := flat_channel(array):  # normalisation would leave nothing of this modality
            add(path, why)
        if reference is None:
            reference = (modality, geometry)
        elif diffs := reference[1].differences(geometry):
            add(path, f"geometry differs from {reference[0]}: " + "; ".join(diffs))

    if case.seg is None:
        if expect_seg:
            add(case.dir, "no segmentation file (other cases of this dataset have one)")
    else:
        volume = _read(case.seg, add)
        if volume is not None:
            seg, geometry = volume
            found = set(np.unique(seg).tolist())
            if extra := found - case.convention.allowed:
                allowed = ", ".join(str(v) for v in sorted(case.convention.allowed))
                shown = ", ".join(f"{v:g}" for v in sorted(extra))
                add(case.seg, f"labels {shown} not allowed by {case.convention.name} (allowed: {allowed})")
            if reference is not None and (diffs := reference[1].differences(geometry)):
                add(case.seg, "geometry differs from the images: " + "; ".join(diffs))
    return problems


def _read(path: Path, add) -> tuple[np.ndarray, Geometry] | None:
    if not path.is_file():
        why = why_not_a_file(path)
        add(path, "missing file" if why == "file not found" else why)
        return None
    try:
        array, geometry = read_image(path, full_check=True)  # validation: the CRC too
    except DataError as e:
        add(path, str(e).removeprefix(f"{path}: "))
        return None
    if array.ndim != 3:
        add(path, f"not 3-D (size {geometry.size})")
        return None
    return array, geometry


def check_dataset(root: Path, progress: bool = True, workers: int = 2) -> tuple[list[Case], list[Problem]]:
    """Check every case of a dataset folder; problems in case order.

    Raises DataError when the folder holds no BraTS cases at all.
    """
    cases = discover(root)
    expect_seg = any(c.seg is not None for c in cases)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda c: check_case(c, expect_seg), cases)
        if progress:
            results = tqdm(results, total=len(cases), desc="checking", unit="case", leave=False)
        problems = [p for case_problems in results for p in case_problems]
    return cases, problems
