"""Reading and writing images with SimpleITK. Geometry travels with the voxels; writes are atomic
(`brats_lab.files.atomic_path`).

Arrays are in SimpleITK's (z, y, x) order: a BraTS volume of 240 x 240 x 155 voxels is an array of
shape (155, 240, 240). `Geometry.size` is in ITK's (x, y, z) order, as viewers show it.

nibabel is imported only where a float file's raw voxels are read (`count_nonfinite`, `_scaling`):
a third of a second that reading integer files (label maps, int16 modalities) never pays.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from brats_lab import DataError
from brats_lab.files import atomic_path, why_not_a_file

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
        raise DataError(f"{path}: {why_not_a_file(path)}")
    check_complete(path, full=full_check)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        if not full_check:  # ITK says only that it found no reader: a corrupt gzip stream is likelier
            check_complete(path, full=True)
        raise DataError(f"{path}: unreadable image ({_itk_reason(e)})") from None
    array = sitk.GetArrayFromImage(image)
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, Geometry.of(image)


def read_volume(path: Path, full_check: bool = False) -> tuple[np.ndarray, Geometry]:
    """`read_image` for what must be one 3-D scalar volume (a modality, a label map): refuses
    any other number of dimensions and NaN or infinite voxels, which ITK reads as 0 unsaid."""
    array, geometry = read_image(path, full_check=full_check)
    if array.ndim != 3 or len(geometry.size) != 3:
        components = f" x {array.shape[-1]} components" if array.ndim > len(geometry.size) else ""
        raise DataError(f"{path}: not 3-D (size {geometry.size}{components})")
    if why := nonfinite(path, array):
        raise DataError(f"{path}: {why}")
    return array, geometry


def check_complete(path: Path, full: bool = False) -> None:
    """Raise DataError if the file is cut short (or, with `full`, corrupt anywhere).

    ITK reads a truncated .nii.gz without complaint and fills the missing voxels with zeros, so a
    half-copied download would pass silently. The quick check compares the size the NIfTI header
    promises with the file size (.nii) or with the gzip trailer's length field (.nii.gz): a few
    bytes read. `full` also decompresses the whole stream to verify its CRC (`data check` does;
    every other read would otherwise decompress each file twice).
    """
    path = Path(path)
    try:
        _check_complete(path, full)
    except PermissionError:
        raise DataError(f"{path}: permission denied (the file cannot be read)") from None


def _check_complete(path: Path, full: bool) -> None:
    if path.name.endswith(".gz"):
        with open(path, "rb") as f:
            start = f.read(8)
        if not start:
            raise DataError(f"{path}: empty file (0 bytes)")
        if not start.startswith(b"\x1f\x8b"):  # gzip's magic number
            raise DataError(f"{path}: not gzip-compressed, though named .gz (it starts with {start!r})")
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
        except PermissionError:
            raise
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
    NIfTI-2 (left to ITK). Anything else is refused: ITK would read a PNG named .nii as a PNG."""
    if len(header) < 4:
        raise DataError(f"{path}: truncated NIfTI header ({len(header)} of 348 bytes)")
    sizes = {struct.unpack(o + "i", header[:4])[0]: o for o in "<>"}  # sizeof_hdr, either byte order
    if 540 in sizes:
        return None
    if 348 not in sizes:
        hint = "; it is gzip-compressed: name it .nii.gz" if header.startswith(b"\x1f\x8b") else ""
        raise DataError(f"{path}: unreadable image: not a NIfTI file (it starts with {header[:8]!r}{hint})")
    order = sizes[348]
    if len(header) < 348:
        raise DataError(f"{path}: truncated NIfTI header ({len(header)} of 348 bytes)")
    dims = struct.unpack(order + "8h", header[40:56])
    bitpix = struct.unpack(order + "h", header[72:74])[0]
    vox_offset = int(struct.unpack(order + "f", header[108:112])[0])
    n_voxels = int(np.prod([max(d, 1) for d in dims[1 : 1 + max(dims[0], 0)]]))
    return vox_offset + n_voxels * bitpix // 8


def nonfinite(path: Path, array: np.ndarray) -> str | None:
    """Why the voxels of `path`, as read into `array`, are not all finite; None when they are.

    Two ways in: NaN or infinite values stored in a float file (ITK reads NaN as 0, so the raw
    voxels are counted), and finite stored values that the header's scaling (`scl_slope`,
    `scl_inter`) turns infinite as read, e.g. int16 voxels times a slope of 1e38.
    """
    if not np.issubdtype(array.dtype, np.floating):  # ITK reads a scaled file as floats
        return None
    stored = count_nonfinite(path)
    read = int(np.count_nonzero(~np.isfinite(array)))
    if stored:
        return f"{stored} NaN or infinite voxels"
    if read:
        return f"{read} NaN or infinite voxels once scaled by the header ({_scaling(path)})"
    return None


def _scaling(path: Path) -> str:
    import nibabel

    proxy = nibabel.load(str(path)).dataobj  # type: ignore[attr-defined]  # nibabel moves the header's scaling onto the proxy
    slope, inter = getattr(proxy, "slope", None), getattr(proxy, "inter", None)
    return f"scl_slope {float(slope):g}, scl_inter {float(inter):g}" if slope is not None else "scaled"  # type: ignore[arg-type]


def count_nonfinite(path: Path) -> int:
    """NaN and infinite voxels in a floating-point NIfTI file; 0 for integer files.

    ITK's NIfTI reader silently turns NaN into 0, so the raw voxels are read with nibabel here.
    """
    import nibabel

    image = nibabel.load(str(path))
    if not np.issubdtype(image.get_data_dtype(), np.floating):  # type: ignore[attr-defined]
        return 0
    return int(np.count_nonzero(~np.isfinite(np.asanyarray(image.dataobj))))  # type: ignore[attr-defined]


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


def _itk_reason(error: RuntimeError) -> str:
    # ITK messages are multi-line with C++ file/line noise; the last meaningful line says why.
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    for line in reversed(lines):
        if not line.startswith(("itk::", "sitk::", "Exception thrown")):
            return line.split(": ", 1)[-1] if "Description" in line else line
    return lines[-1] if lines else "unknown error"
