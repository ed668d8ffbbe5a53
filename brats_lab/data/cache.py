"""The preprocessed-array cache: built once by `prepare`, memory-mapped by training and inference.

Layout (default `<root>/.brats-lab-cache/<method>/`; the dot keeps it out of case discovery, and
the cache travels with the dataset it was built from)::

    manifest.json                     written last: only finished, verified entries
    cases/<case id>/<key>/images.npy  float32 (4, z, y, x), normalised, cropped to the brain
                          labels.npy  uint8 (z, y, x) label map in the case's convention (if a seg)
                          meta.json   bbox, original geometry, input file hashes, array hashes

`<key>` is a hash of the case's input content and the preprocessing settings, so an entry's folder
name says exactly what it holds. A rebuilt case goes into a new folder and the old manifest keeps
pointing at the old, intact files until the new manifest replaces it; folders no manifest refers
to are removed only after that. A crash, or a case that fails, therefore never leaves a manifest
that claims unfinished or changed work, and entries finished before a crash are reused next time.

Change detection (`prepare`): an input file whose size, mtime_ns, ctime_ns and inode match what
was recorded is taken to have the recorded sha256 (cheap stat fingerprint); any other file is
hashed in full and its content hash decides. The mtime alone is not enough: a file rewritten in
place with the same size by `cp -p`, `tar` or `rsync -a` gets its old mtime back, but its ctime
(which no tool can set) moves and a replaced file has a new inode. File times come from a coarse
clock, so a file changed less than `_RACY_NS` before it was looked at could change again with the
same times: its fingerprint is not trusted next time, and it is hashed again (git's "racily
clean" rule). Cached arrays get a cheaper treatment: the .npy header (shape, dtype) and the file
size are always checked, the sha256 is recomputed when size or mtime changed (and always with
`verify_hashes=True`). `open_cache` does the cheap checks only.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from brats_lab import DataError
from brats_lab.data.cases import Case, discover
from brats_lab.data.preprocess import (
    BBOX_MARGIN,
    METHODS,
    PERCENTILES,
    PREPROCESS_VERSION,
    BBox,
    bbox_from_list,
    bbox_to_list,
    preprocess_case,
)
from brats_lab.files import atomic_path, file_lock, why_not_a_file, write_error, write_text
from brats_lab.io import Geometry
from brats_lab.labels import CONVENTIONS, LabelConvention

FORMAT_VERSION = 1
CACHE_DIRNAME = ".brats-lab-cache"
MANIFEST = "manifest.json"
# float32: exactly what preprocess_case returns (float16 would halve the disk, ~10 instead of
# ~20 GB for BraTS 2020, but rounds minmax values to 1e-3 and z-scores of bright voxels more).
IMAGES_DTYPE = np.dtype(np.float32)
LABELS_DTYPE = np.dtype(np.uint8)
_KEY = re.compile(r"^[0-9a-f]{16}$")
_CHUNK = 1 << 20
# A file whose mtime or ctime is this close to the moment its stat was taken may change again
# within the same tick of the filesystem's clock (coarser than 1 s on some filesystems).
_RACY_NS = 2_000_000_000
_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def default_cache_dir(root: Path, method: str) -> Path:
    """Where `prepare` puts the cache of dataset `root` for one normalisation method."""
    return Path(root) / CACHE_DIRNAME / method


def settings(method: str) -> dict:
    """Everything that changes the arrays for the same input; part of every entry's key."""
    if method not in METHODS:
        raise ValueError(f"unknown normalisation {method!r}; expected one of {METHODS}")
    return {
        "format_version": FORMAT_VERSION,
        "preprocess_version": PREPROCESS_VERSION,
        "method": method,
        "percentiles": list(PERCENTILES) if method == "minmax" else None,
        "bbox_margin": BBOX_MARGIN,
        "images_dtype": IMAGES_DTYPE.str,
        "labels_dtype": LABELS_DTYPE.str,
    }


@dataclass(frozen=True)
class CacheEntry:
    """What the cache knows about one case, without reading its arrays."""

    case_id: str
    dir: Path
    bbox: BBox  # (z, y, x) into the original volume
    geometry: Geometry  # of the original images: write predictions back with it
    convention: LabelConvention  # of the labels array
    shape: tuple[int, ...]  # images (4, z, y, x)
    has_labels: bool
    content_hash: str  # sha256 over the case's input files

    @property
    def original_shape(self) -> tuple[int, ...]:
        return self.geometry.shape


@dataclass
class PrepareReport:
    """What `prepare` did: case ids reused as they were, built (with why), and dropped."""

    reused: list[str] = field(default_factory=list)
    built: dict[str, str] = field(default_factory=dict)  # case id -> reason
    removed: list[str] = field(default_factory=list)  # in the old manifest, gone from the dataset

    def summary(self) -> str:
        parts = [f"{len(self.reused)} reused", f"{len(self.built)} built"]
        if self.removed:
            parts.append(f"{len(self.removed)} removed")
        reasons: dict[str, int] = {}
        for why in self.built.values():
            reasons[why.split(":")[0]] = reasons.get(why.split(":")[0], 0) + 1
        detail = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
        return ", ".join(parts) + (f" ({detail})" if detail else "")


class Cache:
    """A prepared cache, as its manifest describes it. Get one from `prepare` or `open_cache`."""

    def __init__(self, dir: Path, manifest: dict, report: PrepareReport | None = None) -> None:
        self.dir = Path(dir)
        self.manifest = manifest
        self.report = report or PrepareReport(reused=sorted(manifest["cases"]))

    @property
    def case_ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.manifest["cases"]))

    @property
    def manifest_hash(self) -> str:
        """sha256 of the inputs' content and the settings: log it with every run that uses the cache."""
        return self.manifest["manifest_hash"]

    @property
    def method(self) -> str:
        return self.manifest["settings"]["method"]

    def entry(self, case_id: str) -> CacheEntry:
        record = self._record(case_id)
        g = record["geometry"]
        return CacheEntry(
            case_id=case_id,
            dir=self.dir / record["dir"],
            bbox=bbox_from_list(record["bbox"]),
            geometry=Geometry(tuple(g["size"]), tuple(g["spacing"]), tuple(g["origin"]), tuple(g["direction"])),
            convention=CONVENTIONS[record["convention"]],
            shape=tuple(record["arrays"]["images"]["shape"]),
            has_labels="labels" in record["arrays"],
            content_hash=record["content_hash"],
        )

    def load(self, case_id: str, mmap: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """Images float32 (4, z, y, x) and labels uint8 (z, y, x) or None, read-only memory maps by default.

        Checks each file's header and size against the manifest (cheap) and raises DataError if
        they disagree: run `brats-lab data prepare` again.
        """
        record = self._record(case_id)
        out: list[Any] = []
        for name in ("images", "labels"):
            info = record["arrays"].get(name)
            if info is None:
                out.append(None)
                continue
            path = self.dir / record["dir"] / info["file"]
            problem = _check_array(path, info, hashes=False)
            if problem:
                raise DataError(f"{case_id}: {path}: cache entry is {problem}; run `brats-lab data prepare` again")
            out.append(np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False))
        return out[0], out[1]

    def _record(self, case_id: str) -> dict:
        try:
            return self.manifest["cases"][case_id]
        except KeyError:
            raise KeyError(f"{case_id}: not in the cache {self.dir}") from None

    def __repr__(self) -> str:
        return f"Cache({str(self.dir)!r}, {len(self.case_ids)} cases, {self.method}, {self.manifest_hash[:12]})"


# --- prepare ---------------------------------------------------------------------------------


def prepare(
    root: Path,
    method: str,
    cache_dir: Path | None = None,
    progress: bool = True,
    verify_hashes: bool = False,
) -> Cache:
    """Preprocess every case of dataset `root` into the cache, rebuilding only what changed.

    A case is reused when its entry matches its inputs (stat fingerprint, else sha256) and the
    settings, and its arrays pass the checks (header, size, and sha256 when their stat changed, or
    always with `verify_hashes`). Anything else is built again: new, changed input, changed
    settings, missing or corrupt arrays. Cases gone from `root` leave the manifest.

    Cases that fail raise one DataError at the end, naming each case and file; the previous
    manifest is then left as it was (the cases that did succeed are kept for the next run).
    `Cache.report` says what was reused, built and removed. The default `cache_dir` lies inside
    `root`; give another one for a read-only dataset.
    """
    root = Path(root)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir(root, method)
    config = settings(method)
    cases = discover(root)  # first: a wrong root is refused before anything is created
    # One prepare at a time per cache: ablation workers start together and would otherwise build
    # (and clean up) the same entry folders under each other. The later ones then reuse everything.
    with file_lock(cache_dir / ".lock"):
        return _prepare_locked(root, cases, config, cache_dir, progress, verify_hashes)


def _prepare_locked(
    root: Path, cases: list[Case], config: dict, cache_dir: Path, progress: bool, verify_hashes: bool
) -> Cache:
    method, settings_hash = config["method"], _sha256_json(config)
    old = _read_manifest(cache_dir)
    old_cases = old["cases"] if old and old.get("settings") == config else {}

    report = PrepareReport()
    records: dict[str, dict] = {}
    errors: list[str] = []
    # Training data come with a segmentation per case, test data with none: a mix means a file
    # went missing, and the case would otherwise enter training without labels.
    expect_seg = any(c.seg is not None for c in cases)
    bar = tqdm(cases, desc=f"prepare {method}", unit="case", file=sys.stderr, disable=not progress)
    for case in bar:
        bar.set_postfix_str(case.id, refresh=False)
        try:
            case.require_usable()
            if expect_seg and case.seg is None:
                raise DataError(f"{case.id}: {case.dir}: no segmentation file (other cases of this dataset have one)")
            known = _known_inputs(cache_dir, case.id, old_cases.get(case.id))
            inputs = _hash_inputs(case, root, known, verify_hashes)
            content_hash = _content_hash(inputs)
            key = _sha256_json({"settings": settings_hash, "content": content_hash})[:16]
            rel_dir = f"cases/{case.id}/{key}"
            record, problem = _reusable(cache_dir, rel_dir, verify_hashes)
            if record is None:
                record = _build(case, method, cache_dir, rel_dir, inputs, content_hash, key)
                report.built[case.id] = _why(old, config, old_cases.get(case.id), key, problem)
            else:
                report.reused.append(case.id)
            record["inputs"] = inputs  # fresh stats, so the next run's fingerprints match
            records[case.id] = record
        except DataError as e:
            errors.append(str(e))
    bar.close()
    if errors:
        head = f"{len(errors)} of {len(cases)} cases failed, cache manifest not updated:"
        raise DataError("\n".join([head, *errors]))

    report.removed = sorted(set(old["cases"] if old else ()) - set(records))
    manifest = {
        "format_version": FORMAT_VERSION,
        "settings": config,
        "settings_hash": settings_hash,
        "manifest_hash": _sha256_json(
            {"settings": config, "cases": {k: r["content_hash"] for k, r in records.items()}}
        ),
        "root": str(root.resolve()),
        "cases": dict(sorted(records.items())),
    }
    write_text(cache_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")  # last: the commit point
    _remove_unreferenced(cache_dir, manifest)
    return Cache(cache_dir, manifest, report)


def open_cache(
    root: Path | None, method: str, cache_dir: Path | None = None, check_inputs: bool = True
) -> Cache:
    """Open a prepared cache without rebuilding; raise DataError if it is missing, stale or damaged.

    Cheap checks: every array's header and size. With `root` and `check_inputs`, also that the
    dataset holds the same cases and that each input file's size and mtime are as recorded (a file
    whose stat changed is hashed; only a different content hash makes the cache stale). Give
    `root=None` with an explicit `cache_dir` to use a cache without its raw data.
    """
    if cache_dir is None:
        if root is None:
            raise ValueError("open_cache needs root or cache_dir")
        cache_dir = default_cache_dir(root, method)
    cache_dir = Path(cache_dir)
    hint = f"run `brats-lab data prepare {root if root is not None else 'DIR'}`"
    manifest = _read_manifest(cache_dir)
    if manifest is None:
        raise DataError(f"{cache_dir}: no cache here (no readable {MANIFEST}); {hint}")
    if manifest.get("settings") != settings(method):
        raise DataError(f"{cache_dir / MANIFEST}: built with other settings {manifest.get('settings')}; {hint}")
    problems = []
    if root is not None and check_inputs:
        cases = {c.id: c for c in discover(root)}
        for case_id in sorted(set(cases) ^ set(manifest["cases"])):
            problems.append(f"{case_id}: {'new case' if case_id in cases else 'case gone from the dataset'}")
        for case_id in sorted(set(cases) & set(manifest["cases"])):
            record = manifest["cases"][case_id]
            try:
                inputs = _hash_inputs(cases[case_id], Path(root), record["inputs"], False)
            except DataError as e:
                problems.append(str(e))
                continue
            if _content_hash(inputs) != record["content_hash"]:
                problems.append(f"{case_id}: input files changed")
    for case_id, record in sorted(manifest["cases"].items()):
        for info in record["arrays"].values():
            path = cache_dir / record["dir"] / info["file"]
            problem = _check_array(path, info, hashes=False)
            if problem:
                problems.append(f"{case_id}: {path}: {problem}")
    if problems:
        head = f"{cache_dir}: cache is stale or damaged ({len(problems)} problems); {hint}:"
        raise DataError("\n".join([head, *problems]))
    return Cache(cache_dir, manifest)


# --- entries ---------------------------------------------------------------------------------


def _build(
    case: Case, method: str, cache_dir: Path, rel_dir: str, inputs: dict, content_hash: str, key: str
) -> dict:
    pre = preprocess_case(case, method)
    entry_dir = cache_dir / rel_dir
    if entry_dir.exists():  # a damaged earlier try at the same key
        shutil.rmtree(entry_dir)
    arrays = {"images": _write_array(entry_dir / "images.npy", pre.images.astype(IMAGES_DTYPE, copy=False))}
    if pre.labels is not None:
        arrays["labels"] = _write_array(entry_dir / "labels.npy", pre.labels.astype(LABELS_DTYPE, copy=False))
    g = pre.geometry
    record = {
        "dir": rel_dir,
        "key": key,
        "content_hash": content_hash,
        "inputs": inputs,
        "convention": pre.convention.name,
        "bbox": bbox_to_list(pre.bbox),
        "geometry": {"size": g.size, "spacing": g.spacing, "origin": g.origin, "direction": g.direction},
        "arrays": arrays,
    }
    # meta.json after the arrays: an entry folder with a meta.json is a finished one.
    write_text(entry_dir / "meta.json", json.dumps(record, indent=1) + "\n")
    return record


def _write_array(path: Path, array: np.ndarray) -> dict:
    try:
        with atomic_path(path, suffix=".npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    except OSError as e:  # numpy says "N requested and M written" on a full disk: name the file and why
        raise write_error(path, e, f"could not write the cached array ({array.nbytes} bytes)") from None
    stat = path.stat()
    return {
        "file": path.name,
        "shape": list(array.shape),
        "dtype": array.dtype.str,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": _sha256_file(path),
    }


def _reusable(cache_dir: Path, rel_dir: str, verify_hashes: bool) -> tuple[dict | None, str | None]:
    """The finished entry at `rel_dir` if its arrays check out, else (None, what is wrong)."""
    meta = cache_dir / rel_dir / "meta.json"
    if not meta.is_file():
        return None, None
    try:
        record = json.loads(meta.read_text())
        arrays = record["arrays"]
    except (OSError, ValueError, KeyError, TypeError):
        return None, "meta.json unreadable"
    if "images" not in arrays:
        return None, "images.npy not recorded"
    before = json.dumps(arrays, sort_keys=True)
    for info in arrays.values():
        problem = _check_array(cache_dir / rel_dir / info["file"], info, hashes=True, always_hash=verify_hashes)
        if problem:
            return None, f"{info['file']} {problem}"
    if json.dumps(arrays, sort_keys=True) != before:  # touched but same content: keep the new stat
        write_text(meta, json.dumps(record, indent=1) + "\n")
    return record, None


def _check_array(path: Path, info: dict, hashes: bool, always_hash: bool = False) -> str | None:
    """What is wrong with a cached .npy file, or None. Header, size, then (maybe) content hash."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "missing"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = _HEADER_READERS.get(version)
            if read_header is None:
                return f"unreadable (.npy format version {version})"
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except (OSError, ValueError, EOFError) as e:
        return f"unreadable ({e})"
    if list(shape) != list(info["shape"]) or dtype.str != info["dtype"] or fortran:
        return f"of shape {list(shape)} {dtype.str}, expected {info['shape']} {info['dtype']}"
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    if stat.st_size != expected or stat.st_size != info["size"]:
        return f"truncated or padded ({stat.st_size} bytes, expected {expected})"
    if hashes and (always_hash or stat.st_mtime_ns != info["mtime_ns"]):
        if _sha256_file(path) != info["sha256"]:
            return "changed (sha256 differs)"
        info["mtime_ns"] = stat.st_mtime_ns  # same content, touched: remember the new stat
    return None


def _why(old: dict | None, config: dict, old_record: dict | None, key: str, problem: str | None) -> str:
    if problem:
        return f"corrupt: {problem}"
    if old is not None and old.get("settings") != config:
        return "settings changed"
    if old_record is None:
        return "new"
    if old_record.get("key") != key:
        return "input changed"
    return "corrupt: entry missing"


# --- inputs ----------------------------------------------------------------------------------


def _known_inputs(cache_dir: Path, case_id: str, old_record: dict | None) -> dict:
    """Recorded (stat, sha256) of a case's input files: from the manifest, else from any finished
    entry folder of the case (an entry built by a run that crashed before its manifest)."""
    if old_record is not None:
        return old_record.get("inputs", {})
    for meta in sorted((cache_dir / "cases" / case_id).glob("*/meta.json")):
        try:
            return json.loads(meta.read_text())["inputs"]
        except (OSError, ValueError, KeyError):
            continue
    return {}


def _hash_inputs(case: Case, root: Path, known: dict, verify_hashes: bool) -> dict:
    """Per input file (modality name or 'seg'): path relative to `root`, size, mtime_ns,
    ctime_ns, inode, sha256, and `racy` (the file had changed just before it was looked at).

    The sha256 is taken from `known` when its record is not racy and path, size, mtime_ns,
    ctime_ns and inode all match (the stat fingerprint), else computed by reading the file.
    """
    out = {}
    for name, path in case.files().items():
        try:
            stat = path.stat()
        except OSError:
            raise DataError(f"{case.id}: {path}: {why_not_a_file(path)}") from None
        seen = {"path": os.path.relpath(path, root), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}
        racy = time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) < _RACY_NS
        prev = known.get(name)
        # A record without `racy` or `ctime_ns` (older manifests) is not trusted either.
        same = prev is not None and prev.get("racy") is False and all(prev.get(k) == v for k, v in seen.items())
        try:
            sha = prev["sha256"] if same and not verify_hashes else _sha256_file(path)  # type: ignore[index]
        except PermissionError:
            raise DataError(f"{case.id}: {path}: permission denied (the file cannot be read)") from None
        out[name] = {**seen, "sha256": sha, "racy": racy}
    return out


# --- helpers ---------------------------------------------------------------------------------


def _read_manifest(cache_dir: Path) -> dict | None:
    path = cache_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # unreadable: treated as no manifest, everything is checked again
    if not isinstance(manifest, dict) or "cases" not in manifest:
        return None
    if manifest.get("format_version") != FORMAT_VERSION:
        return None  # another layout: rebuilt from scratch
    return manifest


def _remove_unreferenced(cache_dir: Path, manifest: dict) -> None:
    """Delete entry folders no manifest refers to. Only our own `cases/<id>/<16 hex>` folders."""
    keep = {r["dir"] for r in manifest["cases"].values()}
    cases_dir = cache_dir / "cases"
    if not cases_dir.is_dir():
        return
    for case_dir in cases_dir.iterdir():
        if not case_dir.is_dir():
            continue
        for entry in case_dir.iterdir():
            if entry.is_dir() and _KEY.match(entry.name) and f"cases/{case_dir.name}/{entry.name}" not in keep:
                shutil.rmtree(entry, ignore_errors=True)
        if not any(case_dir.iterdir()):
            case_dir.rmdir()


def _content_hash(inputs: dict) -> str:
    """The case's content hash: sha256 over its input files' names and sha256s (hash of hashes)."""
    return _sha256_json({name: info["sha256"] for name, info in inputs.items()})


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sha256_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
