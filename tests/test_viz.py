"""Pictures: the viewer's slices (orientation, windowing, colours) and the trainer's case figure."""

from __future__ import annotations

import numpy as np
import pytest

from brats_lab import viz
from brats_lab.labels import BRATS_2020


def _volume() -> np.ndarray:
    """(z, y, x) = (4, 5, 6) with each voxel's value encoding where it is."""
    z, y, x = np.meshgrid(np.arange(4), np.arange(5), np.arange(6), indexing="ij")
    return (100 * z + 10 * y + x).astype(np.float32)


def test_planes_of_each_view_and_their_orientation():
    v = _volume()
    axial = viz.plane(v, "axial", 2)
    assert axial.shape == (5, 6) and axial[0, 0] == 200 and axial[4, 5] == 245
    coronal = viz.plane(v, "coronal", 3)  # rows: z from the top of the head down
    assert coronal.shape == (4, 6) and coronal[0, 0] == 330 and coronal[3, 0] == 30
    sagittal = viz.plane(v, "sagittal", 1)
    assert sagittal.shape == (4, 5) and sagittal[0, 4] == 341 and sagittal[3, 0] == 1
    assert [viz.slice_count(v.shape, view) for view in viz.VIEWS] == [4, 5, 6]


def test_tumour_slice_is_where_the_whole_tumour_is_largest():
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[1, 1:4, 1:4] = 2  # 9 voxels of edema on axial slice 1
    labels[2, 2, 2] = 4
    assert viz.tumour_slice(labels, BRATS_2020, "axial") == 1
    assert viz.tumour_slice(labels, BRATS_2020, "sagittal") == 2  # x=2 holds 3 + 1 voxels
    assert viz.tumour_slice(np.zeros_like(labels), BRATS_2020, "axial") is None
    assert viz.tumour_slice(None, BRATS_2020, "axial") is None


def test_window_ignores_the_background():
    v = np.zeros((10, 10, 10), np.float32)
    v[2:8, 2:8, 2:8] = np.linspace(100, 200, 216).reshape(6, 6, 6)
    lo, hi = viz.window(v)
    assert 100 <= lo < 102 and 198 < hi <= 200
    assert viz.window(np.zeros((3, 3, 3))) == (0.0, 1.0)


def test_slice_rgb_windows_blends_the_paper_colours_and_enlarges():
    gray = np.array([[0.0, 50.0], [100.0, 200.0]], np.float32)
    plain = viz.slice_rgb(gray, (0.0, 100.0), min_size=2)
    assert plain.dtype == np.uint8 and plain.shape == (2, 2, 3)
    assert plain[0, 0].tolist() == [0, 0, 0] and plain[1, 0].tolist() == [255, 255, 255]
    assert plain[1, 1].tolist() == [255, 255, 255]  # clipped above the window
    assert plain[0, 1].tolist() == [128, 128, 128]

    labels = np.array([[4, 1], [2, 0]], np.uint8)  # ET, NCR/NET, ED, nothing
    full = viz.slice_rgb(np.zeros_like(gray), (0.0, 1.0), labels, BRATS_2020, opacity=1.0, min_size=2)
    assert full[0, 0].tolist() == [0xFF, 0x30, 0x30]  # ET red
    assert full[0, 1].tolist() == [0x30, 0xD0, 0x30]  # NCR/NET green
    assert full[1, 0].tolist() == [0xFF, 0xD7, 0x00]  # ED yellow
    assert full[1, 1].tolist() == [0, 0, 0]  # no label: the image shows through
    half = viz.slice_rgb(np.zeros_like(gray), (0.0, 1.0), labels, BRATS_2020, opacity=0.5, min_size=2)
    assert half[0, 0].tolist() == [128, 24, 24]

    big = viz.slice_rgb(gray, (0.0, 100.0), min_size=7)  # 4x: whole pixels, no smoothing
    assert big.shape == (8, 8, 3) and (big[:4, :4] == 0).all() and (big[4:, 4:] == 255).all()


@pytest.mark.parametrize("with_prediction", [False, True])
def test_render_case_draws_a_png(tmp_path, with_prediction):
    images = np.stack([_volume() + c for c in range(4)])
    labels = np.zeros((4, 5, 6), np.uint8)
    labels[3, 1:3, 1:3] = 4
    png = tmp_path / "case.png"
    z = viz.render_case(images, BRATS_2020, png, reference=labels, prediction=labels if with_prediction else None,
                        title="case {slice}")
    assert z == 3
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
