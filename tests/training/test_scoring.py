"""How the trainer scores a model (`training/scoring.py`), without training one: a fixed model whose
logits are shifted intensities (ET and TC from one channel, WT from another) predicts imperfect,
non-empty regions on the phantoms, so every number below is a real Dice between 0 and 1.

The expected values come from elsewhere: the validation Dice from numpy on the thresholded
logits (`logits > 0` is `sigmoid > 0.5`), the loss from the loss function called case by case,
and the final per-case scores from the label maps read back from the written files and the
segmentation files, counted by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from brats_lab.data.cache import prepare
from brats_lab.data.dataset import WholeVolumes
from brats_lab.data.preprocess import paste_back
from brats_lab.training.losses import make_loss
from brats_lab.training.scoring import predict_logits, score_cases, validate
from brats_lab.training.step import Compute
from brats_lab.viz import render_case

CPU = torch.device("cpu")
NCR, ED, ET = 1, 2, 4  # BraTS 2020's labels (the phantoms' layout)
REGIONS = {"ET": (ET,), "TC": (NCR, ET), "WT": (NCR, ED, ET)}


class ShiftedIntensities(torch.nn.Conv3d):
    """Logits (N, 3, Z, Y, X): ET = channel 1 - 0.95, TC = channel 1 - 0.9, WT = channel 3 - 0.7
    (the phantoms' tumour is bright there; the thresholds miss part of it and add some brain:
    Dice from 0.01 to 0.8). A 1x1x1 convolution, so that autocast runs it in lower precision."""

    def __init__(self) -> None:
        super().__init__(4, 3, 1)
        with torch.no_grad():
            self.weight.zero_()
            self.weight[0, 1] = self.weight[1, 1] = self.weight[2, 3] = 1.0
            self.bias.copy_(torch.tensor([-0.95, -0.9, -0.7]))


@pytest.fixture(scope="module")
def data(copy_phantoms, tmp_path_factory: pytest.TempPathFactory):
    """(dataset folder, cache, the whole padded volumes of all four cases)."""
    dataset = copy_phantoms(tmp_path_factory.mktemp("scoring") / "phantom")
    cache = prepare(dataset, "minmax", progress=False)
    return dataset, cache, WholeVolumes(cache, list(cache.case_ids), pad_multiple=16)


def _dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1 when both are empty (the BraTS rule)."""
    total = pred.sum() + ref.sum()
    return 1.0 if total == 0 else 2.0 * (pred & ref).sum() / total


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_validation_is_the_mean_over_cases_of_the_loss_and_of_each_regions_dice(data, amp):
    _, _, volumes = data
    model, loss_fn = ShiftedIntensities(), make_loss("dice", 1.0)
    got = validate(model, volumes, loss_fn, Compute(CPU, amp))

    losses, dice = [], {r: [] for r in REGIONS}
    for item in volumes:
        with torch.no_grad(), torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            logits = ShiftedIntensities()(item.image[None]).float()
        losses.append(float(loss_fn(logits, item.target[None])))
        pred, ref = logits[0].numpy() > 0, item.target.numpy().astype(bool)
        for channel, region in enumerate(REGIONS):
            dice[region].append(_dice(pred[channel], ref[channel]))
    assert len(losses) == 4 and len(set(losses)) == 4  # four cases, four different losses
    assert all(0 < d < 1 for v in dice.values() for d in v), dice  # imperfect, not empty
    assert set(got) == {"val_loss", "val_dice_ET", "val_dice_TC", "val_dice_WT"}
    assert got["val_loss"] == pytest.approx(np.mean(losses), rel=1e-6)
    for region, values in dice.items():
        assert got[f"val_dice_{region}"] == pytest.approx(np.mean(values), rel=1e-9), region
    if amp is not None:  # in the precision asked: bfloat16's rounding moves voxels at the thresholds
        assert got != validate(model, volumes, loss_fn, Compute(CPU, None))


@pytest.mark.parametrize("logit", [0.0, -10.0])
def test_validation_of_a_model_that_predicts_nothing(data, logit, constant_logits):
    """Logits 0 (probability exactly 0.5) or below: no voxel in any region, so Dice 0 where the
    reference has the region (all four phantoms have all three)."""
    _, _, volumes = data
    got = validate(constant_logits((logit,) * 3), volumes, make_loss("dice", 1.0), Compute(CPU, None))
    assert got["val_dice_ET"] == got["val_dice_TC"] == got["val_dice_WT"] == 0.0
    assert 0.5 < got["val_loss"] <= 1.0


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_final_scores_are_those_of_the_label_maps_written_in_each_cases_geometry(data, tmp_path):
    dataset, cache, volumes = data
    table = score_cases(ShiftedIntensities(), volumes, dataset, tmp_path, Compute(CPU, None))

    assert list(table["case"]) == list(cache.case_ids)
    for row in table.itertuples():
        written = tmp_path / "predictions" / f"{row.case}.nii.gz"
        seg = dataset / row.case / f"{row.case}_seg.nii.gz"
        prediction, reference = _read(written), _read(seg)
        assert prediction.dtype == np.uint8 and prediction.shape == reference.shape
        assert set(np.unique(prediction)) <= {0, NCR, ED, ET}
        # The file carries the case's geometry, as `predict` writes it.
        a, b = sitk.ReadImage(str(written)), sitk.ReadImage(str(seg))
        assert a.GetSpacing() == b.GetSpacing() and a.GetOrigin() == b.GetOrigin() and a.GetDirection() == b.GetDirection()
        for region, labels in REGIONS.items():
            expected = _dice(np.isin(prediction, labels), np.isin(reference, labels))
            assert 0 < expected < 1, (row.case, region)
            assert getattr(row, f"dice_{region}") == pytest.approx(expected, abs=1e-12), (row.case, region)
        for metric in ("sensitivity", "specificity", "hd95"):
            assert all(np.isfinite(getattr(row, f"{metric}_{r}")) for r in REGIONS)


def test_final_scores_in_the_precision_asked(data, tmp_path):
    dataset, _, volumes = data
    full = score_cases(ShiftedIntensities(), volumes, dataset, tmp_path / "fp32", Compute(CPU, None))
    bf16 = score_cases(ShiftedIntensities(), volumes, dataset, tmp_path / "bf16", Compute(CPU, torch.bfloat16))
    assert not full.equals(bf16)  # bfloat16's rounding moves voxels at the thresholds


def test_a_logit_of_zero_is_outside_every_region_in_the_written_label_maps(data, tmp_path, constant_logits):
    dataset, _, volumes = data
    table = score_cases(constant_logits((0.0, 0.0, 0.0)), volumes, dataset, tmp_path, Compute(CPU, None))
    for case in table["case"]:
        assert not _read(tmp_path / "predictions" / f"{case}.nii.gz").any(), case
    assert (table[[f"dice_{r}" for r in REGIONS]] == 0).all().all()


def test_the_best_and_the_worst_case_by_mean_dice_are_drawn(data, tmp_path):
    """Each overlay is `viz.render_case` of the case's images, its segmentation and the written
    prediction, titled with its Dice as the table has it: drawn again here, byte for byte."""
    dataset, cache, volumes = data
    table = score_cases(ShiftedIntensities(), volumes, dataset, tmp_path, Compute(CPU, None))
    mean_dice = table.set_index("case")[[f"dice_{r}" for r in REGIONS]].mean(axis=1)
    assert mean_dice.nunique() == len(mean_dice)  # no tie: best and worst are well defined
    drawn = sorted(p.name for p in (tmp_path / "overlays").iterdir())
    assert drawn == sorted([f"best_{mean_dice.idxmax()}.png", f"worst_{mean_dice.idxmin()}.png"])
    for tag, case in (("best", mean_dice.idxmax()), ("worst", mean_dice.idxmin())):
        row = table.set_index("case").loc[case]
        entry = cache.entry(case)
        images = paste_back(np.asarray(cache.load(case)[0]), entry.bbox, entry.original_shape)
        title = f"{tag}: {case}, Dice ET {row.dice_ET:.2f}, TC {row.dice_TC:.2f}, WT {row.dice_WT:.2f}; {{slice}}"
        again = tmp_path / f"again_{tag}.png"
        render_case(images, entry.convention, again, reference=_read(dataset / case / f"{case}_seg.nii.gz"),
                    prediction=_read(tmp_path / "predictions" / f"{case}.nii.gz"), title=title)
        assert (tmp_path / "overlays" / f"{tag}_{case}.png").read_bytes() == again.read_bytes(), tag


def test_no_case_no_table_and_no_drawing(data, tmp_path):
    dataset, cache, _ = data
    table = score_cases(ShiftedIntensities(), WholeVolumes(cache, []), dataset, tmp_path, Compute(CPU, None))
    assert isinstance(table, pd.DataFrame) and len(table) == 0
    assert not (tmp_path / "overlays").exists()


def test_logits_are_float32_from_the_precision_asked():
    """Without AMP the logits are the model's own, bit for bit, with no graph; with autocast the
    convolution runs in bfloat16 or float16 (differences of their rounding, ~1e-2) and comes back
    as float32."""
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(4, 3, 1)
    image = torch.rand(4, 6, 6, 6)
    with torch.no_grad():
        exact = conv(image[None])[0]
    full = predict_logits(conv, image, Compute(CPU, None))
    assert full.shape == (3, 6, 6, 6) and full.dtype == torch.float32 and not full.requires_grad
    assert torch.equal(full, exact)
    reduced = {dtype: predict_logits(conv, image, Compute(CPU, dtype)) for dtype in (torch.bfloat16, torch.float16)}
    for dtype, logits in reduced.items():
        assert logits.dtype == torch.float32, dtype
        assert 0 < (logits - exact).abs().max().item() < 0.05, dtype
    # Each in the precision asked, not autocast's default for the device (bfloat16 on the CPU).
    assert not torch.equal(reduced[torch.bfloat16], reduced[torch.float16])
