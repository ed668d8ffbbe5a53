"""The file-system helpers (`brats_lab/files.py`): a write that fails leaves the previous file and
no temporary, a failed write's message names the file and a full disk, the lock excludes another
holder, and a path that is no file says why."""

from __future__ import annotations

import errno
import fcntl

import pytest

from brats_lab.files import atomic_path, file_lock, why_not_a_file, write_error, write_text


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target, suffix=".json") as tmp:
        tmp.write_text("half")
        raise RuntimeError("stopped half-way")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_a_full_disk_is_said_in_words_and_keeps_its_errno(tmp_path):
    error = write_error(tmp_path / "x.npy", OSError(errno.ENOSPC, "No space left on device"), "could not write the array")
    assert str(error) == f"{tmp_path / 'x.npy'}: could not write the array (disk full (no space left on device))"
    assert error.errno == errno.ENOSPC
    other = write_error(tmp_path / "x.npy", OSError(errno.EACCES, "Permission denied"))
    assert str(other).endswith("could not write the file (Permission denied)") and other.errno == errno.EACCES


def test_the_lock_excludes_another_holder(tmp_path):
    lock = tmp_path / "sub" / ".lock"
    with file_lock(lock), open(lock, "a") as other:
        with pytest.raises(BlockingIOError):
            fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock, "a") as other:  # released
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_why_a_path_is_no_file(tmp_path):
    assert why_not_a_file(tmp_path / "missing.nii.gz") == "file not found"
    assert why_not_a_file(tmp_path) == "not a file (a folder)"
    (tmp_path / "broken").symlink_to(tmp_path / "gone")
    assert why_not_a_file(tmp_path / "broken") == f"broken symbolic link (to {tmp_path / 'gone'})"
