"""How the trainer scores a model on its fold's held-out cases.

- `validate`, after an epoch: mean loss and Dice per region on whole padded brain crops, counted
  on the device (one transfer per volume) with the metrics module's Dice rule.
- `score_cases`, once at the end: each case predicted whole and written as `predict` writes it
  (`data.preprocess.label_map`: unpad, regions to labels, paste back into the original
  geometry), scored against its segmentation file with the BraTS 2020 metrics, the best and the
  worst case drawn (`viz`).

Both run the model where and in the precision the training's `step.Compute` says. The trainer
imports this module and neither `io` nor `viz`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from brats_lab.data.cases import discover
from brats_lab.data.dataset import WholeVolumes
from brats_lab.data.preprocess import label_map, paste_back
from brats_lab.evaluation.lesionwise import case_scores
from brats_lab.evaluation.metrics import dice_from_counts
from brats_lab.files import atomic_path
from brats_lab.io import read_image, write_image
from brats_lab import run_files, viz  # viz.render_case through the module: a test replaces it
from brats_lab.labels import REGIONS
from brats_lab.training.losses import LossFn
from brats_lab.training.step import Compute


def validate(model: torch.nn.Module, volumes: WholeVolumes, loss_fn: LossFn, compute: Compute) -> dict[str, float]:
    """Mean loss and Dice per region (threshold 0.5) over whole padded brain crops.

    In eval mode the models return the main output only, so this is the main head's loss.
    """
    model.eval()
    losses: list[float] = []
    dice: dict[str, list[float]] = {r: [] for r in REGIONS}
    for item in volumes:  # type: ignore[attr-defined]
        logits = predict_logits(model, item.image, compute)  # (3, Z, Y, X) float32
        target = item.target.to(compute.device)
        pred = logits > 0  # sigmoid > 0.5
        # (4, 3): loss, then overlap, predicted and reference voxels per region; one transfer.
        counts = torch.stack([(pred & target).flatten(1).sum(1), pred.flatten(1).sum(1), target.flatten(1).sum(1)], dim=1)
        losses.append(loss_fn(logits[None], target[None]).item())
        for region, (overlap, n_pred, n_ref) in zip(REGIONS, counts.tolist()):
            dice[region].append(dice_from_counts(overlap, n_pred, n_ref))
    return {"val_loss": float(np.mean(losses)), **{f"val_dice_{r}": float(np.mean(v)) for r, v in dice.items()}}


def score_cases(
    model: torch.nn.Module, volumes: WholeVolumes, dataset: Path, workdir: Path, compute: Compute, *, progress: bool = False,
) -> pd.DataFrame:
    """Predict each case of `volumes` whole, write it to `workdir/predictions/<case>.nii.gz` in its
    original geometry (its entry in `volumes.cache`) and score it against its segmentation file
    in `dataset` with the rules of the data (`lesionwise.case_scores`: one row per case with the
    BraTS 2020 columns dice_ET, ..., hd95_WT, plus the lesion-wise ones on 2023+ labels); draw
    the best and worst cases to `workdir/overlays/`."""
    model.eval()
    cache = volumes.cache
    segs = {c.id: c.seg for c in discover(dataset)}
    rows, predictions = [], {}
    for item in tqdm(volumes, desc="validation", total=len(volumes), disable=not progress, dynamic_ncols=True):
        entry = cache.entry(item.case_id)
        regions = (predict_logits(model, item.image, compute) > 0).cpu().numpy()
        path = workdir / run_files.prediction(item.case_id)
        labels = label_map(regions, item.pads, entry.convention, entry.bbox, entry.geometry.shape)
        write_image(labels, entry.geometry, path)
        reference, _ = read_image(segs[item.case_id])  # type: ignore[arg-type]
        # The rules of the data: the BraTS 2020 columns always, the lesion-wise ones on 2023+ labels.
        rows.append({"case": item.case_id, **case_scores(labels, reference, entry.geometry.spacing_zyx, entry.convention)})
        predictions[item.case_id] = (labels, reference)
    table = pd.DataFrame(rows)
    if len(table):
        order = table[[f"dice_{r}" for r in REGIONS]].mean(axis=1).sort_values()
        for tag, index in (("worst", order.index[0]), ("best", order.index[-1])):
            case_id = table.loc[index, "case"]
            entry = cache.entry(case_id)
            images = paste_back(np.asarray(cache.load(case_id)[0]), entry.bbox, entry.original_shape)
            labels, reference = predictions[case_id]
            dice = ", ".join(f"{r} {table.loc[index, f'dice_{r}']:.2f}" for r in REGIONS)
            with atomic_path(workdir / run_files.overlay(tag, case_id), suffix=".png") as tmp:
                viz.render_case(images, entry.convention, tmp, reference=reference, prediction=labels,
                            title=f"{tag}: {case_id}, Dice {dice}; {{slice}}")
    return table


def predict_logits(model: torch.nn.Module, image: torch.Tensor, compute: Compute) -> torch.Tensor:
    """Logits (3, Z, Y, X) in float32 for one padded volume (4, Z, Y, X), without gradients (all
    that `validate` and `score_cases` compute comes from them, so no graph is ever built)."""
    with torch.no_grad(), compute.autocast():
        logits = model(image[None].to(compute.device))
    return logits[0].float()
