"""Property: any intensities, finite or not, in any stored type, go through `data check` and
`data prepare` either refused (a line naming the case and the file) or into a cache whose every
channel is finite and non-constant. Nothing in between: no silently zeroed or NaN channel.

Random cases, drawn with fixed seeds: per modality a stored type (int16 with a header slope,
float32, float64), an intensity scale from 1e-310 to 1e300, and sometimes NaN, infinity, or one
value for the whole brain; about half the draws are refused. Tiny images (12 x 12 x 8), so 40 draws take seconds.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from brats_lab import DataError
from brats_lab.data.cache import prepare
from brats_lab.data.cases import MODALITIES, discover
from brats_lab.data.check import check_case
from brats_lab.io import BRATS_ORIGIN, IDENTITY, Geometry, write_image

CASE = "BraTS20_Training_001"
GEOMETRY = Geometry((12, 12, 8), (1.0, 1.0, 1.0), BRATS_ORIGIN, IDENTITY)
DRAWS = 40


def set_scl_slope(path: Path, slope: float) -> None:
    """Rewrite a .nii.gz's scl_slope (bytes 112-116 of the little-endian NIfTI-1 header)."""
    data = bytearray(gzip.decompress(path.read_bytes()))
    data[112:116] = struct.pack("<f", slope)
    path.write_bytes(gzip.compress(bytes(data)))


def draw_modality(rng: np.random.Generator, brain: np.ndarray, path: Path) -> str:
    """Write one random modality to `path`; return what was drawn, for the failure message."""
    kind = rng.choice(["int16", "float32", "float64"])
    values = rng.normal(1.0, 0.2, brain.shape)
    if rng.random() < 0.04:  # one value for the whole brain: a mask, not an image
        values[:] = 1.0
    if kind == "int16":
        array = np.where(brain, np.clip(values * 500, 1, 30000), 0).astype(np.int16)
        write_image(array, GEOMETRY, path)
        slope = float(rng.choice([1.0, 1.0, -3.5, 1e-30, 1e30, 1e38]))  # 1e38 x 500 overflows float32
        if slope != 1.0:
            set_scl_slope(path, slope)
        return f"int16, scl_slope {slope:g}"
    exponent = rng.uniform(-300, 300) if kind == "float64" else rng.uniform(-30, 30)
    array = np.where(brain, values * 10.0**exponent, 0).astype(kind)
    special = rng.choice(["none"] * 17 + ["nan", "inf", "-inf"])
    if special != "none":
        array[tuple(rng.integers(0, n) for n in array.shape)] = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}[special]
    write_image(array, GEOMETRY, path)
    return f"{kind}, scale 1e{exponent:.0f}, {special}"


@pytest.mark.parametrize("seed", range(DRAWS))
def test_random_intensities_are_refused_by_name_or_cached_finite_and_non_constant(seed, tmp_path):
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(GEOMETRY.shape)
    brain = ((z - 3.5) / 3.5) ** 2 + ((y - 5.5) / 5) ** 2 + ((x - 5.5) / 5) ** 2 < 1
    folder = tmp_path / "data" / CASE
    drawn = {m: draw_modality(rng, brain, folder / f"{CASE}_{m}.nii.gz") for m in MODALITIES}
    seg = np.where(brain & (z == 4), 2, 0).astype(np.uint8)
    write_image(seg, GEOMETRY, folder / f"{CASE}_seg.nii.gz")

    [case] = discover(tmp_path / "data")
    problems = check_case(case)
    for method in ("minmax", "zscore"):
        try:
            cache = prepare(tmp_path / "data", method, progress=False)
        except DataError as e:
            # Refused: by name, and `data check` had said so too.
            assert CASE in str(e) and any(f"{CASE}_{m}.nii.gz" in str(e) for m in MODALITIES), (str(e), drawn)
            assert problems, (str(e), drawn)
            continue
        assert not problems, ([str(p) for p in problems], drawn)
        images, _ = cache.load(CASE)
        for channel, modality in zip(images, MODALITIES):
            assert np.isfinite(channel).all(), (modality, method, drawn[modality])
            assert channel.min() < channel.max(), (modality, method, drawn[modality])
