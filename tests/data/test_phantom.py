"""The phantom generator: layout, geometry, labels, contrasts, determinism, corruption, rendering."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from brats_lab.data import phantom
from brats_lab.data.cases import MODALITIES, discover
from brats_lab.data.phantom import phantom_geometry, synthesize, tissue_maps
from brats_lab.io import BRATS_ORIGIN, IDENTITY, read_header, read_image
from brats_lab.labels import BRATS_2020
from brats_lab.viz import render_overview

ET = BRATS_2020.regions["ET"][0]
NCR = 1
ED = 2


def _manifest(root: Path) -> dict:
    return json.loads((root / "phantom.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _images(case_dir: Path) -> dict[str, np.ndarray]:
    return {m: read_image(case_dir / f"{case_dir.name}_{m}.nii.gz")[0] for m in MODALITIES}


def _seg(case_dir: Path) -> np.ndarray:
    return read_image(case_dir / f"{case_dir.name}_seg.nii.gz")[0]


def _check_geometry(case_dir: Path, shape: tuple[int, int, int]) -> None:
    expected_spacing = (240 / shape[0], 240 / shape[1], 155 / shape[2])
    for name in (*MODALITIES, "seg"):
        geometry, pixel = read_header(case_dir / f"{case_dir.name}_{name}.nii.gz")
        assert geometry.size == shape, name
        assert np.allclose(geometry.spacing, expected_spacing, atol=1e-5), name
        assert np.allclose(geometry.origin, BRATS_ORIGIN), name
        assert np.allclose(geometry.direction, IDENTITY), name
        assert pixel == ("8-bit unsigned integer" if name == "seg" else "16-bit signed integer"), name


def test_layout_is_discovered_with_every_file(phantom_dataset: Path, tiny_shape) -> None:
    cases = discover(phantom_dataset)
    assert [c.id for c in cases] == [f"BraTS20_Training_{i:03d}" for i in range(1, 5)]
    for case in cases:
        assert case.layout.name == "brats2020"
        assert all(p.is_file() for p in case.images)
        assert case.seg is not None and case.seg.is_file()
        assert case.notes == ()
    manifest = _manifest(phantom_dataset)
    assert manifest["seed"] == 0 and manifest["shape"] == list(tiny_shape)
    assert [c["id"] for c in manifest["cases"]] == [c.id for c in cases]


def test_geometry_of_tiny_and_custom_shapes(phantom_dataset: Path, tmp_path: Path, tiny_shape) -> None:
    for case_dir in sorted(phantom_dataset.glob("BraTS20_*")):
        _check_geometry(case_dir, tiny_shape)
    shape = (40, 36, 24)
    (folder,) = synthesize(tmp_path, cases=1, seed=5, shape=shape, progress=False)
    _check_geometry(folder, shape)
    assert phantom_geometry(shape).spacing == pytest.approx((6.0, 240 / 36, 155 / 24))


def test_labels_are_brats_2020_and_every_case_has_a_tumour(phantom_dataset: Path) -> None:
    manifest = _manifest(phantom_dataset)
    for record in manifest["cases"]:
        seg = _seg(phantom_dataset / record["id"])
        assert seg.dtype == np.uint8
        assert set(np.unique(seg)) <= BRATS_2020.allowed
        assert (seg == ED).any() and np.isin(seg, BRATS_2020.regions["TC"]).any()
        assert record["has_et"] == bool((seg == ET).any())
        assert record["grade"] in ("HGG", "LGG")
        assert record["tumour"]["hemisphere"] in ("left", "right")
        assert record["corrupted"] is None
        # The recorded centre is inside the tumour core or its edema.
        x, y, z = (int(round(v)) for v in record["tumour"]["centre_voxel"])
        assert seg[z, y, x] > 0 or seg[max(z - 1, 0) : z + 2, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2].any()


def test_background_is_zero_outside_the_brain(phantom_dataset: Path) -> None:
    for case_dir in sorted(phantom_dataset.glob("BraTS20_*")):
        maps = tissue_maps(case_dir)
        brain = sum(maps.values()) > 0
        assert 0.15 < brain.mean() < 0.5  # a brain, not the whole field
        assert np.allclose(sum(maps.values())[brain], 1.0, atol=1e-4)
        for name, image in _images(case_dir).items():
            assert (image[~brain] == 0).all(), name
            assert (image[brain] > 0).all(), name  # the non-zero mask is the brain, in every modality
        assert (_seg(case_dir)[~brain] == 0).all()


def test_tissue_contrasts_hold_on_the_written_files(phantom_dataset: Path) -> None:
    for case_dir in sorted(phantom_dataset.glob("BraTS20_*")):
        maps = tissue_maps(case_dir)
        seg = _seg(case_dir)
        away = ~ndimage.binary_dilation(seg > 0, iterations=2)  # healthy tissue, off the tumour's fade
        pure = {t: (m > 0.6) & away for t, m in maps.items()}
        assert all(p.sum() >= 20 for p in pure.values()), {t: int(p.sum()) for t, p in pure.items()}
        images = {m: v.astype(np.float64) for m, v in _images(case_dir).items()}
        mean = {m: {t: v[p].mean() for t, p in pure.items()} for m, v in images.items()}
        name = case_dir.name
        assert mean["t1"]["wm"] > mean["t1"]["gm"] > mean["t1"]["csf"], (name, mean["t1"])
        assert mean["t1ce"]["wm"] > mean["t1ce"]["gm"] > mean["t1ce"]["csf"], (name, mean["t1ce"])
        assert mean["t2"]["csf"] > mean["t2"]["gm"] > mean["t2"]["wm"], (name, mean["t2"])
        assert mean["flair"]["csf"] < mean["flair"]["gm"], (name, mean["flair"])
        assert mean["flair"]["csf"] < mean["flair"]["wm"], (name, mean["flair"])
        # Tumour compartments.
        assert images["flair"][seg == ED].mean() > 1.15 * mean["flair"]["wm"], name
        assert images["t2"][seg == ED].mean() > 1.15 * mean["t2"]["wm"], name
        assert images["t1"][seg == ED].mean() < mean["t1"]["wm"], name
        if (seg == ET).any():
            assert images["t1ce"][seg == ET].mean() > 1.15 * mean["t1ce"]["wm"], name
            assert images["t1ce"][seg == ET].mean() > images["t1"][seg == ET].mean() * (
                mean["t1ce"]["wm"] / mean["t1"]["wm"]
            ), name  # enhancement: brighter after contrast than before, scanner gain aside
        if ((seg == NCR) & (ndimage.binary_erosion(seg > 0))).sum() >= 3:
            assert images["t2"][seg == NCR].mean() > mean["t2"]["wm"], name


def test_lower_grade_cases_have_a_core_but_no_enhancing_tumour(tmp_path: Path, tiny_shape) -> None:
    folders = synthesize(tmp_path, cases=2, seed=1, shape=tiny_shape, no_et_fraction=1.0, progress=False)
    manifest = _manifest(tmp_path)
    for folder, record in zip(folders, manifest["cases"]):
        seg = _seg(folder)
        assert not (seg == ET).any()
        assert (seg == NCR).any()
        assert record["grade"] == "LGG" and record["has_et"] is False
        assert record["tumour"]["volume_ml"]["ET"] == 0


def test_grade_fraction_is_close_in_every_prefix() -> None:
    # The grade is decided per case with a low-discrepancy sequence: independent of the count,
    # yet close to the requested fraction for any number of cases.
    for seed in range(3):
        lgg = [phantom._weyl(seed, k) < 0.2 for k in range(50)]
        for n in (10, 25, 50):
            assert abs(sum(lgg[:n]) - 0.2 * n) <= 2


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    kwargs = dict(cases=2, shape=(32, 32, 24), progress=False, corrupt_fraction=0.5)
    synthesize(tmp_path / "a", seed=7, **kwargs)
    synthesize(tmp_path / "b", seed=7, **kwargs)
    synthesize(tmp_path / "c", seed=8, **kwargs)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a)


def test_case_k_does_not_depend_on_how_many_cases(phantom_dataset: Path, tmp_path: Path, tiny_shape) -> None:
    synthesize(tmp_path, cases=2, seed=0, shape=tiny_shape, progress=False)
    for k in (1, 2):
        case = f"BraTS20_Training_{k:03d}"
        assert _files(tmp_path / case) == _files(phantom_dataset / case)
    assert _manifest(tmp_path)["cases"] == _manifest(phantom_dataset)["cases"][:2]


def test_corrupted_labels_are_recorded_and_differ_from_clean_ones(phantom_dataset: Path, tmp_path: Path, tiny_shape) -> None:
    synthesize(tmp_path, cases=4, seed=0, shape=tiny_shape, corrupt_fraction=0.5, progress=False)
    manifest = _manifest(tmp_path)
    assert manifest["corrupt_fraction"] == 0.5
    corrupted = [c for c in manifest["cases"] if c["corrupted"] is not None]
    assert len(corrupted) == 2
    for record in manifest["cases"]:
        clean, dirty = phantom_dataset / record["id"], tmp_path / record["id"]
        for m in MODALITIES:  # corruption touches the labels only
            name = f"{record['id']}_{m}.nii.gz"
            assert (clean / name).read_bytes() == (dirty / name).read_bytes()
        seg_clean, seg_dirty = _seg(clean), _seg(dirty)
        assert set(np.unique(seg_dirty)) <= BRATS_2020.allowed
        if record["corrupted"] is None:
            assert np.array_equal(seg_clean, seg_dirty)
        else:
            assert record["corrupted"]["kind"] in ("shift", "swap", "erase")
            assert not np.array_equal(seg_clean, seg_dirty)


def test_a_small_fraction_still_corrupts_one_case(tmp_path: Path) -> None:
    synthesize(tmp_path, cases=2, seed=3, shape=(32, 32, 24), corrupt_fraction=0.01, progress=False)
    assert sum(c["corrupted"] is not None for c in _manifest(tmp_path)["cases"]) == 1


@pytest.mark.parametrize("kind", ["shift", "swap", "erase"])
def test_every_corruption_changes_the_labels_and_keeps_them_valid(phantom_dataset: Path, kind: str, tiny_shape) -> None:
    case_dir = phantom_dataset / "BraTS20_Training_001"
    seg = _seg(case_dir)
    out, info = phantom._apply_corruption(seg, kind, np.random.default_rng(0), phantom_geometry(tiny_shape))
    assert info["kind"] == kind
    assert out.dtype == np.uint8 and out.shape == seg.shape
    assert set(np.unique(out)) <= BRATS_2020.allowed
    assert not np.array_equal(out, seg)


def test_render_overview_writes_a_png(phantom_dataset: Path, tmp_path: Path) -> None:
    case_dir = phantom_dataset / "BraTS20_Training_002"
    png = tmp_path / "overview.png"
    render_overview(case_dir, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = tmp_path / "with_other_labels.png"
    labels = phantom_dataset / "BraTS20_Training_001" / "BraTS20_Training_001_seg.nii.gz"
    render_overview(case_dir, other, seg=labels, title="prediction")
    assert other.stat().st_size > 0


def test_bad_arguments_are_rejected(tmp_path: Path, tiny_shape) -> None:
    with pytest.raises(ValueError, match="shape"):
        synthesize(tmp_path, cases=1, shape=(4, 4, 4), progress=False)
    with pytest.raises(ValueError, match="corrupt_fraction"):
        synthesize(tmp_path, cases=1, shape=tiny_shape, corrupt_fraction=1.5, progress=False)
    with pytest.raises(ValueError, match="no_et_fraction"):
        synthesize(tmp_path, cases=1, shape=tiny_shape, no_et_fraction=-0.1, progress=False)


@pytest.mark.slow
def test_full_size_case(tmp_path: Path) -> None:
    (folder,) = synthesize(tmp_path, cases=1, seed=0, progress=False)
    _check_geometry(folder, (240, 240, 155))
    seg = _seg(folder)
    images = _images(folder)
    brain = images["t1"] > 0
    assert 1.2e6 < brain.sum() < 2.6e6  # a brain of 1.2 to 2.6 litres at 1 mm
    for image in images.values():
        assert ((image > 0) == brain).all()
    assert set(np.unique(seg)) <= BRATS_2020.allowed
    assert (seg[~brain] == 0).all()
    record = _manifest(tmp_path)["cases"][0]
    assert 1.0 < sum(record["tumour"]["volume_ml"].values()) < 400.0


def test_ctrl_c_while_writing_leaves_no_partial_dataset(tmp_path: Path) -> None:
    # `brats-lab data synth` interrupted (SIGINT, as Ctrl-C) after its second case is on disk: the
    # folder asked for must not exist (a later run would take 2 cases for the dataset), nor any part.
    out = tmp_path / "phantom"
    argv = [sys.executable, "-m", "brats_lab.cli", "data", "synth", "--out", str(out), "--cases", "30", "--shape", "40", "40", "32"]
    # Ctrl-C reaches a terminal's foreground job with SIGINT at its default; a test run started in the
    # background (`bash .ci/run &`) ignores SIGINT, and the child would inherit that and finish.
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".phantom.partial-*/BraTS20_Training_002")):
        assert process.poll() is None and time.monotonic() < deadline, "the synth ended or stalled before its second case"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) != 0
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # Uninterrupted, the same command leaves the whole dataset in place and nothing beside it.
    argv[argv.index("30")] = "3"
    subprocess.run(argv, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom"]
    assert len(json.loads((out / "phantom.json").read_text())["cases"]) == 3 and len(list(out.glob("BraTS20_*"))) == 3
