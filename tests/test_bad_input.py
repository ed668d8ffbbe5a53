"""Bad input refused: a corpus of broken datasets and prediction folders, made here on disk, fed to
every command that reads data through the real `brats-lab` command in a subprocess.

Each (corpus entry, command) pair must exit non-zero with a `brats-lab: error:` line naming the
case (and, where there is one, the file), show no traceback, and leave nothing half-written: no
cache manifest from a failed prepare, no temporary files, nothing for the broken case in an output
folder, and only complete images for the cases that did go through. Pairs where the command does
not read the broken part (baseline of a case without a segmentation, say) must succeed instead.

Unreadable files are made unreadable for real with chmod 000. Tests run as root here, which the
kernel lets read anything; the command is then run without the two capabilities that allow that
(CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH), dropped from its bounding set before it starts. Switching
to another user (setuid 65534) is not possible here: the interpreter lives under /root (mode 0700),
which such a user cannot reach.
"""

from __future__ import annotations

import ctypes
import gzip
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from brats_lab.io import read_image, write_image

CASE = "BraTS20_Training_001"  # the case every entry breaks (the cases are those of conftest's `valid_inputs`)
OTHER = "BraTS20_Training_002"  # stays valid: the commands that go on past a failure write it
CASE_2023, OTHER_2023 = "BraTS-GLI-00001-000", "BraTS-GLI-00002-000"
SIZE = (32, 32, 24)  # (x, y, z) of the cases of `valid_inputs`
CACHE = ".brats-lab-cache"

# Train and predict of one fold, as small as the trainer allows (tests/training/test_trainer.py):
# after `tiny_network`'s settings.
ONE_EPOCH = ["train.val_every=1", "train.epochs=1"]


# --- building the corpus -------------------------------------------------------------------------


def image(root: Path, modality: str, case: str = CASE, ext: str = ".nii.gz") -> Path:
    return root / case / f"{case}_{modality}{ext}"


def rewrite(path: Path, change: Callable) -> None:
    array, geometry = read_image(path)
    array, geometry = change(array, geometry)
    write_image(array, geometry, path)


def with_spacing(spacing):
    return lambda a, g: (a, type(g)(g.size, spacing, g.origin, g.direction))


def png_bytes(tmp: Path) -> bytes:
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(tmp / "picture.png"))
    data = (tmp / "picture.png").read_bytes()
    (tmp / "picture.png").unlink()
    return data


def plain_nifti_bytes(path: Path, tmp: Path) -> bytes:
    """The image at `path` as an uncompressed NIfTI file's bytes."""
    sitk.WriteImage(sitk.ReadImage(str(path)), str(tmp / "plain.nii"))
    data = (tmp / "plain.nii").read_bytes()
    (tmp / "plain.nii").unlink()
    return data


def set_scl_slope(path: Path, slope: float) -> None:
    """Rewrite a .nii.gz's header field scl_slope (bytes 112-116 of the NIfTI-1 header)."""
    data = bytearray(gzip.decompress(path.read_bytes()))
    assert struct.unpack("<i", data[:4])[0] == 348  # little-endian NIfTI-1, as SimpleITK writes it
    data[112:116] = struct.pack("<f", slope)
    path.write_bytes(gzip.compress(bytes(data)))


def copy_case(root: Path, case: str, folder: Path, new_id: str) -> None:
    """Case `case`'s files, renamed for `new_id`, in `folder`."""
    folder.mkdir()
    for path in (root / case).iterdir():
        shutil.copy(path, folder / path.name.replace(case, new_id))


def four_d(path: Path) -> None:
    volume = sitk.ReadImage(str(path))
    sitk.WriteImage(sitk.JoinSeries([volume, volume]), str(path))


def two_d(path: Path) -> None:
    sitk.WriteImage(sitk.Image([SIZE[0], SIZE[1]], sitk.sitkInt16) + 1, str(path))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip_middle_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
    path.write_bytes(bytes(data))


def symlink_loop(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(path.name)  # points at itself


@dataclass(frozen=True)
class Entry:
    """One broken input: `make(folder, scratch)` breaks a copy of the valid input; the error must
    name `case` (None: the input folder) and `file` (None: no single file is at fault), and say
    `why` (a regular expression) on the same line. `reads` says which commands read what is
    broken: the others must succeed."""

    name: str
    why: str
    make: Callable[[Path, Path], None]
    file: str | None
    reads: frozenset[str]
    case: str | None = CASE
    unreadable: bool = False  # needs the capabilities dropped
    base: str = "data"  # the valid dataset it starts from: "data" (2020 layout) or "data2023"


# What each command reads of a dataset: check everything; prepare and train every file (training
# refuses a case without a segmentation); baseline and predict the images and a seg if there is
# one; evaluate --gt only the case folders and the segmentations.
ALL = frozenset({"check", "prepare", "baseline", "evaluate", "train", "predict"})
IMAGES = ALL - {"evaluate"}
NEEDS_SEG = frozenset({"check", "prepare", "evaluate", "train"})

T1, T2, T1CE, SEG = (f"{CASE}_{m}.nii.gz" for m in ("t1", "t2", "t1ce", "seg"))


def _dataset_corpus() -> list[Entry]:
    e = []

    def add(name, why, file, reads=ALL, case=CASE, unreadable=False, base="data"):
        def register(make):
            e.append(Entry(name, why, make, file, frozenset(reads), case, unreadable, base))
            return make

        return register

    # Every failure `brats-lab data check` names.
    @add("missing modality", r"file not found|missing file", T2, IMAGES)
    def _(root, tmp):
        image(root, "t2").unlink()

    @add("missing segmentation", r"no segmentation|no reference segmentation", None, NEEDS_SEG)
    def _(root, tmp):
        image(root, "seg").unlink()

    @add("no case has a segmentation (test data)", r"no case has a segmentation|no segmentation file", None, {"evaluate", "train"}, case=None)
    def _(root, tmp):
        for case in (CASE, OTHER):
            image(root, "seg", case).unlink()

    @add("truncated gzip", r"truncated", T1, IMAGES)
    def _(root, tmp):
        truncate(image(root, "t1"))

    @add("corrupt gzip (CRC)", r"corrupt gzip", T1, IMAGES)
    def _(root, tmp):
        flip_middle_bytes(image(root, "t1"))

    @add("gzip of text", r"not a NIfTI file", T1, IMAGES)
    def _(root, tmp):
        with gzip.open(image(root, "t1"), "wb") as f:
            f.write(b"this is not a NIfTI file")

    @add("2-D image", r"not 3-D", T1, IMAGES)
    def _(root, tmp):
        two_d(image(root, "t1"))

    @add("4-D image", r"not 3-D", T1, IMAGES)
    def _(root, tmp):
        four_d(image(root, "t1"))

    @add("4-D segmentation", r"not 3-D", SEG, ALL)
    def _(root, tmp):
        four_d(image(root, "seg"))

    @add("spacing differs between modalities", r"geometry differs.*spacing", T2, IMAGES)
    def _(root, tmp):
        rewrite(image(root, "t2"), with_spacing((1.0, 1.0, 2.0)))

    @add("shape differs between modalities", r"geometry differs.*size", T2, IMAGES)
    def _(root, tmp):
        rewrite(image(root, "t2"), lambda a, g: (a[:, :, 2:], type(g)((SIZE[0] - 2, *SIZE[1:]), g.spacing, g.origin, g.direction)))

    @add("NaN voxels", r"NaN or infinite", T1CE, IMAGES)
    def _(root, tmp):
        rewrite(image(root, "t1ce"), lambda a, g: (np.where(a > 520, np.nan, a).astype(np.float32), g))

    @add("infinite voxels", r"NaN or infinite", T1CE, IMAGES)
    def _(root, tmp):
        rewrite(image(root, "t1ce"), lambda a, g: (np.where(a > 520, np.inf, a).astype(np.float32), g))

    @add("all-zero modality", r"all voxels are zero", T1, IMAGES)
    def _(root, tmp):
        rewrite(image(root, "t1"), lambda a, g: (np.zeros_like(a), g))

    @add("infinite once scaled by the header (scl_slope 1e38)", r"NaN or infinite voxels once scaled", T1CE, IMAGES)
    def _(root, tmp):
        set_scl_slope(image(root, "t1ce"), 1e38)  # int16 voxels of ~500: +inf as float32

    @add("constant modality (one value inside the brain)", r"every non-zero voxel has the value 7\b", T1, IMAGES)
    def _(root, tmp):
        rewrite(image(root, "t1"), lambda a, g: (np.where(a != 0, 7, 0).astype(a.dtype), g))

    @add("label 3 in a 2020 dataset", r"label[^:]*\b3\b", SEG, ALL)
    def _(root, tmp):
        rewrite(image(root, "seg"), lambda a, g: (np.where(a == 1, 3, a).astype(np.uint8), g))

    @add("fractional labels", r"label[^:]*\b1\.5\b", SEG, ALL)
    def _(root, tmp):
        rewrite(image(root, "seg"), lambda a, g: (np.where(a == 1, 1.5, a).astype(np.float32), g))

    @add("segmentation origin differs", r"geometry differs.*origin", SEG, ALL)
    def _(root, tmp):
        rewrite(image(root, "seg"), lambda a, g: (a, type(g)(g.size, g.spacing, (1.0, 2.0, 3.0), g.direction)))

    @add("segmentation shape differs", r"geometry differs.*size", SEG, ALL)
    def _(root, tmp):
        rewrite(image(root, "seg"), lambda a, g: (a[:-2], type(g)((*SIZE[:2], SIZE[2] - 2), g.spacing, g.origin, g.direction)))

    # Wrong file types.
    @add("PNG named .nii.gz", r"not gzip-compressed", T1, IMAGES)
    def _(root, tmp):
        image(root, "t1").write_bytes(png_bytes(tmp))

    @add("PNG named .nii", r"not a NIfTI file", f"{CASE}_t1.nii", IMAGES)
    def _(root, tmp):
        image(root, "t1").unlink()
        image(root, "t1", ext=".nii").write_bytes(png_bytes(tmp))

    @add("text named .nii.gz", r"not gzip-compressed", T1, IMAGES)
    def _(root, tmp):
        image(root, "t1").write_text("patient 001, T1, see the PACS\n")

    @add("uncompressed NIfTI named .nii.gz", r"not gzip-compressed", T1, IMAGES)
    def _(root, tmp):
        image(root, "t1").write_bytes(plain_nifti_bytes(image(root, "t1"), tmp))

    @add("gzip NIfTI named .nii", r"gzip-compressed: name it \.nii\.gz", f"{CASE}_t1.nii", IMAGES)
    def _(root, tmp):
        image(root, "t1").rename(image(root, "t1", ext=".nii"))

    # Truncated files.
    @add("truncated .nii", r"truncated NIfTI \(", f"{CASE}_t1.nii", IMAGES)
    def _(root, tmp):
        data = plain_nifti_bytes(image(root, "t1"), tmp)
        image(root, "t1").unlink()
        image(root, "t1", ext=".nii").write_bytes(data[: len(data) * 2 // 3])

    @add("truncated NIfTI header", r"truncated NIfTI header", T1, IMAGES)
    def _(root, tmp):
        header = plain_nifti_bytes(image(root, "t1"), tmp)[:100]
        with gzip.open(image(root, "t1"), "wb") as f:
            f.write(header)

    @add("empty file", r"empty file", T1, IMAGES)
    def _(root, tmp):
        image(root, "t1").write_bytes(b"")

    # Empty folders.
    @add("empty dataset folder", r"no BraTS case folders", None, ALL, case=None)
    def _(root, tmp):
        for case in (CASE, OTHER):
            shutil.rmtree(root / case)

    @add("empty case folder", r"file not found|missing file|no (reference )?segmentation", None, ALL)
    def _(root, tmp):
        shutil.rmtree(root / CASE)
        (root / CASE).mkdir()

    # Duplicates.
    @add(".nii and .nii.gz of one modality", r"2 files for t1", T1, ALL)
    def _(root, tmp):
        image(root, "t1", ext=".nii").write_bytes(plain_nifti_bytes(image(root, "t1"), tmp))

    @add("one modality twice, names differing in case", r"2 files for t1", T1, ALL)
    def _(root, tmp):
        shutil.copy(image(root, "t1"), root / CASE / f"{CASE}_T1.nii.gz")

    @add("the same case in two layouts", r"2 layouts", None, ALL, case="BraTS2021_00001")
    def _(root, tmp):
        twin = root / "BraTS2021_00001"
        twin.mkdir()
        for path in (root / CASE).iterdir():
            shutil.copy(path, twin / path.name.replace(CASE, twin.name))

    # Folder names that are almost a case id: not silently a case, not silently ignored.
    for label, name in (("newline after a case folder's name", f"{CASE[:-1]}3\n"),
                        ("fullwidth digits in a case folder's name", "BraTS20_Training_\uff10\uff10\uff13"),
                        ("Arabic-Indic digits in a case folder's name", "BraTS20_Training_\u0660\u0660\u0663")):
        @add(label, r"named like a case folder but not a case id", None, ALL, case=ascii(name)[1:-1])
        def _(root, tmp, name=name):
            copy_case(root, OTHER, root / name, name)

    @add("another case's files in a case folder", rf"a file of case {OTHER} in the folder of case {CASE[:-1]}3",
         f"{OTHER}_seg.nii.gz", ALL, case=f"{CASE[:-1]}3")
    def _(root, tmp):
        shutil.copytree(root / OTHER, root / f"{CASE[:-1]}3")

    # Permissions.
    @add("unreadable file (chmod 000)", r"permission denied", T1, IMAGES, unreadable=True)
    def _(root, tmp):
        image(root, "t1").chmod(0)

    @add("unreadable segmentation (chmod 000)", r"permission denied", SEG, ALL, unreadable=True)
    def _(root, tmp):
        image(root, "seg").chmod(0)

    @add("unreadable case folder (chmod 000)", r"cannot list the case folder \(permission denied\)", None, ALL, unreadable=True)
    def _(root, tmp):
        (root / CASE).chmod(0)

    @add("unreadable dataset folder (chmod 000)", r"cannot list the folder \(permission denied\)", None, ALL, case=None, unreadable=True)
    def _(root, tmp):
        root.chmod(0)

    # Symlink loops.
    @add("file is a symlink loop", r"symbolic link loop", T1, IMAGES)
    def _(root, tmp):
        symlink_loop(image(root, "t1"))

    @add("case folder is a symlink loop", r"symbolic link loop", None, ALL)
    def _(root, tmp):
        symlink_loop(root / CASE)

    @add("label 5 in a 2023 dataset", r"label[^:]*\b5\b", f"{CASE_2023}-seg.nii.gz", ALL, case=CASE_2023, base="data2023")
    def _(root, tmp):
        seg = root / CASE_2023 / f"{CASE_2023}-seg.nii.gz"
        rewrite(seg, lambda a, g: (np.where(a == 1, 5, a).astype(np.uint8), g))

    return e


def _prediction_corpus() -> list[Entry]:
    """Broken folders of label maps, for evaluate --pred and merge --a / --b."""
    e = []
    name = f"{CASE}.nii.gz"

    def add(label, why, file=name, case=CASE, unreadable=False):
        def register(make):
            e.append(Entry(label, why, make, file, frozenset({"evaluate", "merge-a", "merge-b"}), case, unreadable))
            return make

        return register

    @add("prediction missing", r"prediction missing|no label map in A|file not found")
    def _(pred, tmp):
        (pred / name).unlink()

    @add("truncated prediction", r"truncated")
    def _(pred, tmp):
        truncate(pred / name)

    @add("PNG named .nii.gz", r"not gzip-compressed")
    def _(pred, tmp):
        (pred / name).write_bytes(png_bytes(tmp))

    @add("text named .nii.gz", r"not gzip-compressed")
    def _(pred, tmp):
        (pred / name).write_text("no prediction\n")

    @add("2-D prediction", r"not 3-D")
    def _(pred, tmp):
        two_d(pred / name)

    @add("4-D prediction", r"not 3-D")
    def _(pred, tmp):
        four_d(pred / name)

    @add("prediction origin differs", r"geometry")
    def _(pred, tmp):
        rewrite(pred / name, lambda a, g: (a, type(g)(g.size, g.spacing, (1.0, 2.0, 3.0), g.direction)))

    @add("prediction shape differs", r"geometry")
    def _(pred, tmp):
        rewrite(pred / name, lambda a, g: (a[:-2], type(g)((*SIZE[:2], SIZE[2] - 2), g.spacing, g.origin, g.direction)))

    @add("label 3 in a 2020 prediction", r"labels \[3\]")
    def _(pred, tmp):
        rewrite(pred / name, lambda a, g: (np.where(a == 1, 3, a).astype(np.uint8), g))

    @add("NaN in a prediction", r"NaN or infinite")
    def _(pred, tmp):
        rewrite(pred / name, lambda a, g: (np.where(a == 1, np.nan, a).astype(np.float32), g))

    @add("unreadable prediction (chmod 000)", r"permission denied", unreadable=True)
    def _(pred, tmp):
        (pred / name).chmod(0)

    @add("prediction is a symlink loop", r"symbolic link loop")
    def _(pred, tmp):
        symlink_loop(pred / name)

    @add(".nii and .nii.gz of one prediction", r"both")
    def _(pred, tmp):
        (pred / f"{CASE}.nii").write_bytes(plain_nifti_bytes(pred / name, tmp))

    @add("unreadable prediction folder (chmod 000)", r"cannot list the (prediction )?folder \(permission denied\)", file=None, case=None, unreadable=True)
    def _(pred, tmp):
        pred.chmod(0)

    @add("empty prediction folder", r"prediction missing|no label maps|file not found", file=None, case=None)
    def _(pred, tmp):
        for path in pred.iterdir():
            path.unlink()

    return e


DATASET_CORPUS = _dataset_corpus()
PREDICTION_CORPUS = _prediction_corpus()

# Training and prediction read data the way prepare and baseline do (cache.prepare and
# preprocess_case) but take seconds to start (torch, MLflow): each runs on a few entries, one per
# way in: a refusal of prepare's, a per-case file error, discovery, and a check of their own.
TRAIN_SUBSET = {
    "missing segmentation", "NaN voxels", "case folder is a symlink loop", "no case has a segmentation (test data)",
}
PREDICT_SUBSET = {"truncated gzip", "NaN voxels", "the same case in two layouts", "case folder is a symlink loop"}
# Pairs where the command does not read what is broken, so must go through: a few, as controls.
CONTROLS = {
    ("missing segmentation", "baseline"), ("NaN voxels", "evaluate"),
    *(("no case has a segmentation (test data)", c) for c in ("check", "prepare", "baseline")),
}

DATASET_COMMANDS = ("check", "prepare", "baseline", "evaluate", "train", "predict")
PREDICTION_COMMANDS = ("evaluate", "merge-a", "merge-b")


def _pairs():
    for entry in DATASET_CORPUS:
        for command in DATASET_COMMANDS:
            if command not in entry.reads and (entry.name, command) not in CONTROLS:
                continue
            if command == "train" and entry.name not in TRAIN_SUBSET:
                continue
            if command == "predict" and entry.name not in PREDICT_SUBSET:
                continue
            yield pytest.param("dataset", entry.name, command, id=f"{entry.name} | {command}")
    for entry in PREDICTION_CORPUS:
        for command in PREDICTION_COMMANDS:
            yield pytest.param("predictions", entry.name, command, id=f"predictions: {entry.name} | {command}")


PAIRS = list(_pairs())


# --- running the command -------------------------------------------------------------------------


def _drop_read_override() -> None:
    """In the child, before exec: give up root's right to read and search anything (chmod 000
    then stops root too). Dropped from the bounding set, so the exec'd process never has it."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def cli(argv: list[str], cwd: Path, unreadable: bool = False) -> subprocess.CompletedProcess:
    preexec = _drop_read_override if unreadable and os.geteuid() == 0 else None
    return subprocess.run(
        [sys.executable, "-m", "brats_lab.cli", *argv], cwd=cwd, capture_output=True, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=preexec, timeout=300,
    )


def _sets(overrides: list[str]) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


def snapshot(folder: Path) -> set[Path]:
    """Every path under `folder`, symlinks not followed (the corpus has loops)."""
    out = set()
    for top, dirs, files in os.walk(folder):
        out.update(Path(top) / name for name in dirs + files)
    return out


@pytest.fixture(scope="module")
def valid(valid_inputs) -> Path:
    """Valid inputs: two 2020 cases (data/: CASE, OTHER), two 2023 cases (data2023/: CASE_2023,
    OTHER_2023), and their segmentations as perfect predictions (pred-data/, pred-data2023/)."""
    return valid_inputs


@pytest.fixture(scope="module")
def tiny_train(tiny_network) -> list[str]:
    """`tiny_network`'s settings for one epoch, validated."""
    return [*tiny_network, *ONE_EPOCH]


@pytest.fixture(scope="module")
def trained(valid, tiny_train, tmp_path_factory) -> tuple[Path, str]:
    """A fold of pipeline B trained for one epoch on the valid cases: (folder with mlruns/, run id)."""
    home = tmp_path_factory.mktemp("trained")
    shutil.copytree(valid / "data", home / "data")
    result = cli(["train", "--pipeline", "B", "--profile", "cpu", "--data", str(home / "data"), *_sets(tiny_train)], home)
    assert result.returncode == 0, result.stderr[-3000:]
    return home, re.search(r"fold run (\w+)", result.stdout).group(1)


@dataclass
class Call:
    argv: list[str]
    cwd: Path
    outputs: list[Path]  # folders the command may write to


def dataset_call(command: str, data: Path, work: Path, entry: Entry, valid: Path, request) -> Call:
    out = work / "out"
    if command == "check":
        return Call(["data", "check", str(data)], work, [])
    if command == "prepare":
        return Call(["data", "prepare", str(data), "--pipeline", "B"], work, [data / CACHE])
    if command == "baseline":
        return Call(["baseline", "--input", str(data), "--output", str(out)], work, [out])
    if command == "evaluate":
        return Call(["evaluate", "--pred", str(valid / f"pred-{entry.base}"), "--gt", str(data),
                     "--out", str(out / "metrics.csv")], work, [out])
    if command == "train":
        argv = ["train", "--pipeline", "B", "--profile", "cpu", "--data", str(data), *_sets(request.getfixturevalue("tiny_train"))]
        return Call(argv, work, [data / CACHE, work / "mlruns"])
    if command == "predict":
        home, run_id = request.getfixturevalue("trained")
        return Call(["predict", "--run", run_id, "--input", str(data), "--output", str(out)], home, [out])
    raise AssertionError(command)


def prediction_call(command: str, pred: Path, work: Path, valid: Path) -> Call:
    out = work / "out"
    good = valid / "pred-data"
    if command == "evaluate":
        return Call(["evaluate", "--pred", str(pred), "--gt", str(valid / "data"), "--out", str(out / "metrics.csv")], work, [out])
    a, b = (pred, good) if command == "merge-a" else (good, pred)
    return Call(["merge", "--a", str(a), "--b", str(b), "--output", str(out)], work, [out])


def _entry(kind: str, name: str) -> Entry:
    corpus = DATASET_CORPUS if kind == "dataset" else PREDICTION_CORPUS
    return next(e for e in corpus if e.name == name)


@pytest.mark.parametrize("kind, name, command", PAIRS)
def test_bad_input_is_refused_cleanly(kind, name, command, valid, tmp_path, request):
    entry = _entry(kind, name)
    work = tmp_path
    if kind == "dataset":
        folder = work / "data"
        shutil.copytree(valid / entry.base, folder, symlinks=True)
        entry.make(folder, work)
        call = dataset_call(command, folder, work, entry, valid, request)
    else:
        folder = work / "pred"
        shutil.copytree(valid / "pred-data", folder, symlinks=True)
        entry.make(folder, work)
        call = prediction_call(command, folder, work, valid)
    if entry.unreadable and os.geteuid() == 0 and not _can_drop_read_override():
        pytest.skip("running as root without CAP_SETPCAP: cannot take away root's right to read a chmod 000 file")
    before = snapshot(work)
    result = cli(call.argv, call.cwd, entry.unreadable)
    new = snapshot(work) - before
    for out in call.outputs:
        new |= {p for p in snapshot(out) if p not in before} if out.is_dir() else set()
    output = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("brats-lab: error:")]

    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if command not in entry.reads:
        # The command does not read what is broken: it must go through.
        assert result.returncode == 0 and not errors, output[-3000:]
        return
    assert result.returncode != 0, output[-3000:]
    # A `brats-lab: error:` line names the case; a line, that one or the report's above it, names
    # case, file and why (the folder and why, when the whole folder is at fault).
    named = entry.case or str(folder)
    assert errors and (entry.case is None or any(entry.case in line for line in errors)), output[-3000:]
    assert any(named in line and (entry.file or "") in line and re.search(entry.why, line)
               for line in output.splitlines()), output[-3000:]
    _assert_nothing_partial(new, command, entry)


def _assert_nothing_partial(new: set[Path], command: str, entry: Entry) -> None:
    names = sorted(str(p) for p in new)
    assert not [n for n in names if ".tmp" in Path(n).name], names  # atomic_path's temporaries
    if "prepare" in entry.reads:  # data prepare refuses (by itself or inside train): no cache committed
        assert not [n for n in names if Path(n).name == "manifest.json"], names
    if entry.case is not None:
        assert not [n for n in names if entry.case in Path(n).name], names  # nothing for the broken case
    if command == "check":
        assert names == []
    if command == "train":
        assert not [n for n in names if "mlruns" in Path(n).parts], names  # refused before any run starts
    for path in new:
        if path.name.endswith(".nii.gz") and not path.is_symlink():
            read_image(path, full_check=True)  # complete, readable label maps only
        if path.name == "metrics.csv":
            assert len(pd.read_csv(path)) >= 1


def _can_drop_read_override() -> bool:
    try:
        return subprocess.run(["true"], preexec_fn=_drop_read_override).returncode == 0
    except subprocess.SubprocessError:  # the preexec function failed: no CAP_SETPCAP
        return False


# --- bad configurations, ablations and storage URLs -------------------------------------------
# Each refused with one `brats-lab: error:` line saying what was expected, no traceback, before
# anything is written: no MLflow store, no Optuna storage.

ABLATION_TOML = """
name = "bad"
pipeline = "B"
baseline = "small"
folds = 2

[arms]
small = ["model.width=4", "data.patch_size=[32, 32, 32]"]
wide = ["model.width=8", "data.patch_size=[32, 32, 32]"]
"""


def _ablation(replace: dict[str, str] | None = None, append: str = "") -> str:
    text = ABLATION_TOML
    for old, new in (replace or {}).items():
        assert old in text
        text = text.replace(old, new)
    return text + append


SECRET = "Secret77"  # the part of each password that must never be shown
CONFIG_CORPUS = {  # name -> (argv after `brats-lab`, with {data} and {toml}; the ablation TOML or None; why)
    "model.in_channels=5": (["train", "--set", "model.in_channels=5"], None, r"model.in_channels.*must be 4"),
    "model.out_channels=2": (["train", "--set", "model.out_channels=2"], None, r"model.out_channels.*must be 3"),
    "data.seed=-1": (["train", "--set", "data.seed=-1"], None, r"data.seed.*between 0 and 2\*\*32 - 1, got -1"),
    "train.seed=-1": (["train", "--set", "train.seed=-1"], None, r"train.seed.*between 0 and 2\*\*32 - 1, got -1"),
    "train.seed_index=-1": (["train", "--set", "train.seed_index=-1"], None, r"train.seed_index.*between 0 and 2\*\*32 - 1, got -1"),
    "8^3 patch (one voxel at the bottom)": (["train", "--set", "data.patch_size=[8, 8, 8]"], None,
                                            r"data.patch_size.*larger than 8 on at least one axis"),
    "data.exclude lists every training case": (["train", "--set", f'data.exclude=["{CASE}", "{OTHER}"]'], None,
                                               r"data.exclude leaves no case to train on in fold 0"),
    "data.exclude names a case not in the data": (["train", "--set", 'data.exclude=["BraTS20_Training_999"]'], None,
                                                   r"data.exclude names cases that are not in .*: BraTS20_Training_999"),
    "ablation: folds = \"two\"": (["ablate", "{toml}"], _ablation({"folds = 2": 'folds = "two"'}),
                                  r"folds must be an integer, got 'two'"),
    "ablation: folds = 0": (["ablate", "{toml}"], _ablation({"folds = 2": "folds = 0"}), r"folds must be >= 1, got 0"),
    "ablation: --folds 0": (["ablate", "{toml}", "--folds", "0"], _ablation(), r"--folds must be between 1 and \d+.*got 0"),
    "ablation: --seeds 0": (["ablate", "{toml}", "--seeds", "0"], _ablation(), r"--seeds must be at least 1, got 0"),
    "ablation: --workers 0": (["ablate", "{toml}", "--workers", "0"], _ablation(), r"--workers must be at least 1, got 0"),
    "ablation: --plan --noise inf": (["ablate", "{toml}", "--plan", "--noise", "inf"], _ablation(),
                                     r"--noise goes with --plan and must be a finite number above 0, got inf"),
    "train: --fold 2 of 2": (["train", "--fold", "2"], None, r"--fold must be between 0 and 1 \(data.folds = 2\), got 2"),
    "train: --fold -1": (["train", "--fold", "-1"], None, r"--fold must be between 0 and 1 \(data.folds = 2\), got -1"),
    **{f"train: --set {item}": (["train", "--set", item], None, rf"{re.escape(item.split('=')[0])} in --set {re.escape(item)}: expected a finite number, got {v}")
       for item, v in (("optim.lr=inf", "inf"), ("optim.weight_decay=nan", "nan"), ("train.min_lr=inf", "inf"),
                       ("optim.betas=[0.9, nan]", "nan"))},
    "synth: --seed -1": (["data", "synth", "--out", "{work}/synth", "--cases", "1", "--seed", "-1"], None,
                         r"--seed must be between 0 and 2\*\*32 - 1, got -1"),
    "predict: --small-et -1": (["predict", "--run", "any", "--input", "{work}/data", "--output", "{work}/out", "--small-et", "-1"], None,
                               r"--small-et must be >= 0 voxels"),
    "predict: --by without --top": (["predict", "--run", "any", "--input", "{work}/data", "--output", "{work}/out", "--by", "hd95"], None,
                                    r"--by hd95 goes with --top K"),
    "predict: --top 0": (["predict", "--run", "any", "--input", "{work}/data", "--output", "{work}/out", "--top", "0"], None,
                         r"--top must be >= 1, got 0"),
    **{f"{c}: --port {p}": ([c, "--port", str(p)], None, rf"--port must be between 1 and 65535, got {p}")
       for c, p in (("ui", 0), ("dashboard", 70000))},
    "ablation: arms as a list": (["ablate", "{toml}"], ABLATION_TOML.split("[arms]")[0] + 'arms = ["small", "wide"]\n',
                                 r"arms must be a table"),
    "ablation: two arms resolve alike": (["ablate", "{toml}"], _ablation({"model.width=8": "model.width=4"}),
                                         r"arms 'small' and 'wide' resolve to the same configuration.*brats-lab ablate seeds"),
    "ablation: an arm sets the seed index": (["ablate", "{toml}"], _ablation({"model.width=8": "model.width=8\", \"train.seed_index=1"}),
                                             r"arm 'wide' sets train.seed_index=1 .*the ablation's seeds set it"),
    "ablation: [cpu] folds = \"x\"": (["ablate", "{toml}"], _ablation(append='[cpu]\nfolds = "x"\n'),
                                      r"cpu.folds must be an integer, got 'x'"),
    "ablation: [removal] fraction as words": (
        ["ablate", "{toml}"], _ablation(append='[removal]\narm = "wide"\nfraction = "ten percent"\n'),
        r"removal.fraction must be a number, got 'ten percent'"),
    "ablation: [removal] metric misspelt": (
        ["ablate", "{toml}"], _ablation(append='[removal]\narm = "wide"\nmetric = "dice_wt"\n'),
        r"removal.metric: unknown metric 'dice_wt'.*did you mean 'dice_WT'"),
    "predict: --by misspelt": (
        ["predict", "--run", "any", "--input", "{work}/data", "--output", "{work}/out", "--top", "1", "--by", "dice_wt"], None,
        r"unknown metric 'dice_wt'.*did you mean 'dice_WT'"),
    "ablation: trials = \"many\"": (
        ["ablate", "{toml}"], _ablation(append='[search]\ntrials = "many"\n[search.params]\n"optim.lr" = {low = 1e-5, high = 1e-3}\n'),
        r"search.trials must be an integer, got 'many'"),
    "ablation: search bounds as strings": (
        ["ablate", "{toml}"], _ablation(append='[search]\ntrials = 2\n[search.params]\n"optim.lr" = {low = "1e-5", high = "1e-3"}\n'),
        r"search.params.optim.lr.low must be a finite number, got '1e-5'"),
    "ablation: log-scale search range from 0": (
        ["ablate", "{toml}"], _ablation(append='[search]\ntrials = 2\n[search.params]\n"optim.lr" = {low = 0.0, high = 1e-3, log = true}\n'),
        r"search.params.optim.lr: a log-scale range needs low > 0, got low = 0.0"),
    "ablation: search bound inf": (
        ["ablate", "{toml}"], _ablation(append='[search]\ntrials = 2\n[search.params]\n"optim.lr" = {low = 1e-5, high = inf}\n'),
        r"search.params.optim.lr.high must be a finite number, got inf"),
    "ablation: search over an integer key": (
        ["ablate", "{toml}"], _ablation(append='[search]\ntrials = 2\n[search.params]\n"model.width" = {low = 4, high = 8}\n'),
        r"\[search.params\] model.width in --set model.width=4.0: expected an integer"),
    "ablation: search.seed = -1": (
        ["ablate", "{toml}"], _ablation(append='[search]\ntrials = 2\nseed = -1\n[search.params]\n"optim.lr" = {low = 1e-5, high = 1e-3}\n'),
        r"search.seed must be between 0 and 2\*\*32 - 1, got -1"),
    "ablation: [phantom] corrupt_fraction = 2": (
        ["ablate", "{toml}"], _ablation(append='[phantom]\ncorrupt_fraction = 2\n'),
        r"phantom.corrupt_fraction must be between 0 and 1, got 2"),
    "ablation: [removal] fraction = nan": (
        ["ablate", "{toml}"], _ablation(append='[removal]\narm = "wide"\nfraction = nan\n'),
        r"removal.fraction must be a finite number, got nan"),
    **{f"evaluate: --rules {r} on 2020 data": (
        ["evaluate", "--pred", "{valid}/pred-data", "--gt", "{work}/data", "--out", "{work}/out/metrics.csv", "--rules", r], None,
        rf"--rules {r} does not fit .*data: rules '{r}' are written for brats2023 labels and the data's labels are brats2020 "
        r"\(1 NCR/NET, 2 ED, 4 ET\); rules that fit: brats2020$") for r in ("gli", "brats2023-gli")},
    "worker: SQLite storage that does not exist": (
        ["worker", "--study", "x", "--storage", "sqlite:///{work}/nowhere/x.db"], None, r"no Optuna storage at .*nowhere/x.db"),
    **{f"worker: password holding {c!r}": (
        ["worker", "--study", "x", "--storage", f"postgresql://user:Qm{c}{SECRET}@127.0.0.1:1/db"], None,
        r"cannot open the Optuna storage postgresql://user:\*\*\*@127.0.0.1:1/db") for c in "?#/@%:"},
}


@pytest.mark.parametrize("name", list(CONFIG_CORPUS))
def test_bad_configuration_is_refused_in_one_line_before_anything_is_written(name, valid, tiny_train, tmp_path):
    argv, toml, why = CONFIG_CORPUS[name]
    data = tmp_path / "data"
    shutil.copytree(valid / "data", data)
    if toml is not None:
        (tmp_path / "bad.toml").write_text(toml)
    if argv[0] == "train":
        argv = ["train", "--pipeline", "B", "--profile", "cpu", "--data", str(data), *_sets(tiny_train), *argv[1:]]
    if argv[0] == "ablate":
        argv = [*argv, "--data", str(data), "--storage", f"sqlite:///{tmp_path}/optuna.db"]
    argv = [a.replace("{toml}", str(tmp_path / "bad.toml")).replace("{work}", str(tmp_path)).replace("{valid}", str(valid))
            for a in argv]
    result = cli(argv, tmp_path)
    errors = [line for line in result.stderr.splitlines() if line.startswith("brats-lab: error:")]
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "Traceback" not in output, output[-3000:]
    assert len(errors) == 1 and re.search(why, errors[0]), output[-3000:]
    assert SECRET not in output
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "optuna.db").exists() and not (tmp_path / "nowhere").exists()
    assert not (tmp_path / "out").exists() and not (tmp_path / "synth").exists()


def test_corpus_names_are_unique():
    assert len(DATASET_CORPUS) == len({e.name for e in DATASET_CORPUS})
    assert len(PREDICTION_CORPUS) == len({e.name for e in PREDICTION_CORPUS})
    print(f"{len(DATASET_CORPUS)} broken datasets, {len(PREDICTION_CORPUS)} broken prediction folders, "
          f"{len(PAIRS)} (entry, command) pairs")
