"""How fast are our BraTS metrics, next to medpy, MONAI and DeepMind's surface-distance?

One full-size case (240 x 240 x 155, 1 mm): a reference label map and a prediction that is a
smoothly perturbed copy of it, with a small false positive far from the tumour, as networks make.
Each library computes Dice, sensitivity, specificity and HD95 for ET, TC and WT, several times in
this process; the table gives the best and median seconds and the ratio other / ours (best
against best, ours = `ours (label maps)`). Two more rows time MONAI's HausdorffDistanceMetric and
surface-distance's HD95 alone, against our four metrics: the strictest comparison.

The others get a head start: their boolean region masks (and torch tensors for MONAI) are made
before the clock starts, while `ours (label maps)` starts from the two label maps, as
`brats-lab evaluate` does. `ours (masks)` times `region_metrics` on the same masks as the others.

Our values must equal the oracle (medpy plus the BraTS rules for empty masks); the others' values
are printed for reference: MONAI and surface-distance take the larger of the two directed 95th
percentiles, so their HD95 is larger by definition, not by error.

    .venv/bin/python benchmarks/bench_metrics.py                  # phantom case if available
    .venv/bin/python benchmarks/bench_metrics.py --source blobs   # no dependency on the phantom
    .venv/bin/python benchmarks/bench_metrics.py --lesion-wise    # lesion-wise vs brats-evaluation

`--lesion-wise` times `lesion_metrics(..., "gli")` against the organisers' package
`brats-evaluation` 0.0.10 (`panoptica`'s evaluator with its bundled `gli` config) on one
full-size 2023-layout case with several lesions per region (a phantom with satellite lesions, or
blobs with satellites), both starting from the two label maps in memory, and checks that every
value is identical. Two ratios: against the package as shipped (all six groups of its config)
and against it restricted to ET, TC and WT (`skip_groups`), the strict comparison.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
from scipy import ndimage

from brats_lab.evaluation.metrics import METRICS, RegionMetrics, case_metrics, empty_hd95, region_metrics
from brats_lab.labels import BRATS_2020, REGIONS

SHAPE_ZYX = (155, 240, 240)
SPACING_ZYX = (1.0, 1.0, 1.0)
Values = dict[str, tuple[float, float, float, float]]  # region -> dice, sensitivity, specificity, hd95


def phantom_reference(seed: int) -> np.ndarray:
    """The segmentation of one full-size phantom case (brats_lab.data.phantom)."""
    from brats_lab.data.phantom import synthesize
    from brats_lab.io import read_image

    with tempfile.TemporaryDirectory() as tmp:
        folder = synthesize(Path(tmp), cases=1, seed=seed, progress=False)[0]
        seg, _ = read_image(folder / f"{folder.name}_seg.nii.gz")
    return seg


def blob_reference(seed: int) -> np.ndarray:
    """Nested random blobs of brain-tumour size: about 100k voxels of whole tumour."""
    rng = np.random.default_rng(seed)
    half = 48
    z, y, x = np.indices((2 * half,) * 3, dtype=np.float32) - half
    noise = ndimage.gaussian_filter(rng.normal(size=z.shape).astype(np.float32), 6)
    r = np.sqrt(z**2 + (y / 1.15) ** 2 + (x / 0.9) ** 2) * (1 + 0.15 * noise / noise.std())
    seg = np.zeros(SHAPE_ZYX, np.uint8)
    box = seg[70 - half : 70 + half, 110 - half : 110 + half, 140 - half : 140 + half]
    box[r < 27] = 2
    box[r < 16] = 4
    box[r < 11] = 1
    return seg


def perturb(ref: np.ndarray, seed: int) -> np.ndarray:
    """A plausible prediction: each region's boundary moved by a smooth random field of about
    +-2 voxels, regions nested again, plus a small false positive far from the tumour."""
    rng = np.random.default_rng(seed + 1000)
    tumour = np.argwhere(ref > 0)
    lo = np.maximum(tumour.min(0) - 8, 0)
    hi = np.minimum(tumour.max(0) + 9, ref.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    crop = ref[box]
    regions = []
    for region in REGIONS:
        mask = np.isin(crop, BRATS_2020.regions[region])
        signed = ndimage.distance_transform_edt(~mask) - ndimage.distance_transform_edt(mask)
        field = ndimage.gaussian_filter(rng.normal(size=crop.shape), 4)
        regions.append(signed < 2.0 * field / field.std())
    regions = np.stack(regions)
    regions[1] |= regions[0]  # TC holds ET
    regions[2] |= regions[1]  # WT holds TC
    pred = np.zeros_like(ref)
    pred[box] = BRATS_2020.from_regions(regions)
    # A false positive blob of edema in the other hemisphere, as networks make.
    centre = np.array(ref.shape) // 2
    far = np.where(tumour.mean(0) < centre, np.array(ref.shape) * 3 // 4, np.array(ref.shape) // 4)
    pred[far[0] : far[0] + 4, far[1] : far[1] + 5, far[2] : far[2] + 4] = BRATS_2020.paint[0][1]
    return pred


def oracle(pred: np.ndarray, ref: np.ndarray) -> RegionMetrics:
    """medpy's metrics, with the BraTS rules where a mask is empty."""
    from medpy.metric import binary

    if not pred.any() and not ref.any():
        return RegionMetrics(1.0, 1.0, 1.0, 0.0)
    return RegionMetrics(
        dice=float(binary.dc(pred, ref)),
        sensitivity=float(binary.sensitivity(pred, ref)) if ref.any() else 1.0,
        specificity=float(binary.specificity(pred, ref)) if not ref.all() else 1.0,
        hd95=float(binary.hd95(pred, ref, voxelspacing=SPACING_ZYX)) if pred.any() and ref.any() else empty_hd95(pred.shape, SPACING_ZYX),
    )


def run_medpy(masks: dict[str, tuple[np.ndarray, np.ndarray]]) -> Values:
    return {r: tuple(oracle(p, g).as_dict().values()) for r, (p, g) in masks.items()}  # type: ignore[misc]


def make_monai(masks: dict[str, tuple[np.ndarray, np.ndarray]]) -> Callable[[], Values]:
    import torch
    from monai.metrics import (
        compute_confusion_matrix_metric,
        compute_dice,
        compute_hausdorff_distance,
        get_confusion_matrix,
    )

    # One-hot float tensors (batch 1, channel per region, z, y, x), as MONAI expects them (its
    # confusion matrix computes 1 - y, meaningless on bool), made before the clock starts.
    pred = torch.from_numpy(np.stack([masks[r][0] for r in REGIONS]))[None].float()
    ref = torch.from_numpy(np.stack([masks[r][1] for r in REGIONS]))[None].float()

    def run() -> Values:
        dice = compute_dice(pred, ref, include_background=True)[0]
        confusion = get_confusion_matrix(pred, ref, include_background=True)
        sens = compute_confusion_matrix_metric("sensitivity", confusion)[0]
        spec = compute_confusion_matrix_metric("specificity", confusion)[0]
        hd95 = compute_hausdorff_distance(pred, ref, include_background=True, percentile=95, spacing=SPACING_ZYX)[0]
        return {r: (float(dice[i]), float(sens[i]), float(spec[i]), float(hd95[i])) for i, r in enumerate(REGIONS)}

    return run


def make_monai_hd95(masks: dict[str, tuple[np.ndarray, np.ndarray]]) -> Callable[[], Values]:
    """MONAI's HausdorffDistanceMetric(percentile=95) alone; the other metrics are left at 0."""
    import torch
    from monai.metrics import HausdorffDistanceMetric

    pred = torch.from_numpy(np.stack([masks[r][0] for r in REGIONS]))[None].float()
    ref = torch.from_numpy(np.stack([masks[r][1] for r in REGIONS]))[None].float()
    metric = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")

    def run() -> Values:
        metric.reset()
        metric(pred, ref, spacing=SPACING_ZYX)
        hd95 = metric.aggregate()[0]
        return {r: (0.0, 0.0, 0.0, float(hd95[i])) for i, r in enumerate(REGIONS)}

    return run


def run_surface_distance_hd95(masks: dict[str, tuple[np.ndarray, np.ndarray]]) -> Values:
    """surface-distance's HD95 alone; the other metrics are left at 0."""
    import surface_distance as sd

    return {
        region: (0.0, 0.0, 0.0, float(sd.compute_robust_hausdorff(sd.compute_surface_distances(ref, pred, SPACING_ZYX), 95)))
        for region, (pred, ref) in masks.items()
    }


def run_surface_distance(masks: dict[str, tuple[np.ndarray, np.ndarray]]) -> Values:
    import surface_distance as sd

    out = {}
    for region, (pred, ref) in masks.items():
        distances = sd.compute_surface_distances(ref, pred, SPACING_ZYX)
        hd95 = sd.compute_robust_hausdorff(distances, 95)
        dice = sd.compute_dice_coefficient(ref, pred)
        # surface-distance has no sensitivity or specificity: count them the cheap way.
        tp = np.count_nonzero(pred & ref)
        fp = np.count_nonzero(pred) - tp
        fn = np.count_nonzero(ref) - tp
        tn = pred.size - tp - fp - fn
        out[region] = (float(dice), tp / (tp + fn), tn / (tn + fp), float(hd95))
    return out


def timed(fn: Callable[[], Values], repeats: int) -> tuple[list[float], Values]:
    times, values = [], {}
    for _ in range(repeats):
        start = time.perf_counter()
        values = fn()
        times.append(time.perf_counter() - start)
    return times, values


def lesion_case(source: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A full-size 2023-labelled (1 NETC, 2 SNFH, 3 ET) reference with several lesions per region,
    and a prediction that moves every boundary, cuts the main tumour in two with a 2-voxel slab
    (a lesion split by the prediction) and adds a false positive (see `perturb`)."""
    from brats_lab.labels import BRATS_2023

    if source == "phantom":
        from brats_lab.data.phantom import synthesize
        from brats_lab.io import read_image

        with tempfile.TemporaryDirectory() as tmp:
            folder = synthesize(Path(tmp), cases=1, seed=seed, progress=False, layout="brats2023")[0]
            ref23, _ = read_image(folder / f"{folder.name}-seg.nii.gz")
    else:
        ref20 = blob_reference(seed)
        for z, y, x, r in ((30, 60, 60, 5), (120, 180, 70, 7), (60, 40, 180, 4)):  # satellites
            zz, yy, xx = np.ogrid[: SHAPE_ZYX[0], : SHAPE_ZYX[1], : SHAPE_ZYX[2]]
            d = np.sqrt((zz - z) ** 2 + (yy - y) ** 2 + (xx - x) ** 2)
            ref20[d <= r + 3] = 2
            ref20[d <= r] = 4
            ref20[d <= r - 2] = 1
        ref23 = BRATS_2023.from_regions(BRATS_2020.to_regions(ref20))
    ref20 = BRATS_2020.from_regions(BRATS_2023.to_regions(ref23))
    pred = BRATS_2023.from_regions(BRATS_2020.to_regions(perturb(ref20, seed)))
    # Cut the main tumour with a slab through its centre: a lesion split in two by the prediction.
    centre = np.argwhere(ref23 == 3).mean(axis=0).astype(int) if (ref23 == 3).any() else np.array(SHAPE_ZYX) // 2
    pred[centre[0] : centre[0] + 2] = 0
    return pred, ref23


def lesion_wise(args: argparse.Namespace) -> int:
    from brats_evaluation import config_path
    from panoptica import Panoptica_Evaluator

    from brats_lab.evaluation.lesionwise import LESION_METRICS, lesion_metrics

    source = args.source or "phantom"
    pred, ref = lesion_case(source, args.seed)
    evaluator = Panoptica_Evaluator.load_from_config(config_path("gli"))

    def ours() -> dict:
        return {r: m.as_dict() for r, m in lesion_metrics(pred, ref, SPACING_ZYX, "gli").items()}

    def official(skip: list[str] | None) -> Callable[[], dict]:
        def run() -> dict:
            results = evaluator.evaluate(pred, ref, voxelspacing=SPACING_ZYX, verbose=False, skip_groups=skip)
            out = {}
            for region in REGIONS:
                r = results[region.lower()]
                values = dict(lesion_dice=r.pq_dsc, lesion_hd95=r.sq_hd95, volume_dice=r.global_bin_dsc,
                              volume_hd95=r.global_bin_hd95, lesion_tp=r.tp, lesion_fp=r.fp, lesion_fn=r.fn)
                # 373 for inf, as the package's result parser writes it (see evaluation/lesionwise.py).
                out[region] = {k: 373.0 if np.isinf(v) else v for k, v in values.items()}
            return out
        return run

    print(f"case: {source} seed {args.seed}, 2023 labels, shape (z, y, x) {ref.shape}, spacing {SPACING_ZYX} mm")
    from scipy import ndimage

    from brats_lab.labels import BRATS_2023

    for region in REGIONS:
        lesions = [ndimage.label(np.isin(a, BRATS_2023.regions[region]), np.ones((3, 3, 3)))[1] for a in (ref, pred)]
        print(f"  {region}: {lesions[0]} reference lesions, {lesions[1]} predicted")
    runs = {
        "ours (gli rules)": timed(ours, args.repeats_ours),
        "brats-evaluation, gli as shipped (6 groups)": timed(official(None), args.repeats),
        "brats-evaluation, ET/TC/WT only": timed(official(["netc", "snfh", "rc"]), args.repeats),
    }
    expected = runs["brats-evaluation, ET/TC/WT only"][1]
    same = all(
        runs[name][1][r][m] == expected[r][m] or (np.isnan(runs[name][1][r][m]) and np.isnan(expected[r][m]))
        for name in runs for r in REGIONS for m in LESION_METRICS
    )
    print(f"\nvalues ({', '.join(LESION_METRICS)}):")
    for region in REGIONS:
        print(f"  ours      {region}  " + "  ".join(f"{v:10.6g}" for v in runs["ours (gli rules)"][1][region].values()))
        print(f"  official  {region}  " + "  ".join(f"{v:10.6g}" for v in expected[region].values()))
    print(f"ours vs brats-evaluation: {'identical' if same else 'DIFFERENT'}")
    best_ours = min(runs["ours (gli rules)"][0])
    print(f"\n{'run':44s} {'best s':>9s} {'median s':>9s} {'runs':>5s} {'best / ours':>12s}")
    for name, (times, _) in runs.items():
        best = min(times)
        print(f"{name:44s} {best:9.4f} {statistics.median(times):9.4f} {len(times):5d} {best / best_ours:11.1f}x")
    return 0 if same else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", choices=("phantom", "blobs"), default=None, help="default: phantom if available")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each other library (default 3)")
    parser.add_argument("--repeats-ours", type=int, default=20)
    parser.add_argument("--lesion-wise", action="store_true", help="lesion-wise metrics against brats-evaluation instead")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # MONAI warns about its own internals
    if args.lesion_wise:
        warnings.filterwarnings("ignore")  # panoptica's citation banner and NSD threshold warnings
        return lesion_wise(args)

    source = args.source
    if source is None:
        try:
            import brats_lab.data.phantom  # noqa: F401

            source = "phantom"
        except ImportError:
            source = "blobs"
    ref = phantom_reference(args.seed) if source == "phantom" else blob_reference(args.seed)
    pred = perturb(ref, args.seed)
    masks = {r: (np.isin(pred, BRATS_2020.regions[r]), np.isin(ref, BRATS_2020.regions[r])) for r in REGIONS}

    import torch

    print(f"case: {source} seed {args.seed}, shape (z, y, x) {ref.shape}, spacing {SPACING_ZYX} mm")
    print("voxels (reference / prediction): " + ", ".join(
        f"{r} {int(masks[r][1].sum())} / {int(masks[r][0].sum())}" for r in REGIONS
    ))
    print(f"cpu cores: {os.cpu_count()}, torch threads: {torch.get_num_threads()}, python {sys.version.split()[0]}")

    def ours_labels() -> Values:
        return {r: tuple(m.as_dict().values()) for r, m in case_metrics(pred, ref, SPACING_ZYX, BRATS_2020).items()}  # type: ignore[misc]

    def ours_masks() -> Values:
        return {r: tuple(region_metrics(p, g, SPACING_ZYX).as_dict().values()) for r, (p, g) in masks.items()}  # type: ignore[misc]

    runs = {
        "ours (label maps)": timed(ours_labels, args.repeats_ours),
        "ours (masks)": timed(ours_masks, args.repeats_ours),
        "medpy 0.5.2": timed(lambda: run_medpy(masks), args.repeats),
        "MONAI": timed(make_monai(masks), args.repeats),
        "surface-distance": timed(lambda: run_surface_distance(masks), args.repeats),
        # The strictest comparison: their HD95 alone against our four metrics.
        "MONAI, HD95 only": timed(make_monai_hd95(masks), args.repeats),
        "surface-distance, HD95 only": timed(lambda: run_surface_distance_hd95(masks), args.repeats),
    }

    expected = runs["medpy 0.5.2"][1]
    worst = 0.0
    for name in ("ours (label maps)", "ours (masks)"):
        for region in REGIONS:
            worst = max(worst, *(abs(a - b) for a, b in zip(runs[name][1][region], expected[region])))
    identical = worst <= 1e-6

    print(f"\nvalues ({', '.join(METRICS)}):")
    for name, (_, values) in runs.items():
        if "only" in name:
            continue
        for region in REGIONS:
            print(f"  {name:18s} {region}  " + "  ".join(f"{v:10.6f}" for v in values[region]))
    print(f"ours vs oracle (medpy + empty rules): max |difference| = {worst:.3g} -> {'identical' if identical else 'DIFFERENT'}")

    best_ours = min(runs["ours (label maps)"][0])
    print(f"\n{'library':28s} {'best s':>9s} {'median s':>9s} {'runs':>5s} {'best / ours':>12s}")
    for name, (times, _) in runs.items():
        best = min(times)
        print(f"{name:28s} {best:9.4f} {statistics.median(times):9.4f} {len(times):5d} {best / best_ours:11.1f}x")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
