"""Pictures of a case: one axial slice through the tumour, the four modalities and label overlays
(`render_case`, from arrays; `render_overview`, from a case folder on disk), and the slices the
dashboard's viewer shows.

Overlays use the paper's colours: ET red, NCR/NET green, ED yellow. matplotlib is imported only
when a picture is drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from brats_lab import DataError
from brats_lab.data.cases import MODALITIES, discover
from brats_lab.io import read_image
from brats_lab.labels import LabelConvention

COLOURS = ("#30d030", "#ffd700", "#ff3030")  # NCR/NET green, ED yellow, ET red (the paper's)


def render_case(
    images: np.ndarray,
    convention: LabelConvention,
    png: Path,
    reference: np.ndarray | None = None,
    prediction: np.ndarray | None = None,
    title: str | None = None,
) -> int:
    """Draw images (4, z, y, x) with label maps (z, y, x) over T1ce; returns the slice drawn.

    With a prediction the bottom row shows ground truth and prediction over T1ce; with only a
    reference, the labels over T1ce and FLAIR. The slice is the one with the most whole tumour in
    the reference (else the prediction, else the most brain). Radiological view: anterior up, the
    patient's right on the left of the image. `{slice}` in the title stands for where it is.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    brain = np.any(images != 0, axis=0)
    wt = convention.regions["WT"]
    shown = reference if reference is not None and np.isin(reference, wt).any() else prediction
    if shown is not None and np.isin(shown, wt).any():
        z = int(np.argmax(np.isin(shown, wt).sum(axis=(1, 2))))
    else:
        z = int(np.argmax(brain.sum(axis=(1, 2))))

    # Crop to the brain (with a margin) so the anatomy, not the empty field, fills the panels.
    ys, xs = np.nonzero(brain.any(axis=0))
    crop: tuple[slice, slice] = (slice(None), slice(None))
    if ys.size:
        m = max(2, brain.shape[1] // 40)
        crop = (slice(max(ys.min() - m, 0), ys.max() + m + 1), slice(max(xs.min() - m, 0), xs.max() + m + 1))

    t1ce, flair = MODALITIES.index("t1ce"), MODALITIES.index("flair")
    panels: list[tuple[int, str, np.ndarray | None]] = [(i, n, None) for i, n in enumerate(MODALITIES)]
    if prediction is not None:
        panels += [(t1ce, "ground truth", reference), (t1ce, "prediction", prediction)]
    else:
        panels += [(t1ce, "t1ce + labels", reference), (flair, "flair + labels", reference)]

    height, width = images[0, z][crop].shape
    fig, axes = plt.subplots(2, 3, figsize=(12, 8.0 * height / width + 0.9), facecolor="black")
    cmap = ListedColormap(["none", *COLOURS])
    for ax, (channel, name, labels) in zip(axes.flat, panels):
        volume = images[channel]
        inside = volume[brain]
        lo, hi = np.percentile(inside, [0.5, 99.5]) if inside.size else (0.0, 1.0)
        # Background black whatever the normalisation (z-scored brains have negative values).
        plane = np.where(brain[z], volume[z], lo)[crop]
        ax.imshow(plane, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6), interpolation="nearest")
        if labels is not None:
            classes = _classes(labels[z][crop], convention)
            ax.imshow(np.ma.masked_equal(classes, 0), cmap=cmap, vmin=0, vmax=3, alpha=0.45, interpolation="nearest")
        ax.set_title(name, color="white", fontsize=11)
        ax.set_axis_off()
    if reference is not None or prediction is not None:
        names = [convention.labels[_only(convention, "TC")], convention.labels[_only(convention, "WT")], "ET"]
        fig.legend(handles=[Patch(color=c, label=n) for c, n in zip(COLOURS, names)], loc="lower center",
                   ncol=3, frameon=False, labelcolor="white", fontsize=10)
    where = f"axial slice {z} (anterior up, patient right on the left)"
    fig.suptitle((title or "{slice}").replace("{slice}", where), color="white", fontsize=12)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=80, facecolor="black")
    plt.close(fig)
    return z


def render_overview(case_dir: Path, png: Path, seg: Path | None = None, title: str | None = None) -> None:
    """Draw one axial slice through the tumour: the four modalities, then T1ce and FLAIR with labels.

    `case_dir` is any case folder of a known layout; `seg` overrides its label file (e.g. to show a
    prediction). Without labels the slice through the middle of the brain is shown and the overlay
    panels are left without overlay. Radiological convention: anterior at the top, the patient's
    right on the left of the image.
    """
    case_dir = Path(case_dir)
    case = next((c for c in discover(case_dir.parent) if c.dir.resolve() == case_dir.resolve()), None)
    if case is None:
        raise DataError(f"{case_dir}: not a case folder of a known BraTS layout")
    images = np.stack([read_image(path, np.float32)[0] for path in case.images])
    seg_path = Path(seg) if seg is not None else case.seg
    labels = read_image(seg_path, np.int16)[0] if seg_path is not None and seg_path.is_file() else None
    render_case(images, case.convention, png, reference=labels, title=title or f"{case.id}  {{slice}}")


def _only(convention: LabelConvention, region: str) -> int:
    """The label a region adds to the one inside it (TC: NCR/NET, WT: ED)."""
    inner = {"TC": "ET", "WT": "TC"}[region]
    return next(l for l in convention.regions[region] if l not in convention.regions[inner])


def _classes(plane: np.ndarray, convention: LabelConvention) -> np.ndarray:
    """Colour index per voxel: 1 NCR/NET, 2 ED, 3 ET."""
    classes = np.zeros(plane.shape, np.uint8)
    classes[np.isin(plane, convention.regions["WT"])] = 2
    classes[np.isin(plane, convention.regions["TC"])] = 1
    classes[np.isin(plane, convention.regions["ET"])] = 3
    return classes


# --- slices for the dashboard's viewer (numpy only: fast enough to redraw on every slider move) ---

VIEWS: tuple[str, ...] = ("axial", "coronal", "sagittal")
_AXIS = {"axial": 0, "coronal": 1, "sagittal": 2}  # of a (z, y, x) volume


def slice_count(shape: tuple[int, ...], view: str) -> int:
    return shape[-3:][_AXIS[view]]


def plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """One slice of a (z, y, x) volume, oriented as `render_case` draws the axial one; coronal and
    sagittal slices have the top of the head up."""
    axis = _AXIS[view]
    cut = np.take(volume, index, axis=axis)
    return cut if axis == 0 else cut[::-1]


def tumour_slice(labels: np.ndarray | None, convention: LabelConvention, view: str) -> int | None:
    """The slice of `view` with the most whole tumour, or None when there is none."""
    if labels is None:
        return None
    wt = np.isin(labels, convention.regions["WT"])
    if not wt.any():
        return None
    other = tuple(a for a in range(3) if a != _AXIS[view])
    return int(np.argmax(wt.sum(axis=other)))


def window(volume: np.ndarray) -> tuple[float, float]:
    """Display range of one modality: the 0.5 and 99.5 percentiles of its non-zero (brain) voxels."""
    inside = volume[volume != 0]
    if not inside.size:
        return 0.0, 1.0
    lo, hi = np.percentile(inside, [0.5, 99.5])
    return float(lo), float(max(hi, lo + 1e-6))


def slice_rgb(
    gray: np.ndarray,
    limits: tuple[float, float],
    labels: np.ndarray | None = None,
    convention: LabelConvention | None = None,
    opacity: float = 0.45,
    min_size: int = 240,
) -> np.ndarray:
    """uint8 (h, w, 3) picture of one slice: `gray` windowed to `limits`, the label slice blended
    over it in the paper's colours at `opacity`, enlarged by whole pixels to at least `min_size`
    (so small phantoms are not blurred by the browser)."""
    lo, hi = limits
    base = np.clip((gray.astype(np.float32) - lo) / (hi - lo), 0, 1)
    rgb = np.repeat(base[..., None], 3, axis=2)
    if labels is not None and convention is not None:
        classes = _classes(labels, convention)
        colours = np.array([[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for c in COLOURS], np.float32)
        shown = classes > 0
        rgb[shown] = (1 - opacity) * rgb[shown] + opacity * colours[classes[shown] - 1]
    scale = max(1, -(-min_size // max(gray.shape)))
    if scale > 1:
        rgb = rgb.repeat(scale, axis=0).repeat(scale, axis=1)
    return (rgb * 255 + 0.5).astype(np.uint8)
