"""Reading and writing images with SimpleITK. Geometry travels with the voxels; writes are atomic.

Arrays are in SimpleITK's (z, y, x) order: a BraTS volume of 240 x 240 x 155 voxels is an array of
shape (155, 240, 240). `Geometry.size` is in ITK's (x, y, z) order, as viewers show it.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import SimpleITK as sitk

from brats_lab import DataError

# BraTS ships its volumes in the SRI24 space as SimpleITK reads it.
BRATS_SIZE = (240, 240, 155)
BRATS_ORIGIN = (0.0, -239.0, 0.0)
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


@dataclass(frozen=True)
class Geometry:
    size: tuple[int, ...]  # (x, y, z)
    spacing: tuple[float, ...]  # mm
    origin: tuple[float, ...]  # mm
    direction: tuple[float, ...]  # row-major 3x3

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader) -> "Geometry":
        return cls(
            size=tuple(int(s) for s in image.GetSize()),
            spacing=tuple(float(s) for s in image.GetSpacing()),
            origin=tuple(float(o) for o in image.GetOrigin()),
            direction=tuple(float(d) for d in image.GetDirection()),
        )

    @property
    def shape(self) -> tuple[int, ...]:
        """Numpy shape of a volume in this geometry, (z, y, x)."""
        return tuple(reversed(self.size))

    @property
    def spacing_zyx(self) -> tuple[float, ...]:
        return tuple(reversed(self.spacing))

    def differences(self, other: "Geometry", tol: float = 1e-4) -> list[str]:
        """What differs from `other`, one phrase per field; empty when they agree."""
        out = []
        if self.size != other.size:
            out.append(f"size {self.size} vs {other.size}")
        for field in ("spacing", "origin", "direction"):
            a, b = getattr(self, field), getattr(other, field)
            if len(a) != len(b) or not np.allclose(a, b, atol=tol, rtol=0):
                out.append(f"{field} {_fmt(a)} vs {_fmt(b)}")
        return out

    def apply(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


def _fmt(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def read_header(path: Path) -> tuple[Geometry, str]:
    """Geometry and pixel type of an image file, without reading its voxels."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DataError(f"{path}: unreadable image header ({_itk_reason(e)})") from None
    return Geometry.of(reader), sitk.GetPixelIDValueAsString(reader.GetPixelID())


def read_image(path: Path, dtype: type | None = None, full_check: bool = False) -> tuple[np.ndarray, Geometry]:
    """Voxels (z, y, x) and geometry of one image file. Raises DataError naming the file;
    `full_check` also verifies a gzip stream's CRC (see `check_complete`)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    check_complete(path, full=full_check)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(f"{path}: unreadable image ({_itk_reason(e)})") from None
    array = sitk.GetArrayFromImage(image)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, Geometry.of(image)


def check_complete(path: Path, full: bool = False) -> None:
    """Raise DataError if the file is cut short (or, with `full`, corrupt anywhere).

    ITK reads a truncated .nii.gz without complaint and fills the missing voxels with zeros, so a
    half-copied download would pass silently. The quick check compares the size the NIfTI header
    promises with the file size (.nii) or with the gzip trailer's length field (.nii.gz): a few
    bytes read. `full` also decompresses the whole stream to verify its CRC (`data check` does;
    every other read would otherwise decompress each file twice).
    """
    path = Path(path)
    if path.name.endswith(".gz"):
        try:
            with gzip.open(path, "rb") as f:
                expected = _nifti_size(f.read(348), path)
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                stored = struct.unpack("<I", f.read(4))[0]  # uncompressed length mod 2**32
            if expected is not None and (full or stored != expected % 2**32):
                # A mismatch is almost surely a cut-off file, but a writer may pad after the
                # voxels: decompressing the whole stream decides (end marker, CRC, length).
                with gzip.open(path, "rb") as f:
                    length = 0
                    while chunk := f.read(1 << 24):
                        length += len(chunk)
                if length < expected:
                    raise DataError(f"{path}: truncated NIfTI ({length} of {expected} bytes once decompressed)")
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}: truncated or corrupt gzip ({e})") from None
    elif path.suffix == ".nii":
        with open(path, "rb") as f:
            expected = _nifti_size(f.read(348), path)
        actual = path.stat().st_size
        if expected is not None and actual < expected:
            raise DataError(f"{path}: truncated NIfTI ({actual} of {expected} bytes)")


def _nifti_size(header: bytes, path: Path) -> int | None:
    """Bytes a NIfTI-1 file holds according to its header: voxel offset + voxel data; None for
    anything that is not NIfTI-1 (ITK then says what it is, or that it cannot read it)."""
    if len(header) < 4:
        raise DataError(f"{path}: truncated NIfTI header ({len(header)} of 348 bytes)")
    orders = [o for o in "<>" if struct.unpack(o + "i", header[:4])[0] == 348]
    if not orders:
        return None
    if len(header) < 348:
        raise DataError(f"{path}: truncated NIfTI header ({len(header)} of 348 bytes)")
    order = orders[0]
    dims = struct.unpack(order + "8h", header[40:56])
    bitpix = struct.unpack(order + "h", header[72:74])[0]
    vox_offset = int(struct.unpack(order + "f", header[108:112])[0])
    n_voxels = int(np.prod([max(d, 1) for d in dims[1 : 1 + max(dims[0], 0)]]))
    return vox_offset + n_voxels * bitpix // 8


def count_nonfinite(path: Path) -> int:
    """NaN and infinite voxels in a floating-point NIfTI file; 0 for integer files.

    ITK's NIfTI reader silently turns NaN into 0, so the raw voxels are read with nibabel here.
    """
    import nibabel

    image = nibabel.load(str(path))
    if not np.issubdtype(image.get_data_dtype(), np.floating):
        return 0
    return int(np.count_nonzero(~np.isfinite(np.asanyarray(image.dataobj))))


def write_image(array: np.ndarray, geometry: Geometry, path: Path) -> None:
    """Write a (z, y, x) array (or (z, y, x, components)) with the given geometry, atomically
    (temporary file, then rename)."""
    path = Path(path)
    vector = array.ndim == len(geometry.shape) + 1  # (z, y, x, components), e.g. probabilities
    if tuple(array.shape[: len(geometry.shape)]) != geometry.shape or array.ndim > len(geometry.shape) + 1:
        raise ValueError(f"{path}: array shape {array.shape} does not match geometry {geometry.shape} (z, y, x)")
    image = geometry.apply(sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=vector))
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    with atomic_path(path, suffix=suffix) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=path.name.endswith(".gz"))
            # ITK reports a write that stops short (disk full, file-size limit) only on stderr and
            # returns as if it had worked: check the file is whole before it replaces `path`.
            check_complete(tmp)
        except (RuntimeError, DataError):
            raise OSError(f"{path}: could not write the image: the file came out incomplete "
                          "(disk full or over a file-size limit?)") from None


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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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
    with atomic_path(Path(path)) as tmp:
        tmp.write_text(text)


def _itk_reason(error: RuntimeError) -> str:
    # ITK messages are multi-line with C++ file/line noise; the last meaningful line says why.
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line.startswith(("itk::", "sitk::", "Exception thrown")):
            return line.split(": ", 1)[-1] if "Description" in line else line
    return lines[-1] if lines else "unknown error"
