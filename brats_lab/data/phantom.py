"""Phantom BraTS cases that look like brain MRI: real anatomy, four contrasts, tumours with labels.

Anatomy comes from the MNI152 2009a template and its grey/white matter maps shipped inside
nilearn (read from the package folder, nothing is downloaded). Each case places the brain in the
BraTS field (240 x 240 x 155 mm, SRI24-like geometry) with a small random affine, grows a tumour
(necrotic core, enhancing rim, edema that follows white matter) with a mild mass effect, mixes
tissue intensities per modality, then adds a bias field, Rician noise and scanner differences.

Determinism: case k draws from `SeedSequence(seed, spawn_key=(k,))`, so it does not depend on how
many cases are requested; the tumour is defined on a fixed physical grid, so the same case at a
coarser `shape` is the same patient at a lower resolution. Same seed, same bytes.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from tqdm import tqdm

from brats_lab import DataError
from brats_lab.data.cases import LAYOUTS, MODALITIES
from brats_lab.files import write_text
from brats_lab.io import BRATS_ORIGIN, IDENTITY, Geometry, write_image
from brats_lab.labels import BRATS_2020, BRATS_2023

FIELD_MM = (240.0, 240.0, 155.0)  # physical field of view (x, y, z), whatever the voxel shape
CASE_PREFIX = "BraTS20_Training_"
MANIFEST = "phantom.json"
_LAYOUT = next(layout for layout in LAYOUTS if layout.name == "brats2020")
# The 2023+ layout (BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1n.nii.gz, labels 1 NETC, 2 SNFH,
# 3 ET): the same patients, relabelled, and half of them with satellite lesions, so lesion-wise
# scoring has several lesions per region to match.
_LAYOUTS = {"brats2020": (_LAYOUT, CASE_PREFIX), "brats2023": (next(l for l in LAYOUTS if l.name == "brats2023"), "BraTS-GLI-")}
SATELLITE_FRACTION = 0.5  # share of 2023-layout cases with satellite lesions
# The dataset `brats-lab ablate` writes when there is none (the CPU demo's): cases, shape (x, y, z)
# and share without enhancing tumour. 200 cases, 40 held out per fold: a run's mean over 8 cases
# scattered with their luck; none without ET: ET scores 0 or 1 there, most of ET's fold-to-fold noise.
DEMO_CASES, DEMO_SHAPE, DEMO_NO_ET_FRACTION = 200, (48, 48, 36), 0.0

# Labels from the convention, not literals: ET, TC minus ET (necrosis / non-enhancing), WT minus TC.
(ET,) = BRATS_2020.regions["ET"]
(NCR,) = (label for label in BRATS_2020.regions["TC"] if label != ET)
(ED,) = (label for label in BRATS_2020.regions["WT"] if label not in BRATS_2020.regions["TC"])

# Field centre in physical (LPS) mm for a 1 mm BraTS grid; every shape maps the brain to the same
# physical place, so the geometry of a case does not depend on the resolution.
_FIELD_CENTRE = tuple(o + (f - 1.0) / 2.0 for o, f in zip(BRATS_ORIGIN, FIELD_MM))

# Mean signal per tissue, relative to white matter, per modality. Columns: CSF, GM, WM, then the
# tumour compartments: necrosis, enhancing tumour, edema, non-enhancing core (lower grade).
_TISSUES = ("csf", "gm", "wm")
_MEANS = {
    #          csf   gm    wm   nec   et    ed    net
    "t1":   (0.30, 0.70, 1.00, 0.42, 0.66, 0.70, 0.58),
    "t1ce": (0.32, 0.72, 1.00, 0.42, 1.75, 0.72, 0.62),
    "t2":   (3.00, 1.40, 1.00, 2.70, 1.70, 2.40, 2.30),
    "flair": (0.40, 1.30, 1.00, 1.10, 1.55, 2.10, 1.85),
}
# Typical white-matter value of each modality in scanner units (int16), before the per-case scale.
_WM_LEVEL = {"t1": 420.0, "t1ce": 480.0, "t2": 330.0, "flair": 260.0}

_TUMOUR_GRID_MM = 2.0  # the tumour is modelled on a fixed physical grid of this spacing
_PICK_GRID_MM = 4.0  # coarse grid used to choose where the tumour sits


# --------------------------------------------------------------------------------------------
# Parameters of one case (sampled, then used by deterministic functions; recorded in the json)


@dataclass(frozen=True)
class _Anatomy:
    rotation_deg: tuple[float, float, float]  # about x, y, z
    scale: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    top_margin_mm: float  # space between the top of the brain and the top of the field
    # Mass effect: tissue within reach of `centre_mm` is pushed radially as if a sphere grew
    # from radius (1 - push) * radius_mm to radius_mm (volume preserving), tapered with distance.
    mass_centre_mm: tuple[float, float, float]
    mass_radius_mm: float
    mass_push: float


@dataclass(frozen=True)
class _Tumour:
    centre_mm: tuple[float, float, float]
    hemisphere: str
    radius_mm: float  # tumour core (TC) mean radius
    axes: tuple[float, float, float]  # relative ellipsoid axes
    rotation: tuple[float, ...]  # 3x3 row-major, orientation of the ellipsoid
    irregularity: float
    rim_mm: float  # thickness of the enhancing rim (HGG only)
    edema_mm: float  # how far edema reaches beyond the core along white matter
    enhancing: bool


# --------------------------------------------------------------------------------------------
# Public API


def synthesize(
    out: Path,
    cases: int,
    seed: int = 0,
    shape: tuple[int, int, int] = (240, 240, 155),
    no_et_fraction: float = 0.2,
    corrupt_fraction: float = 0.0,
    progress: bool = True,
    layout: str = "brats2020",
) -> list[Path]:
    """Write `cases` phantom cases in the BraTS 2020 layout under `out`; return their folders.

    `layout="brats2023"` writes the 2023+ layout instead (`BraTS-GLI-00001-000`, `-t1n`, `-t1c`,
    `-t2w`, `-t2f`, `-seg`, labels 1 NETC, 2 SNFH, 3 ET): the same tumours, and a
    `SATELLITE_FRACTION` of the cases get one or two satellite lesions away from the main one.

    `shape` is (x, y, z) in voxels; the field of view is always 240 x 240 x 155 mm, so a smaller
    shape gives coarser spacing. Images are int16 (0 outside the brain), segmentations uint8 with
    labels 0, 1, 2, 4. A `no_et_fraction` of cases are lower-grade-like (no enhancing tumour);
    a `corrupt_fraction` get deliberately wrong labels (at least one case when the fraction is
    above 0 and there are two or more cases). `out/phantom.json` records what was generated.
    """
    out = Path(out)
    shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
    if cases < 0:
        raise ValueError(f"cases must be >= 0, got {cases}")
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three sizes (x, y, z) of at least 8 voxels, got {shape}")
    for name, value in (("no_et_fraction", no_et_fraction), ("corrupt_fraction", corrupt_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(_LAYOUTS)}, got {layout!r}")
    settings = {"seed": seed, "shape": list(shape), "no_et_fraction": no_et_fraction,
                "corrupt_fraction": corrupt_fraction, "cases": cases}
    if layout != "brats2020":  # a 2020 manifest has no layout key; keep it so
        settings["layout"] = layout
    _refuse_other_dataset(out, settings)
    # A new dataset is written aside and renamed into place when complete: an interrupted write
    # (Ctrl-C, a full disk) leaves no folder that looks like a smaller dataset of the same name.
    fresh = not out.is_dir() or not any(out.iterdir())
    if fresh:
        out.parent.mkdir(parents=True, exist_ok=True)
        final, out = out, Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        folders = _write_cases(out, cases, seed, shape, no_et_fraction, corrupt_fraction, layout, progress)
    except BaseException:
        if fresh:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if fresh:
        if final.is_dir():
            final.rmdir()  # the empty folder it replaces
        out.rename(final)
        folders = [final / f.name for f in folders]
    return folders


def _write_cases(out: Path, cases: int, seed: int, shape: tuple[int, int, int], no_et_fraction: float,
                 corrupt_fraction: float, layout: str, progress: bool) -> list[Path]:
    """`synthesize`'s cases and manifest, written into `out`."""
    case_layout, prefix = _LAYOUTS[layout]
    geometry = phantom_geometry(shape)
    corrupted = _corrupted_cases(seed, cases, corrupt_fraction)

    folders, records = [], []
    for k in tqdm(range(cases), desc="phantom cases", unit="case", file=sys.stderr, disable=not progress):
        case_id = f"{CASE_PREFIX}{k + 1:03d}" if layout == "brats2020" else f"{prefix}{k + 1:05d}-000"
        lgg = _weyl(seed, k) < no_et_fraction
        images, seg, record = _make_case(seed, k, geometry, lgg)
        record = {"id": case_id, **record, "corrupted": None}
        if layout != "brats2020":
            record["satellites"] = _add_satellites(images, seg, seed, k, geometry, lgg)
        if k in corrupted:
            seg, record["corrupted"] = _corrupt(seg, seed, k, geometry)
        if layout != "brats2020":
            seg = BRATS_2023.from_regions(BRATS_2020.to_regions(seg))
        folder = out / case_id
        for name, suffix in zip(MODALITIES, case_layout.suffixes):
            write_image(images[name], geometry, folder / case_layout.file_name(case_id, suffix))
        write_image(seg, geometry, folder / case_layout.file_name(case_id, case_layout.seg_suffix))
        folders.append(folder)
        records.append(record)

    manifest = {
        "generator": "brats_lab.data.phantom",
        "layout": layout,
        "seed": seed,
        "shape": list(shape),
        "spacing": list(geometry.spacing),
        "origin": list(geometry.origin),
        "no_et_fraction": no_et_fraction,
        "corrupt_fraction": corrupt_fraction,
        "cases": records,
    }
    write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return folders


def _refuse_other_dataset(out: Path, settings: dict) -> None:
    """Writing over a folder that holds other cases would leave a mix of two datasets (and a
    phantom.json describing only one): refuse, unless it is this very dataset being made again."""
    existing = sorted(
        p.name for prefix in (CASE_PREFIX, _LAYOUTS["brats2023"][1]) for p in out.glob(f"{prefix}*") if p.is_dir()
    ) if out.is_dir() else []
    if not existing:
        return
    try:
        before = json.loads((out / MANIFEST).read_text())
        same = (
            all(before.get(k) == v for k, v in settings.items() if k not in ("cases", "layout"))
            and before.get("layout", "brats2020") == settings.get("layout", "brats2020")
            and len(before["cases"]) == settings["cases"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        same = False
    if not same or len(existing) != settings["cases"]:
        raise DataError(
            f"{out}: already holds {len(existing)} case folders of another dataset; write the phantoms "
            f"to a new folder (--out), or delete this one first"
        )


def phantom_geometry(shape: tuple[int, int, int] = (240, 240, 155)) -> Geometry:
    """The geometry of phantom cases of `shape` (x, y, z): BraTS field, origin and direction."""
    spacing = tuple(f / s for f, s in zip(FIELD_MM, shape))
    return Geometry(tuple(int(s) for s in shape), spacing, BRATS_ORIGIN, IDENTITY)


def tissue_maps(case_dir: Path) -> dict[str, np.ndarray]:
    """Tissue fractions (z, y, x) of a phantom case, as used to make its images: 'csf', 'gm', 'wm'.

    Fractions sum to 1 inside the brain and are 0 outside; the tumour is not removed from them.
    Read from the `phantom.json` beside the case folder, so it works only for phantom cases.
    """
    case_dir = Path(case_dir)
    manifest_path = case_dir.parent / MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{case_dir}: no {MANIFEST} beside the case folder (not a phantom dataset?)")
    manifest = json.loads(manifest_path.read_text())
    record = next((c for c in manifest["cases"] if c["id"] == case_dir.name), None)
    if record is None:
        raise DataError(f"{manifest_path}: no case '{case_dir.name}'")
    anatomy = _Anatomy(**{k: _tuple(v) for k, v in record["anatomy"].items()})
    brain, mix = _tissue(anatomy, phantom_geometry(tuple(manifest["shape"])))
    maps = {}
    for name, values in zip(_TISSUES, mix):
        maps[name] = np.zeros(brain.shape, np.float32)
        maps[name][brain] = values
    return maps


# --------------------------------------------------------------------------------------------
# Anatomy


def _nilearn_data() -> Path:
    # Find nilearn's data folder without importing nilearn.datasets (a second and a half).
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("nilearn is not installed: the phantom needs its MNI152 template maps")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def _mni_arrays() -> tuple[np.ndarray, sitk.Image]:
    """(csf, gm, wm) fractions, shape (3, z, y, x) float32 at 1 mm, and the template's geometry."""
    data = _nilearn_data()
    maps = {}
    for name in ("t1", "gm", "wm"):
        path = data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.is_file():
            raise DataError(f"{path}: MNI152 template map missing from the nilearn installation")
        maps[name] = sitk.ReadImage(str(path))
    t1 = sitk.GetArrayFromImage(maps["t1"])
    gm = sitk.GetArrayFromImage(maps["gm"]).astype(np.float32) / 255.0
    wm = sitk.GetArrayFromImage(maps["wm"]).astype(np.float32) / 255.0
    # The shipped T1 is skull-stripped: its non-zero voxels are the brain (ventricles included).
    # Its mask keeps a thick, even band of CSF around the cortex, which on T2 draws a bright ring
    # that real skull-stripped scans do not have; keep CSF only within 2 mm of the tissue.
    tissue = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.5, iterations=3))
    near = ndimage.binary_dilation(tissue, ndimage.generate_binary_structure(3, 2), iterations=2)
    brain = ((t1 > 0) & near).astype(np.float32)
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    gm *= brain
    wm *= brain
    csf = np.clip(brain - gm - wm, 0.0, 1.0)
    return np.stack([csf, gm, wm]), maps["t1"]


@functools.lru_cache(maxsize=3)  # 100 MB each: the unsmoothed maps and a shape or two
def _mni_images(sigma_mm: tuple[float, float, float]) -> tuple[sitk.Image, ...]:
    """The tissue maps as images, smoothed for partial volume at coarse spacing. Separate scalar
    images: SimpleITK resamples a vector image with a large fixed cost per call."""
    arrays, reference = _mni_arrays()
    images = []
    for a in arrays:
        if max(sigma_mm) > 0:
            a = ndimage.gaussian_filter(a, sigma=sigma_mm[::-1], mode="constant", truncate=3.0)
        img = sitk.GetImageFromArray(np.ascontiguousarray(a, dtype=np.float32))
        img.CopyInformation(reference)
        images.append(img)
    return tuple(images)


@functools.lru_cache(maxsize=1)
def _mni_brain_box() -> tuple[np.ndarray, np.ndarray]:
    """Physical (LPS) corners of the template brain's bounding box: lower, upper."""
    arrays, reference = _mni_arrays()
    z, y, x = np.nonzero(arrays.sum(axis=0) > 0.5)
    a = np.array(reference.TransformIndexToPhysicalPoint((int(x.min()), int(y.min()), int(z.min()))))
    b = np.array(reference.TransformIndexToPhysicalPoint((int(x.max()), int(y.max()), int(z.max()))))
    return np.minimum(a, b), np.maximum(a, b)


def _affine(anatomy: _Anatomy) -> sitk.AffineTransform:
    """Maps a BraTS-field point to the MNI point shown there (SimpleITK resampling direction)."""
    lo, hi = _mni_brain_box()
    s = np.array(anatomy.scale)
    # The brain's midline and antero-posterior centre go to the field centre; its top sits
    # `top_margin_mm` below the top of the field (a tall brain loses the lowest cerebellum, as
    # real BraTS volumes sometimes do).
    top = BRATS_ORIGIN[2] + FIELD_MM[2] - 1.0 - anatomy.top_margin_mm
    mni_centre = np.array([0.0, (lo[1] + hi[1]) / 2.0, hi[2] - (top - _FIELD_CENTRE[2]) / s[2]])
    rx, ry, rz = np.deg2rad(anatomy.rotation_deg)
    rot = (
        np.array([[math.cos(rz), -math.sin(rz), 0], [math.sin(rz), math.cos(rz), 0], [0, 0, 1]])
        @ np.array([[math.cos(ry), 0, math.sin(ry)], [0, 1, 0], [-math.sin(ry), 0, math.cos(ry)]])
        @ np.array([[1, 0, 0], [0, math.cos(rx), -math.sin(rx)], [0, math.sin(rx), math.cos(rx)]])
    )
    # Placing the brain is p = c_field + R S (q - c_mni) + shift; resampling needs the inverse.
    inverse = np.diag(1.0 / s) @ rot.T
    centre = np.array(_FIELD_CENTRE)
    transform = sitk.AffineTransform(3)
    transform.SetCenter(tuple(centre))
    transform.SetMatrix(tuple(inverse.ravel()))
    transform.SetTranslation(tuple(mni_centre - centre - inverse @ np.array(anatomy.shift_mm)))
    return transform


def _mass_effect(anatomy: _Anatomy) -> sitk.Transform | None:
    """Radial push around the tumour as a displacement field on a coarse grid (None: no push)."""
    if anatomy.mass_push <= 0:
        return None
    step = 4.0
    size = [int(math.ceil(f / step)) + 1 for f in FIELD_MM]
    origin = np.array(BRATS_ORIGIN) - step / 2
    z, y, x = np.meshgrid(*(origin[i] + step * np.arange(size[i]) for i in (2, 1, 0)), indexing="ij")
    c = np.array(anatomy.mass_centre_mm)
    d = np.stack([x - c[0], y - c[1], z - c[2]], axis=-1)
    r = np.maximum(np.linalg.norm(d, axis=-1), 1e-6)
    big = anatomy.mass_radius_mm
    small = big * (1.0 - anatomy.mass_push)
    # Tissue seen at radius r came from radius s, with r^3 - s^3 = big^3 - small^3 (volume kept).
    source = np.cbrt(np.maximum(r**3 - (big**3 - small**3), 0.0))
    source = np.where(r < big, r * small / big, source)
    # The skull holds the brain: the push fades within a few radii.
    taper = np.exp(-(np.maximum(r - big, 0.0) / _taper_mm(big)) ** 2)
    shrink = 1.0 - (1.0 - source / r) * taper
    field = d * (shrink - 1.0)[..., None]
    image = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    image.SetOrigin(tuple(origin))
    image.SetSpacing((step, step, step))
    return sitk.DisplacementFieldTransform(image)


@functools.lru_cache(maxsize=4)
def _transforms(anatomy: _Anatomy) -> tuple[sitk.Transform, sitk.Transform]:
    """Field -> template transforms of a case: the affine alone, and with the mass effect."""
    affine = _affine(anatomy)
    push = _mass_effect(anatomy)
    if push is None:
        return affine, affine
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(affine)
    composite.AddTransform(push)  # applied first: push in the field, then into the template
    return affine, composite


def _resample(transform: sitk.Transform, size, spacing, origin, sigma_mm=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Tissue maps (3, z, y, x) on a grid with identity direction."""
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing(tuple(float(s) for s in spacing))
    reference.SetOrigin(tuple(float(o) for o in origin))
    reference.SetDirection(IDENTITY)
    return np.stack([
        sitk.GetArrayFromImage(sitk.Resample(image, reference, transform, sitk.sitkLinear, 0.0))
        for image in _mni_images(tuple(sigma_mm))
    ])


def _tissue(anatomy: _Anatomy, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """Brain mask (z, y, x) on the case grid and the tissue fractions of its voxels, (3, voxels)
    in `_TISSUES` order, summing to 1."""
    # Average over the voxel footprint at coarse spacing (partial volume), not point samples.
    sigma = tuple(0.42 * math.sqrt(max(s * s - 1.0, 0.0)) for s in geometry.spacing)
    affine, composite = _transforms(anatomy)
    # Resample only the box that can hold brain: the template's box placed in the field.
    lo_mni, hi_mni = _mni_brain_box()
    forward = affine.GetInverse()
    corners = np.array([forward.TransformPoint(tuple(float(v) for v in np.where(c, hi_mni, lo_mni)))
                        for c in np.ndindex(2, 2, 2)])
    margin = 4.0 + anatomy.mass_radius_mm * anatomy.mass_push  # the push may move the surface out
    box_lo, box_hi = _index_box(geometry, corners.min(axis=0) - margin, corners.max(axis=0) + margin)
    maps = _resample(affine, box_hi - box_lo + 1, geometry.spacing, _index_to_mm(geometry, box_lo), sigma)
    if composite is not affine:
        # The push fades within a few radii of the tumour: redo only that box with it (the
        # displacement-field transform is several times slower than the affine alone).
        reach = anatomy.mass_radius_mm + 1.6 * _taper_mm(anatomy.mass_radius_mm)
        centre = np.array(anatomy.mass_centre_mm)
        lo, hi = _index_box(geometry, centre - reach, centre + reach)
        lo, hi = np.maximum(lo, box_lo), np.minimum(hi, box_hi)
        if np.all(hi >= lo):
            local = _resample(composite, hi - lo + 1, geometry.spacing, _index_to_mm(geometry, lo), sigma)
            a, b = lo - box_lo, hi - box_lo
            maps[:, a[2] : b[2] + 1, a[1] : b[1] + 1, a[0] : b[0] + 1] = local
    inside = maps.sum(axis=0) > 0.5
    mix = maps[:, inside]  # C order within the box is C order within the field
    mix /= mix.sum(axis=0)
    brain = np.zeros(geometry.shape, bool)
    brain[box_lo[2] : box_hi[2] + 1, box_lo[1] : box_hi[1] + 1, box_lo[0] : box_hi[0] + 1] = inside
    return brain, mix


def _index_box(geometry: Geometry, lo_mm, hi_mm) -> tuple[np.ndarray, np.ndarray]:
    """Voxel index (x, y, z) bounds, inclusive and inside the grid, of a physical box."""
    spacing, origin = np.array(geometry.spacing), np.array(geometry.origin)
    top = np.array(geometry.size) - 1
    lo = np.clip(np.floor((np.asarray(lo_mm) - origin) / spacing), 0, top).astype(int)
    hi = np.clip(np.ceil((np.asarray(hi_mm) - origin) / spacing), 0, top).astype(int)
    return lo, hi


def _index_to_mm(geometry: Geometry, index) -> np.ndarray:
    return np.array(geometry.origin) + np.asarray(index) * np.array(geometry.spacing)


def _taper_mm(radius_mm: float) -> float:
    return 0.6 * radius_mm + 8.0


# --------------------------------------------------------------------------------------------
# Sampling one case


def _weyl(seed: int, k: int) -> float:
    """A low-discrepancy number in [0, 1) for case k (golden-ratio sequence, seeded offset): every
    prefix of cases gets close to a requested fraction, and case k's number does not depend on
    how many cases there are (its images must not)."""
    offset = np.random.SeedSequence(seed, spawn_key=(2**31 - 1,)).generate_state(1)[0] / 2**32
    return (offset + k * (math.sqrt(5.0) - 1.0) / 2.0) % 1.0


def _corrupted_cases(seed: int, cases: int, fraction: float) -> set[int]:
    """Exactly round(fraction * cases) cases (at least one when fraction > 0 and cases >= 2): those
    whose own seeded draw is lowest. Only labels are corrupted, so images never depend on it."""
    count = int(math.floor(fraction * cases + 0.5))
    if fraction > 0 and cases >= 2:
        count = max(count, 1)
    draws = [
        np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, 2**20 + 1))).random() for k in range(cases)
    ]
    return set(sorted(range(cases), key=lambda k: draws[k])[:count])


def _sample_anatomy(rng: np.random.Generator) -> dict:
    return dict(
        rotation_deg=tuple(float(v) for v in rng.uniform(-1, 1, 3) * np.array([4.0, 3.0, 6.0])),
        scale=tuple(float(v) for v in rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, 3)),
        shift_mm=tuple(float(v) for v in rng.uniform(-1, 1, 3) * np.array([3.0, 5.0, 2.0])),
        top_margin_mm=float(rng.uniform(2.0, 9.0)),
    )


def _sample_tumour(rng: np.random.Generator, anatomy: _Anatomy, lgg: bool) -> _Tumour:
    """Where and how big: a centre in the white matter of one cerebral hemisphere."""
    affine = _affine(anatomy)
    step = _PICK_GRID_MM
    size = [int(f / step) for f in FIELD_MM]
    origin = np.array(BRATS_ORIGIN) + step / 2
    maps = _resample(affine, size, (step,) * 3, origin)
    brain = maps.sum(axis=0) > 0.5
    depth = ndimage.distance_transform_edt(brain) * step  # mm to the brain surface
    zi, yi, xi = np.indices(brain.shape)
    points = np.stack([origin[0] + xi * step, origin[1] + yi * step, origin[2] + zi * step], axis=-1)
    # Where each point sits in the template: MNI x is the midline (symmetric template), MNI z
    # separates the cerebrum from the cerebellum and brainstem.
    matrix = np.array(affine.GetMatrix()).reshape(3, 3)
    centre = np.array(affine.GetCenter())
    mni = (points - centre) @ matrix.T + centre + np.array(affine.GetTranslation())

    # Core radius: log-uniform from small to large; lower-grade tumours are larger, with less edema.
    radius = float(math.exp(rng.uniform(math.log(8.0), math.log(28.0))))
    if lgg:
        radius = float(min(radius * 1.25, 30.0))
    for _ in range(8):
        ok = (
            (maps[2] > 0.55)
            & (depth > 0.55 * radius + 6.0)
            & (np.abs(mni[..., 0]) > 14.0)
            & (mni[..., 2] > -8.0)
            & (mni[..., 2] < 62.0)
        )
        if ok.sum() >= 4:
            break
        radius *= 0.85
    candidates = np.argwhere(ok)
    if len(candidates) == 0:  # cannot happen with the MNI anatomy; keep a sane fallback
        candidates = np.argwhere(maps[2] > 0.5)
    zc, yc, xc = candidates[rng.integers(len(candidates))]
    centre_mm = points[zc, yc, xc] + rng.uniform(-step / 2, step / 2, 3)
    # LPS: MNI x > 0 is the patient's left.
    hemisphere = "left" if mni[zc, yc, xc, 0] > 0 else "right"

    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    axes = tuple(float(v) for v in rng.uniform(0.75, 1.0, 3))
    if lgg:
        edema = float(rng.uniform(2.0, 10.0))
        rim = 0.0
    else:
        edema = float(rng.uniform(4.0, 28.0))
        rim = float(rng.uniform(2.5, 6.0))
    return _Tumour(
        centre_mm=tuple(float(v) for v in centre_mm),  # type: ignore[arg-type]
        hemisphere=hemisphere,
        radius_mm=radius,
        axes=axes,  # type: ignore[arg-type]
        rotation=tuple(float(v) for v in q.ravel()),
        irregularity=float(rng.uniform(0.15, 0.35)),
        rim_mm=rim,
        edema_mm=edema,
        enhancing=not lgg,
    )


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_vox: float) -> np.ndarray:
    """Smooth random field with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="reflect")
    return (field - field.mean()) / max(float(field.std()), 1e-6)


# --------------------------------------------------------------------------------------------
# Tumour


def _tumour_fields(tumour: _Tumour, anatomy: _Anatomy, rng: np.random.Generator, spacing) -> tuple:
    """Signed distances (mm, negative inside) of core, necrosis and edema, and a texture field,
    on a fixed 2 mm physical grid around the tumour; returned with that grid's origin and size."""
    step = _TUMOUR_GRID_MM
    reach = tumour.radius_mm * (1.0 + tumour.irregularity) * 1.25 + tumour.edema_mm * 1.45 + 8.0
    n = int(math.ceil(2 * reach / step)) + 1
    origin = np.array(tumour.centre_mm) - step * (n - 1) / 2
    grid = (n, n, n)

    # Noise first, in a fixed order, so the fields are the same whatever the target spacing.
    shape_noise = _smooth_noise(rng, grid, max(3.0, 0.4 * tumour.radius_mm) / step)
    rim_noise = _smooth_noise(rng, grid, 4.0 / step)
    edema_noise = _smooth_noise(rng, grid, 7.0 / step)
    texture = _smooth_noise(rng, grid, 2.5 / step)  # slow variation inside the tumour

    idx = np.indices(grid, dtype=np.float32) * step  # (z, y, x)
    offset = np.stack([idx[2] + origin[0], idx[1] + origin[1], idx[0] + origin[2]], axis=-1) - np.array(
        tumour.centre_mm
    )
    local = offset @ np.array(tumour.rotation).reshape(3, 3)
    radius = np.linalg.norm(local / np.array(tumour.axes), axis=-1) / tumour.radius_mm
    f = radius - tumour.irregularity * shape_noise  # < 1 inside the core; lumpy, not a sphere
    core = (f - 1.0) * tumour.radius_mm

    # The enhancing rim must stay visible at the coarsest spacing.
    rim = max(tumour.rim_mm, 1.1 * max(spacing)) * np.maximum(1.0 + 0.45 * rim_noise, 0.3)
    necrosis = core + rim if tumour.enhancing else np.full(grid, 1e3, np.float32)

    # Edema: the distance reached from the core through white matter (repeated dilation inside
    # WM), or a thin shell through any non-CSF tissue, whichever is shorter.
    maps = _resample(_transforms(anatomy)[1], (n, n, n), (step,) * 3, origin)
    brain = maps.sum(axis=0) > 0.5
    wm = maps[2] / np.maximum(maps.sum(axis=0), 1e-6)
    csf = maps[0] / np.maximum(maps.sum(axis=0), 1e-6)
    inside = core < 0
    reached = inside.copy()
    geodesic = np.where(inside, 0.0, np.inf).astype(np.float32)
    path = brain & (wm > 0.4) & (csf < 0.5)
    structures = (ndimage.generate_binary_structure(3, 1), ndimage.generate_binary_structure(3, 3))
    for i in range(int(math.ceil(tumour.edema_mm * 1.5 / step)) + 1):
        grown = ndimage.binary_dilation(reached, structures[i % 2]) & path & ~reached
        if not grown.any():
            break
        geodesic[grown] = (i + 1) * step
        reached |= grown
    euclid = ndimage.distance_transform_edt(~inside, sampling=step) if inside.any() else np.full(grid, np.inf)
    shell = 0.35 * tumour.edema_mm + 1.5
    distance = np.minimum(geodesic, euclid * tumour.edema_mm / shell)
    distance = np.minimum(distance, 4 * reach)
    distance = ndimage.gaussian_filter(distance.astype(np.float32), 1.0)  # soften the dilation steps
    edema = distance - tumour.edema_mm * (1.0 + 0.3 * edema_noise)
    edema = np.where(brain & (csf < 0.5), edema, np.maximum(edema, 1.0))
    proximity = np.clip(1.0 - distance / max(tumour.edema_mm, 1e-3), 0.0, 1.0)
    fields = np.stack([core, necrosis, edema, texture, proximity]).astype(np.float32)
    return fields, origin, grid


def _fields_on_grid(fields: np.ndarray, origin, grid, geometry: Geometry) -> tuple[tuple[slice, ...], np.ndarray]:
    """Resample the tumour fields onto the part of the case grid they cover: (slices, fields)."""
    spacing = np.array(geometry.spacing)
    lo = np.floor((origin - np.array(geometry.origin)) / spacing).astype(int)
    far = origin + _TUMOUR_GRID_MM * (np.array(grid) - 1)
    hi = np.ceil((far - np.array(geometry.origin)) / spacing).astype(int)
    lo = np.clip(lo, 0, np.array(geometry.size) - 1)
    hi = np.clip(hi, 0, np.array(geometry.size) - 1)
    size = hi - lo + 1
    parts = []
    for field, outside in zip(fields, (1e3, 1e3, 1e3, 0.0, 0.0)):
        image = sitk.GetImageFromArray(np.ascontiguousarray(field))
        image.SetOrigin(tuple(float(o) for o in origin))
        image.SetSpacing((_TUMOUR_GRID_MM,) * 3)
        reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
        reference.SetSpacing(tuple(spacing))
        reference.SetOrigin(tuple(float(v) for v in np.array(geometry.origin) + lo * spacing))
        out = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, outside)
        parts.append(sitk.GetArrayFromImage(out))
    box = tuple(slice(int(a), int(b) + 1) for a, b in zip(lo[::-1], hi[::-1]))
    return box, np.stack(parts)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30, 30)))


# --------------------------------------------------------------------------------------------
# One case


def _make_case(seed: int, k: int, geometry: Geometry, lgg: bool) -> tuple[dict[str, np.ndarray], np.ndarray, dict]:
    """Images (int16, z y x), clean labels (uint8) and the json record of case k."""
    # Separate streams for anatomy, tumour, and intensities: changing one model does not
    # reshuffle the others.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed, spawn_key=(k,)).spawn(3)]
    rng_anat, rng_tumour, rng_mri = streams

    placement = _sample_anatomy(rng_anat)
    tumour = _sample_tumour(rng_tumour, _Anatomy(**placement, mass_centre_mm=(0, 0, 0), mass_radius_mm=1.0,
                                                mass_push=0.0), lgg)
    push = float(rng_anat.uniform(0.15, 0.45) if tumour.radius_mm > 10 else rng_anat.uniform(0.0, 0.2))
    anatomy = _Anatomy(**placement, mass_centre_mm=tumour.centre_mm, mass_radius_mm=tumour.radius_mm,
                       mass_push=push)

    brain, mix = _tissue(anatomy, geometry)  # mix: (3, voxels of the brain)
    position = np.full(geometry.shape, -1, np.int64)  # where each brain voxel sits in `mix`
    position[brain] = np.arange(mix.shape[1])
    fields, origin, grid = _tumour_fields(tumour, anatomy, rng_tumour, geometry.spacing)
    box, local = _fields_on_grid(fields, origin, grid, geometry)
    core, necrosis, edema, texture, proximity = local
    in_brain = brain[box]
    sel = position[box][in_brain]
    csf = np.zeros(in_brain.shape, np.float32)
    csf[in_brain] = mix[0, sel]

    # Labels: hard thresholds of the same fields the soft weights come from.
    seg = np.zeros(geometry.shape, np.uint8)
    part = np.zeros(core.shape, np.uint8)
    part[(edema < 0) & (csf < 0.5)] = ED
    part[core < 0] = ET if tumour.enhancing else NCR
    part[necrosis < 0] = NCR
    part[~in_brain] = 0
    seg[box] = part

    # Soft weights (partial volume over about a voxel) for the intensities, as vectors over the
    # voxels of the brain inside the tumour box; `sel` says where those sit among all brain voxels.
    width = 0.35 * max(1.0, float(np.mean(geometry.spacing)))
    w_core = _sigmoid(-core[in_brain] / width)
    w_nec = np.minimum(_sigmoid(-necrosis[in_brain] / width), w_core)
    # Edema fades into the white matter over a few millimetres; the core's borders are sharper.
    fade = 0.6 * max(2.0, float(np.mean(geometry.spacing)))
    w_wt = np.maximum(_sigmoid(-edema[in_brain] / fade) * (1.0 - csf[in_brain]), w_core)
    w_ed = w_wt - w_core
    w_rim = w_core - w_nec
    # Edema is tissue soaked in water: strongest near the core and in white matter, so the cortex
    # it reaches stays darker on FLAIR and the hyperintensity looks finger-like.
    lumpy = 1.0 + 0.12 * texture[in_brain]
    strength = (0.35 + 0.65 * proximity[in_brain] ** 0.7) * (0.45 + 0.55 * mix[2, sel])
    strength *= 1.0 + 0.1 * texture[in_brain]

    # Smooth multiplicative bias field: exp of a random quadratic polynomial over the head.
    z, y, x = (
        ((np.nonzero(brain)[i] * geometry.spacing_zyx[i] + geometry.origin[2 - i] - _FIELD_CENTRE[2 - i]) / 100.0)
        .astype(np.float32)
        for i in range(3)
    )
    basis = np.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])  # about -1..1 over the head

    images, scanner = {}, {}
    for name in MODALITIES:
        mu = (np.array(_MEANS[name]) * rng_mri.uniform(0.95, 1.05, 7)).astype(np.float32)  # contrast jitter
        level = _WM_LEVEL[name] * math.exp(rng_mri.normal(0.0, 0.3))  # scanner gain
        offset = float(rng_mri.uniform(0.0, 0.08))
        noise_sd = float(rng_mri.uniform(0.015, 0.04))
        bias = rng_mri.normal(0.0, 0.1, 9).astype(np.float32)
        values = mu[:3] @ mix
        tissue = values[sel]
        edema_signal = tissue + (mu[5] - tissue) * strength
        core_mean = mu[4] if tumour.enhancing else mu[6]
        values[sel] = (1.0 - w_wt) * tissue + w_ed * edema_signal + (w_rim * core_mean + w_nec * mu[3]) * lumpy
        values *= np.exp(bias @ basis)
        values = (values + offset) * level
        sd = np.float32(noise_sd * level)
        # Rician noise: magnitude of a complex signal with Gaussian noise in both channels.
        real = values + sd * rng_mri.standard_normal(values.shape, dtype=np.float32)
        imag = sd * rng_mri.standard_normal(values.shape, dtype=np.float32)
        values = np.sqrt(real * real + imag * imag)
        image = np.zeros(geometry.shape, np.int16)
        image[brain] = np.clip(np.rint(values), 1, 32767).astype(np.int16)  # > 0 marks the brain
        images[name] = image
        scanner[name] = {"gain": round(level, 3), "offset": round(offset, 4), "noise_sd": round(noise_sd, 4)}

    voxel_ml = float(np.prod(geometry.spacing)) / 1000.0
    centre_voxel = [(c - o) / s for c, o, s in zip(tumour.centre_mm, geometry.origin, geometry.spacing)]
    record = {
        "grade": "HGG" if tumour.enhancing else "LGG",
        "has_et": bool((seg == ET).any()),
        "tumour": {
            "hemisphere": tumour.hemisphere,
            "centre_mm": list(tumour.centre_mm),
            "centre_voxel": [round(v, 2) for v in centre_voxel],  # (x, y, z)
            "radius_mm": round(tumour.radius_mm, 2),
            "rim_mm": round(tumour.rim_mm, 2),
            "edema_mm": round(tumour.edema_mm, 2),
            "volume_ml": {
                BRATS_2020.labels[label]: round(float((seg == label).sum()) * voxel_ml, 3)
                for label in (NCR, ED, ET)
            },
        },
        "anatomy": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(anatomy).items()},
        "scanner": scanner,
    }
    return images, seg, record


def _tuple(value):
    return tuple(value) if isinstance(value, list) else value


# --------------------------------------------------------------------------------------------
# Deliberately wrong labels


def _corrupt(seg: np.ndarray, seed: int, k: int, geometry: Geometry) -> tuple[np.ndarray, dict]:
    """A plausible labelling mistake: shifted mask, swapped labels, or half the tumour missing."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, 2**20)))
    kind = str(rng.choice(["shift", "swap", "erase"]))
    out, info = _apply_corruption(seg, kind, rng, geometry)
    if np.array_equal(out, seg):  # e.g. nothing to swap at a coarse spacing: shift instead
        out, info = _apply_corruption(seg, "shift", rng, geometry)
    return out, info


def _apply_corruption(seg: np.ndarray, kind: str, rng: np.random.Generator, geometry: Geometry) -> tuple:
    if kind == "swap":
        other = ET if (seg == ET).any() else NCR
        out = seg.copy()
        out[seg == ED] = other
        out[seg == other] = ED
        return out, {"kind": "swap", "labels": [ED, other]}
    if kind == "erase":
        tumour = np.argwhere(seg > 0)
        centre = tumour.mean(axis=0)
        normal = rng.normal(size=3)
        side = (np.indices(seg.shape).reshape(3, -1).T - centre) @ normal > 0
        out = seg.copy()
        out[side.reshape(seg.shape)] = 0
        return out, {"kind": "erase", "fraction_removed": round(float(1 - (out > 0).sum() / len(tumour)), 3)}
    # shift: the mask drawn a few millimetres off, along one axis
    axis = int(rng.integers(3))  # x, y, z
    mm = float(rng.uniform(6.0, 12.0)) * (1 if rng.random() < 0.5 else -1)
    voxels = int(round(mm / geometry.spacing[axis])) or (2 if mm > 0 else -2)
    shift = [0, 0, 0]
    shift[axis] = voxels
    out = np.roll(seg, voxels, axis=2 - axis)  # numpy axes are (z, y, x)
    return out, {"kind": "shift", "voxels": shift}  # (x, y, z)


# --------------------------------------------------------------------------------------------
# Satellite lesions (2023 layout)


def _add_satellites(
    images: dict[str, np.ndarray], seg: np.ndarray, seed: int, k: int, geometry: Geometry, lgg: bool
) -> list[dict]:
    """Give a `SATELLITE_FRACTION` of the cases one or two small separate lesions (edema around
    an enhancing rim and a necrotic core; a non-enhancing core for lower grade), in the brain and
    at least 15 mm from the main tumour; paint them into `seg` (2020 labels) and `images` (the
    tissue there scaled by the compartments' contrast). Returns what was added, for the json.
    Its own random stream: the main tumour and the images elsewhere are those of the 2020 layout."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(k, 2**20 + 2)))
    if rng.random() >= SATELLITE_FRACTION:
        return []
    spacing = np.array(geometry.spacing_zyx)
    brain = images["t1"] > 0
    tumour = np.argwhere(seg > 0) * spacing  # mm, (z, y, x)
    inside = np.argwhere(brain)
    added: list[dict] = []
    for _ in range(int(rng.integers(1, 3))):
        radius = max(float(rng.uniform(4.0, 8.0)), 1.5 * float(spacing.max()))  # core radius, mm
        reach = radius + 4.0 + 2.0 * float(spacing.max())  # edema shell
        for _attempt in range(60):
            centre = inside[rng.integers(len(inside))] * spacing
            far = tumour.size == 0 or np.sqrt(((tumour - centre) ** 2).sum(axis=1)).min() > reach + 15.0
            ends = [centre + sign * reach * np.eye(3)[axis] for axis in range(3) for sign in (-1, 1)]
            held = all(
                np.all(e >= 0) and np.all(e / spacing < brain.shape) and brain[tuple(np.round(e / spacing).astype(int).clip(0, np.array(brain.shape) - 1))]
                for e in ends
            )
            if far and held:
                break
        else:
            continue
        lo = np.maximum(np.floor((centre - reach) / spacing).astype(int), 0)
        hi = np.minimum(np.ceil((centre + reach) / spacing).astype(int) + 1, seg.shape)
        box = tuple(slice(a, b) for a, b in zip(lo, hi))
        grid = np.indices(hi - lo).reshape(3, -1).T + lo
        dist = np.sqrt((((grid * spacing) - centre) ** 2).sum(axis=1)).reshape(tuple(hi - lo))
        part = np.zeros(dist.shape, np.uint8)
        part[dist <= reach] = ED
        if lgg:
            part[dist <= radius] = NCR
        else:
            part[dist <= radius] = ET
            part[dist <= max(radius - 2.0 * float(spacing.max()), 0.5 * radius)] = NCR
        part[~brain[box]] = 0
        region = seg[box]
        new = (part > 0) & (region == 0)
        region[new] = part[new]
        # The tissue under the lesion takes the compartment's contrast (relative to white matter).
        for name, image in images.items():
            column = {ED: 5, ET: 4, NCR: 3 if not lgg else 6}
            scale = np.ones(part.shape, np.float32)
            for label, index in column.items():
                scale[new & (part == label)] = _MEANS[name][index]
            patch = image[box]
            patch[new] = np.clip(np.rint(patch[new] * scale[new]), 1, 32767).astype(np.int16)
        added.append({"centre_mm_zyx_from_origin": [round(float(c), 2) for c in centre], "radius_mm": round(radius, 2)})
    return added
