"""Files written whole or not at all, locks across processes, and why a path is no file: the
file-system helpers every writer shares, with no image library (SimpleITK images are `io.py`).

- `atomic_path` / `write_text`: write into a temporary file beside the target and rename it over
  the target only once complete, so a reader never sees half a file and a failed write leaves the
  previous one as it was; the file gets the mode a plain `open()` would give it.
- `write_error`: the one-line OSError of a failed write, naming the file and why ("disk full").
- `file_lock`: an exclusive advisory lock across processes (the data cache, the MLflow and Optuna
  SQLite stores made on first use).
- `why_not_a_file`: why a path is not a readable file, in words.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@functools.cache
def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if missing) across processes."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent first use there is not supported
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically; a failed write (disk full, file-size limit) names the file
    and leaves the previous one as it was."""
    try:
        with atomic_path(Path(path)) as tmp:
            tmp.write_text(text)
    except OSError as e:
        raise write_error(path, e) from None


def write_error(path: Path | str, e: OSError, what: str = "could not write the file") -> OSError:
    """The OSError to raise for a write to `path` that failed with `e`: one line naming the file
    and why, in words: "disk full" for ENOSPC, and for a short write without an errno (numpy's
    "12000 requested and 3968 written") when its file system has no room left."""
    why = e.strerror or str(e)
    if e.errno == errno.ENOSPC or (e.errno is None and _no_room(Path(path))):
        why = f"disk full: {why}" if e.errno is None else "disk full (no space left on device)"
    error = OSError(f"{path}: {what} ({why})")
    error.errno = e.errno if e.errno is not None else (errno.ENOSPC if why.startswith("disk full") else None)
    return error


def _no_room(path: Path) -> bool:
    """Whether the file system `path` is (to be) written on has less than 1 MiB left."""
    for folder in (path.parent, *path.parent.parents):
        try:
            stat = os.statvfs(folder)
        except OSError:
            continue
        return stat.f_bavail * stat.f_frsize < 2**20
    return False


def why_not_a_file(path: Path) -> str:
    """Why there is no readable file at `path`, in words: missing, a symlink loop, a broken
    symlink, a folder, or a folder on the way that cannot be searched."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop" + (f" ({path.name} -> {os.readlink(path)})" if path.is_symlink() else "")
        if path.is_symlink():
            return f"broken symbolic link (to {os.readlink(path)})"
        if e.errno == errno.EACCES:
            return "permission denied (a folder on the way cannot be searched)"
        return "file not found"
    return "not a file" + (" (a folder)" if path.is_dir() else "")
