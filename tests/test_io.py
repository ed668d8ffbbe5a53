import os

import numpy as np
import pytest

from brats_lab import DataError
from brats_lab.io import IDENTITY, Geometry, read_header, read_image, write_image

GEOMETRY = Geometry((12, 10, 8), (1.0, 2.0, 3.0), (5.0, -239.0, 1.5), IDENTITY)


@pytest.mark.parametrize("name", ["x.nii.gz", "x.nii"])
def test_write_then_read_keeps_voxels_and_geometry(tmp_path, name):
    array = np.arange(np.prod(GEOMETRY.shape), dtype=np.int16).reshape(GEOMETRY.shape)
    write_image(array, GEOMETRY, tmp_path / name)
    back, geometry = read_image(tmp_path / name)
    np.testing.assert_array_equal(back, array)
    assert geometry.differences(GEOMETRY) == []
    assert read_header(tmp_path / name)[0].differences(GEOMETRY) == []
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left behind


def test_write_rejects_a_shape_that_does_not_match_the_geometry(tmp_path):
    with pytest.raises(ValueError, match="does not match geometry"):
        write_image(np.zeros((8, 10, 13), np.uint8), GEOMETRY, tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "x.nii.gz"
    write_image(np.ones(GEOMETRY.shape, np.uint8), GEOMETRY, path)
    before = path.read_bytes()
    import SimpleITK as sitk

    def crash(*args, **kwargs):  # a disk-full error half-way through the write
        raise RuntimeError("No space left on device")

    monkeypatch.setattr(sitk, "WriteImage", crash)
    with pytest.raises(OSError, match="x.nii.gz: could not write"):
        write_image(np.zeros(GEOMETRY.shape, np.uint8), GEOMETRY, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


@pytest.mark.parametrize("name", ["x.nii.gz", "x.nii"])
def test_truncated_files_are_refused_by_name(tmp_path, name):
    path = tmp_path / name
    write_image(np.random.default_rng(0).integers(0, 999, GEOMETRY.shape).astype(np.int16), GEOMETRY, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 50])
    with pytest.raises(DataError, match=rf"{name}: truncated"):
        read_image(path)


def test_missing_and_garbage_files_are_refused_by_name(tmp_path):
    with pytest.raises(DataError, match="nope.nii.gz: file not found"):
        read_image(tmp_path / "nope.nii.gz")
    (tmp_path / "junk.nii").write_bytes(b"not an image")
    with pytest.raises(DataError, match="junk.nii"):
        read_image(tmp_path / "junk.nii")


def test_geometry_differences_name_each_field():
    other = Geometry((12, 10, 9), (1.0, 2.0, 3.5), (5.0, -239.0, 1.5), IDENTITY)
    diffs = GEOMETRY.differences(other)
    assert len(diffs) == 2 and diffs[0].startswith("size") and diffs[1].startswith("spacing")


def test_a_corrupt_gzip_stream_is_caught_by_the_full_check(tmp_path):
    path = tmp_path / "x.nii.gz"
    write_image(np.random.default_rng(0).integers(0, 999, GEOMETRY.shape).astype(np.int16), GEOMETRY, path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte mid-stream: length intact, CRC (or inflate) not
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="x.nii.gz: truncated or corrupt gzip"):
        read_image(path, full_check=True)


def test_the_quick_check_reads_little_but_refuses_a_cut_file(tmp_path, monkeypatch):
    path = tmp_path / "x.nii.gz"
    write_image(np.random.default_rng(0).integers(0, 999, GEOMETRY.shape).astype(np.int16), GEOMETRY, path)
    import gzip

    opened = []
    real_open = gzip.open
    monkeypatch.setattr(gzip, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    read_image(path)
    assert len(opened) == 1  # the header only: no second decompression of a sound file
    path.write_bytes(path.read_bytes()[:-9])
    with pytest.raises(DataError, match="truncated"):
        read_image(path)


def test_atomic_writes_get_the_mode_a_plain_open_would(tmp_path):
    # mkstemp creates 0600; a shared store needs files others (the dashboard's user) can read.
    from brats_lab.files import write_text

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        write_image(np.zeros((8, 10, 12), np.uint8), GEOMETRY, tmp_path / "b.nii.gz")
    finally:
        os.umask(old)
    assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) == oct(0o644)
    assert oct((tmp_path / "b.nii.gz").stat().st_mode & 0o777) == oct(0o644)
