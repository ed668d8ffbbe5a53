"""The cache: same arrays as preprocess_case, nothing rebuilt twice, stale and corrupt entries caught."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from brats_lab import DataError
from brats_lab.data.cache import CACHE_DIRNAME, MANIFEST, open_cache, prepare
from brats_lab.data.cases import discover
from brats_lab.data.preprocess import preprocess_case
from brats_lab.io import read_image, write_image

IDS = [f"BraTS20_Training_{i:03d}" for i in range(1, 4)]
SIZE = (20, 18, 14)  # (x, y, z): tiny, the cache logic does not care


@pytest.fixture
def dataset(tmp_path: Path, case_writer) -> Path:
    root = tmp_path / "data"
    for i, case_id in enumerate(IDS):
        case_writer(root, case_id, size=SIZE, seed=i)
    return root


def images_path(cache, case_id: str) -> Path:
    return cache.entry(case_id).dir / "images.npy"


def test_prepare_then_load_matches_preprocess_case(dataset: Path) -> None:
    cache = prepare(dataset, "minmax", progress=False)
    assert cache.dir == dataset / CACHE_DIRNAME / "minmax"
    assert cache.case_ids == tuple(IDS)
    assert sorted(cache.report.built) == IDS and cache.report.reused == []
    for case in discover(dataset):
        pre = preprocess_case(case, "minmax")
        images, labels = cache.load(case.id)
        assert isinstance(images, np.memmap) and not images.flags.writeable
        assert images.dtype == np.float32 and labels.dtype == np.uint8
        np.testing.assert_array_equal(images, pre.images)
        np.testing.assert_array_equal(labels, pre.labels)
        entry = cache.entry(case.id)
        assert entry.bbox == pre.bbox and entry.geometry == pre.geometry
        assert entry.convention is pre.convention and entry.has_labels
    images, _ = cache.load(IDS[0], mmap=False)
    assert type(images) is np.ndarray
    manifest = json.loads((cache.dir / MANIFEST).read_text())
    assert manifest["manifest_hash"] == cache.manifest_hash and len(cache.manifest_hash) == 64
    assert set(manifest["cases"][IDS[0]]["inputs"]) == {"t1", "t1ce", "t2", "flair", "seg"}


def test_second_prepare_reuses_everything(dataset: Path) -> None:
    first = prepare(dataset, "minmax", progress=False)
    mtimes = {p: p.stat().st_mtime_ns for p in first.dir.rglob("*.npy")}
    second = prepare(dataset, "minmax", progress=False)
    assert second.report.built == {} and second.report.reused == IDS
    assert second.manifest_hash == first.manifest_hash
    assert {p: p.stat().st_mtime_ns for p in second.dir.rglob("*.npy")} == mtimes
    assert "3 reused, 0 built" in second.report.summary()


def test_touched_but_unchanged_input_is_reused(dataset: Path) -> None:
    prepare(dataset, "minmax", progress=False)
    t1 = next((dataset / IDS[0]).glob("*_t1.nii.gz"))
    t1.write_bytes(t1.read_bytes())  # new mtime, same content: the hash decides
    cache = prepare(dataset, "minmax", progress=False)
    assert cache.report.built == {}
    open_cache(dataset, "minmax")  # the new stat was recorded


def test_changed_input_rebuilds_exactly_that_case(dataset: Path, case_writer) -> None:
    first = prepare(dataset, "minmax", progress=False)
    case_writer(dataset, IDS[1], size=SIZE, seed=99)  # same files, other voxels
    with pytest.raises(DataError, match=f"{IDS[1]}: input files changed"):
        open_cache(dataset, "minmax")
    second = prepare(dataset, "minmax", progress=False)
    assert second.report.built == {IDS[1]: "input changed"}
    assert second.report.reused == [IDS[0], IDS[2]]
    assert second.manifest_hash != first.manifest_hash
    pre = preprocess_case(discover(dataset)[1], "minmax")
    np.testing.assert_array_equal(second.load(IDS[1])[0], pre.images)
    # the old entry's folder is gone, one entry per case remains
    assert not first.entry(IDS[1]).dir.exists()
    assert len(list((second.dir / "cases" / IDS[1]).iterdir())) == 1


@pytest.mark.parametrize("damage, why", [
    ("truncate", r"images\.npy truncated or padded \(\d+ bytes, expected \d+\)"),
    ("delete", r"images\.npy missing"),
    ("flip a byte", r"images\.npy changed \(sha256 differs\)"),
    ("wrong dtype", r"images\.npy of shape \[4, \d+, \d+, \d+\] <f8, expected \[4, \d+, \d+, \d+\] <f4"),
])
def test_damaged_array_is_detected_and_rebuilt(dataset: Path, damage: str, why: str) -> None:
    cache = prepare(dataset, "minmax", progress=False)
    path = images_path(cache, IDS[2])
    good = np.load(path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "delete":
        path.unlink()
    elif damage == "flip a byte":
        data = bytearray(path.read_bytes())
        data[-5] ^= 0xFF
        path.write_bytes(data)  # same size; the new mtime makes prepare hash it
    else:
        np.save(path, good.astype(np.float64))
    if damage != "flip a byte":  # cheap checks see shape, dtype and size only
        with pytest.raises(DataError, match=IDS[2]):
            open_cache(dataset, "minmax")
        with pytest.raises(DataError, match=IDS[2]):
            cache.load(IDS[2])
    again = prepare(dataset, "minmax", progress=False)
    assert list(again.report.built) == [IDS[2]] and re.fullmatch(f"corrupt: {why}", again.report.built[IDS[2]])
    np.testing.assert_array_equal(again.load(IDS[2])[0], good)
    open_cache(dataset, "minmax")


def test_verify_hashes_catches_damage_that_kept_the_stat(dataset: Path) -> None:
    import os

    cache = prepare(dataset, "minmax", progress=False)
    path = images_path(cache, IDS[0])
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # bit rot: content changed, stat did not
    assert prepare(dataset, "minmax", progress=False).report.built == {}
    again = prepare(dataset, "minmax", progress=False, verify_hashes=True)
    assert list(again.report.built) == [IDS[0]]


def test_method_changes_the_manifest_hash_and_folder(dataset: Path) -> None:
    a = prepare(dataset, "minmax", progress=False)
    b = prepare(dataset, "zscore", progress=False)
    assert a.dir != b.dir and a.manifest_hash != b.manifest_hash
    with pytest.raises(DataError, match="other settings"):
        open_cache(None, "zscore", cache_dir=a.dir)
    # the same folder with other settings: everything is rebuilt
    c = prepare(dataset, "zscore", cache_dir=a.dir, progress=False)
    assert set(c.report.built.values()) == {"settings changed"}
    assert c.manifest_hash == b.manifest_hash  # inputs + settings, not where the cache lives


def test_removed_and_added_cases(dataset: Path, case_writer) -> None:
    prepare(dataset, "minmax", progress=False)
    shutil.rmtree(dataset / IDS[0])
    case_writer(dataset, "BraTS20_Training_009", size=SIZE, seed=9)
    with pytest.raises(DataError, match="case gone from the dataset"):
        open_cache(dataset, "minmax")
    cache = prepare(dataset, "minmax", progress=False)
    assert cache.case_ids == (IDS[1], IDS[2], "BraTS20_Training_009")
    assert cache.report.removed == [IDS[0]] and cache.report.built == {"BraTS20_Training_009": "new"}
    assert not (cache.dir / "cases" / IDS[0]).exists()
    with pytest.raises(KeyError, match=IDS[0]):
        cache.load(IDS[0])


def test_bad_case_raises_and_keeps_the_previous_manifest(dataset: Path, case_writer) -> None:
    first = prepare(dataset, "minmax", progress=False)
    manifest = (first.dir / MANIFEST).read_bytes()
    case_writer(dataset, IDS[0], size=SIZE, seed=7)  # a change that would be rebuilt...
    flair = dataset / IDS[1] / f"{IDS[1]}_flair.nii.gz"
    flair.write_bytes(flair.read_bytes()[:200])  # ...and a broken file
    with pytest.raises(DataError, match=rf"{IDS[1]}: .*_flair\.nii\.gz: truncated") as info:
        prepare(dataset, "minmax", progress=False)
    assert "1 of 3 cases failed" in str(info.value)
    assert (first.dir / MANIFEST).read_bytes() == manifest
    # the old manifest still describes intact files
    old = open_cache(None, "minmax", cache_dir=first.dir)
    np.testing.assert_array_equal(old.load(IDS[0])[0], first.load(IDS[0])[0])
    # once fixed, the case rebuilt before the failure is reused, not built again
    case_writer(dataset, IDS[1], size=SIZE, seed=1)
    fixed = prepare(dataset, "minmax", progress=False)
    assert fixed.report.built == {} and fixed.report.reused == IDS
    assert fixed.manifest_hash != first.manifest_hash
    np.testing.assert_array_equal(fixed.load(IDS[0])[0], preprocess_case(discover(dataset)[0], "minmax").images)


def test_crash_before_the_manifest_leaves_it_valid(dataset: Path, case_writer, monkeypatch) -> None:
    from brats_lab.data import cache as cache_module

    first = prepare(dataset, "minmax", progress=False)
    case_writer(dataset, IDS[0], size=SIZE, seed=5)
    case_writer(dataset, IDS[2], size=SIZE, seed=6)
    real_build = cache_module._build
    calls = []

    def crash_on_second(*args, **kwargs):
        calls.append(args[0].id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_build(*args, **kwargs)

    monkeypatch.setattr(cache_module, "_build", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(dataset, "minmax", progress=False)
    old = open_cache(None, "minmax", cache_dir=first.dir)  # old manifest, old files: intact
    assert old.manifest_hash == first.manifest_hash
    monkeypatch.setattr(cache_module, "_build", real_build)
    done = prepare(dataset, "minmax", progress=False)
    assert list(done.report.built) == [IDS[2]]  # IDS[0] was finished before the crash


def test_case_without_seg(tmp_path: Path, case_writer) -> None:
    case_writer(tmp_path, "BraTS20_Validation_001", size=SIZE, with_seg=False)
    cache = prepare(tmp_path, "zscore", progress=False)
    images, labels = cache.load("BraTS20_Validation_001")
    assert labels is None and images.shape[0] == 4 and not cache.entry("BraTS20_Validation_001").has_labels


def test_progress_bar_goes_to_stderr(dataset: Path, capsys) -> None:
    prepare(dataset, "minmax", progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "prepare minmax" in err


def test_phantom_dataset_round_trip(request: pytest.FixtureRequest) -> None:
    root = request.getfixturevalue("phantom_dataset")
    cache_dir = request.getfixturevalue("tmp_path") / "cache"  # the session fixture is read-only
    cache = prepare(root, "minmax", cache_dir=cache_dir, progress=False)
    case = discover(root)[0]
    images, labels = cache.load(case.id)
    pre = preprocess_case(case, "minmax")
    np.testing.assert_array_equal(images, pre.images)
    np.testing.assert_array_equal(labels, pre.labels)


def test_concurrent_prepares_of_one_cache_do_not_trip_over_each_other(dataset: Path) -> None:
    # Ablation workers start together and each prepares the cache; unserialised, one removed the
    # entry folder the other was writing into (a CI run failed on exactly that).
    script = (
        "import sys; from brats_lab.data.cache import prepare; "
        "print(prepare(sys.argv[1], 'minmax', progress=False).report.summary())"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(dataset)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    summaries = sorted(out.strip() for out, _ in outputs)
    n = len(discover(dataset))
    # Exactly one process built the cases; the others found them finished and reused them all.
    assert summaries == sorted([f"0 reused, {n} built ({n} new)"] + [f"{n} reused, 0 built"] * 2)
    cache = open_cache(dataset, "minmax")
    for case_id in cache.case_ids:
        cache.load(case_id)


def test_a_preprocessing_version_bump_rebuilds_every_case(dataset: Path, monkeypatch) -> None:
    """New preprocessing code (a bumped PREPROCESS_VERSION) makes every entry stale, though no
    input and no setting changed: arrays made by the old code must not be served."""
    from brats_lab.data import cache as cache_module

    first = prepare(dataset, "minmax", progress=False)
    monkeypatch.setattr(cache_module, "PREPROCESS_VERSION", cache_module.PREPROCESS_VERSION + 1)
    with pytest.raises(DataError, match="other settings"):
        open_cache(dataset, "minmax")
    second = prepare(dataset, "minmax", progress=False)
    assert second.report.built == {case_id: "settings changed" for case_id in IDS}
    assert second.manifest_hash != first.manifest_hash


# --------------------------------------------------------------------------------------------
# Rebuilt exactly when something the arrays depend on changed, over drawn sequences of edits


def _uncompressed(root: Path) -> None:
    """Rewrite every .nii.gz of `root` as .nii: a byte of its voxel data can then be changed in
    place, same size, and the file still reads (a gzip stream would fail its checksum)."""
    for path in sorted(root.rglob("*.nii.gz")):
        array, geometry = read_image(path)
        write_image(array, geometry, path.with_suffix(""))
        path.unlink()


def _edit_voxel(path: Path, rng: np.random.Generator) -> None:
    """Change one voxel of an uncompressed NIfTI in place: same size, still a valid file (a
    segmentation voxel becomes another BraTS 2020 label)."""
    array, _ = read_image(path)
    data = bytearray(path.read_bytes())
    start = len(data) - array.nbytes  # the voxels are the file's tail
    at = start + int(rng.integers(array.nbytes))
    if path.name.endswith("_seg.nii"):
        data[at] = int(rng.choice([v for v in (0, 1, 2, 4) if v != data[at]]))
    else:
        data[at] ^= int(rng.integers(1, 256))
    path.write_bytes(data)


def test_an_entry_is_rebuilt_exactly_when_its_inputs_or_settings_change(dataset: Path, monkeypatch) -> None:
    """Seeded sequences of what happens to a dataset between two prepares: a voxel changed in
    place (same size; sometimes with the old mtime put back, as `cp -p`, `tar` and `rsync -a`
    leave it), a change made and undone, a file touched, rewritten with the same bytes or
    replaced by a copy; the normalisation switched, its percentiles changed, the preprocessing
    version bumped. After each prepare: exactly the cases whose input bytes changed are built
    (all of them when the settings changed), the others reused, and every case's arrays are what
    preprocessing today's files gives."""
    from brats_lab.data import cache as cache_module
    from brats_lab.data import preprocess

    _uncompressed(dataset)
    cache_dir = dataset.parent / "cache"  # one folder whatever the method: a switch is a settings change
    version, percentiles = cache_module.PREPROCESS_VERSION, preprocess.PERCENTILES
    rng = np.random.default_rng(1)

    def content() -> dict[str, dict[str, bytes]]:
        return {c.id: {name: p.read_bytes() for name, p in c.files().items()} for c in discover(dataset)}

    def setting() -> tuple:  # what the arrays depend on besides the files (percentiles: minmax only)
        return method, cache_module.PREPROCESS_VERSION, preprocess.PERCENTILES if method == "minmax" else None

    kinds = ["edit", "edit, same mtime", "edit and undo", "touch", "rewrite", "copy", "method", "percentiles", "version"]
    method, built_with, seen = "minmax", None, set()
    for step in range(24):
        before = content()
        done = []
        for _ in range(int(rng.integers(1, 3))):
            what = str(rng.choice(kinds))
            seen.add(what)
            case = discover(dataset)[int(rng.integers(len(IDS)))]
            path = list(case.files().values())[int(rng.integers(5))]
            done.append(what if what in ("method", "percentiles", "version") else f"{what} {path.name}")
            stat = path.stat()
            if what.startswith("edit"):
                original = path.read_bytes()
                _edit_voxel(path, rng)
                if what == "edit and undo":
                    path.write_bytes(original)
                if what != "edit":
                    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
            elif what == "touch":
                os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
            elif what == "rewrite":
                path.write_bytes(path.read_bytes())
            elif what == "copy":  # a new file (inode) with the same bytes and times, as `cp -p`
                shutil.copy2(path, path.with_name("copy"))
                os.replace(path.with_name("copy"), path)
            elif what == "method":
                method = "zscore" if method == "minmax" else "minmax"
            elif what == "percentiles":  # in both modules: preprocessing really changes
                new = percentiles if preprocess.PERCENTILES != percentiles else (2.0, 98.0)
                monkeypatch.setattr(preprocess, "PERCENTILES", new)
                monkeypatch.setattr(cache_module, "PERCENTILES", new)
            else:
                monkeypatch.setattr(cache_module, "PREPROCESS_VERSION", int(rng.choice([version, version + 1])))
        after = content()
        cache = prepare(dataset, method, cache_dir=cache_dir, progress=False)

        if built_with == setting():
            changed = sorted(c for c in IDS if after[c] != before[c])
        else:  # the first prepare, or other settings than the entries were built with
            changed = IDS
        built_with = setting()
        assert sorted(cache.report.built) == changed, f"step {step}: {done}"
        assert cache.report.reused == [c for c in IDS if c not in changed], f"step {step}: {done}"
        for case in discover(dataset):
            images, labels = cache.load(case.id)
            pre = preprocess_case(case, method)
            np.testing.assert_array_equal(images, pre.images, err_msg=f"step {step}: {case.id}")
            np.testing.assert_array_equal(labels, pre.labels, err_msg=f"step {step}: {case.id}")
    assert seen == set(kinds)  # every kind of change was drawn


def test_inputs_are_read_again_only_when_their_stat_cannot_be_trusted(dataset: Path, monkeypatch) -> None:
    """The stat fingerprint spares reading every input file at every prepare (each training starts
    with one); a file changed just before it was looked at is read again next time, since it may
    have changed again within the same tick of the filesystem's clock."""
    from brats_lab.data import cache as cache_module

    real = cache_module._sha256_file
    hashed: list[str] = []
    monkeypatch.setattr(cache_module, "_sha256_file", lambda path: hashed.append(path.name) or real(path))
    prepare(dataset, "minmax", progress=False)  # the files were written a moment ago: racy
    hashed.clear()
    prepare(dataset, "minmax", progress=False)
    assert len([name for name in hashed if ".nii" in name]) == 15  # 3 cases x 5 files
    monkeypatch.setattr(cache_module, "_RACY_NS", 0)  # as if they had been written long ago
    prepare(dataset, "minmax", progress=False)
    hashed.clear()
    assert prepare(dataset, "minmax", progress=False).report.reused == IDS
    assert hashed == []
    prepare(dataset, "minmax", progress=False, verify_hashes=True)  # trusts no stat: reads every file
    assert len([name for name in hashed if ".nii" in name]) == 15


def test_the_recorded_settings_are_the_ones_every_version_compares(dataset: Path) -> None:
    """The manifest's settings are compared, key by key, by the next brats-lab that opens the cache:
    a key renamed or a value written another way would rebuild every user's cache."""
    from brats_lab.data.cache import settings
    from brats_lab.data.preprocess import BBOX_MARGIN, PERCENTILES, PREPROCESS_VERSION

    cache = prepare(dataset, "minmax", progress=False)
    assert json.loads((cache.dir / MANIFEST).read_text())["settings"] == {
        "format_version": 1, "preprocess_version": PREPROCESS_VERSION, "method": "minmax", "percentiles": list(PERCENTILES),
        "bbox_margin": BBOX_MARGIN, "images_dtype": "<f4", "labels_dtype": "|u1"}
    assert settings("zscore")["percentiles"] is None  # z-scores clip nothing
    with pytest.raises(ValueError, match=r"^unknown normalisation 'minmaxx'; expected one of \('minmax', 'zscore'\)$"):
        settings("minmaxx")


def _sha256_json(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def test_the_records_on_disk_are_recomputed_from_the_files_alone(dataset: Path, monkeypatch) -> None:
    """The manifest's and each entry's names and hashes, recomputed here from the input files with
    hashlib: the next brats-lab reads these records, so a name written another way or a hash
    taken over other fields rebuilds (or wrongly reuses) every user's cache, which a test that
    builds and reuses with the same code cannot see."""
    from brats_lab.data import cache as cache_module

    monkeypatch.setattr(cache_module, "_RACY_NS", 0)  # files written long ago: `racy` is False
    cache = prepare(dataset, "minmax", progress=False)
    manifest = json.loads((cache.dir / MANIFEST).read_text())
    assert set(manifest) == {"format_version", "settings", "settings_hash", "manifest_hash", "root", "cases"}
    settings_hash = _sha256_json(manifest["settings"])
    assert manifest["format_version"] == 1 and manifest["settings_hash"] == settings_hash
    assert manifest["root"] == str(dataset.resolve())
    assert list(manifest["cases"]) == IDS
    content_hashes = {}
    for case in discover(dataset):
        record, files = manifest["cases"][case.id], case.files()
        sha = {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in files.items()}
        for name, path in files.items():
            stat = path.stat()
            assert record["inputs"][name] == {
                "path": str(path.relative_to(dataset)), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino, "sha256": sha[name], "racy": False}, name
        assert set(record["inputs"]) == set(files) == {"t1", "t1ce", "t2", "flair", "seg"}
        content_hashes[case.id] = record["content_hash"]
        assert record["content_hash"] == _sha256_json(sha)
        key = _sha256_json({"settings": settings_hash, "content": record["content_hash"]})[:16]
        assert record["key"] == key and record["dir"] == f"cases/{case.id}/{key}"
        meta = json.loads((cache.dir / record["dir"] / "meta.json").read_text())
        assert meta == record  # the entry's own record: what a crash before the manifest leaves
    assert manifest["manifest_hash"] == _sha256_json({"settings": manifest["settings"], "cases": content_hashes})
    assert cache.manifest_hash == manifest["manifest_hash"]


def test_an_entry_finished_before_a_crash_spares_reading_its_inputs_again(dataset: Path, monkeypatch) -> None:
    """A first prepare that crashed before its manifest: the entries it finished still record their
    inputs' stat, so the next prepare reuses them without reading those files again (an unreadable
    entry folder of the same case beside it is passed over)."""
    from brats_lab.data import cache as cache_module

    monkeypatch.setattr(cache_module, "_RACY_NS", 0)
    real_build, real_hash = cache_module._build, cache_module._sha256_file
    built: list[str] = []

    def crash_on_second(case, *args, **kwargs):
        built.append(case.id)
        if len(built) == 2:
            raise KeyboardInterrupt
        return real_build(case, *args, **kwargs)

    monkeypatch.setattr(cache_module, "_build", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        prepare(dataset, "minmax", progress=False)
    assert not (dataset / CACHE_DIRNAME / "minmax" / MANIFEST).exists()
    monkeypatch.setattr(cache_module, "_build", real_build)
    unreadable = dataset / CACHE_DIRNAME / "minmax" / "cases" / IDS[0] / ("0" * 16) / "meta.json"  # sorts first
    unreadable.parent.mkdir()
    unreadable.write_text("{")
    hashed: list[Path] = []
    monkeypatch.setattr(cache_module, "_sha256_file", lambda path: hashed.append(path) or real_hash(path))
    again = prepare(dataset, "minmax", progress=False)
    assert again.report.reused == [IDS[0]] and again.report.built == {IDS[1]: "new", IDS[2]: "new"}
    read = {path.parent.name for path in hashed if ".nii" in path.name}
    assert read == {IDS[1], IDS[2]}  # IDS[0]'s five files were known from its entry


def test_a_deleted_entry_folder_is_rebuilt_and_said_missing(dataset: Path) -> None:
    first = prepare(dataset, "minmax", progress=False)
    shutil.rmtree(first.entry(IDS[1]).dir)
    again = prepare(dataset, "minmax", progress=False)
    assert again.report.built == {IDS[1]: "corrupt: entry missing"} and again.report.reused == [IDS[0], IDS[2]]


def test_a_case_without_segmentation_among_cases_with_one_is_refused(dataset: Path) -> None:
    (dataset / IDS[1] / f"{IDS[1]}_seg.nii.gz").unlink()
    with pytest.raises(DataError, match=f"^1 of 3 cases failed, cache manifest not updated:\n{IDS[1]}: {dataset / IDS[1]}: "
                                        r"no segmentation file \(other cases of this dataset have one\)$"):
        prepare(dataset, "minmax", progress=False)


# --- `brats-lab data prepare` on valid extremes (the cases of conftest's `valid_inputs`) ----------

CASE = "BraTS20_Training_001"


@pytest.mark.parametrize("pipeline, method", [("A", "minmax"), ("B", "zscore")])
def test_huge_and_tiny_intensities_are_normalised_not_zeroed(pipeline, method, valid_inputs, run_cli, tmp_path):
    """float64 modalities near the limits of float64 (1e300: the variance overflows; 1e-310:
    subnormal) are valid images: `data prepare` caches every channel finite and non-constant,
    where it used to cache an all-zero channel and exit 0."""
    data = tmp_path / "data"
    shutil.copytree(valid_inputs / "data", data)
    for modality, scale in (("t1", 1e297), ("t2", 1e-313)):
        path = data / CASE / f"{CASE}_{modality}.nii.gz"
        array, geometry = read_image(path)
        write_image(array.astype(np.float64) * scale, geometry, path)
    result = run_cli(["data", "prepare", str(data), "--pipeline", pipeline], tmp_path)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    images, _ = open_cache(data, method).load(CASE)
    for channel in images:
        assert np.isfinite(channel).all() and channel.min() < channel.max()
