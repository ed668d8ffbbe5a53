"""Dice losses of pipelines A and B, and deep supervision."""

from __future__ import annotations

import math

import pytest
import torch

from brats_lab.training.losses import deep_supervision_loss, dice_loss, make_loss, output_loss

# Logits 0 everywhere (p = 0.5); per channel the targets below give hand-computable sums.
TARGET = torch.tensor([[[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]]])  # (B=1, C=3, 2 voxels)
# Per channel, 1 - D with eps = 1:
#   A, (2 Σpt + 1) / (Σp² + Σt² + 1):  ET (1+1)/(0.5+1+1) = 0.8,  TC 1/1.5,  WT 3/3.5
#   B, (2 Σpt + 1) / (Σp  + Σt  + 1):  ET 2/3,  TC 1/2,  WT 3/4
EXPECTED_A = (0.2 + 1 / 3 + 1 / 7) / 3
EXPECTED_B = (1 / 3 + 0.5 + 0.25) / 3


@pytest.mark.parametrize("squared, expected", [(True, EXPECTED_A), (False, EXPECTED_B)])
def test_hand_computed_values(squared: bool, expected: float) -> None:
    loss = dice_loss(torch.zeros_like(TARGET), TARGET, squared_denominator=squared, eps=1.0)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert loss.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("squared", [True, False])
def test_sums_run_jointly_over_the_batch(squared: bool) -> None:
    # The same 2 voxels per channel as 2 cases of 1 voxel: a per-case Dice would differ.
    split = TARGET.permute(2, 1, 0)  # (B=2, C=3, 1)
    joint = dice_loss(torch.zeros_like(TARGET), TARGET, squared)
    batched = dice_loss(torch.zeros_like(split), split, squared)
    assert batched.item() == pytest.approx(joint.item(), abs=1e-7)


@pytest.mark.parametrize("squared", [True, False])
def test_perfect_prediction_is_zero(squared: bool) -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 3, 8, 8, 8, generator=g) > 0.7
    target[:, 1] = False  # an empty channel: eps makes it a perfect score, not 0/0
    logits = torch.where(target, 30.0, -30.0)
    assert dice_loss(logits, target, squared).item() == pytest.approx(0.0, abs=1e-6)
    assert dice_loss(-logits, target, squared).item() > 0.6


@pytest.mark.parametrize("squared", [True, False])
def test_gradient_is_finite(squared: bool) -> None:
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 3, 4, 4, 4, generator=g) * 10).requires_grad_()
    target = torch.zeros(2, 3, 4, 4, 4)  # empty target: the hardest case for a Dice
    dice_loss(logits, target, squared).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_bf16_input_is_summed_in_float32() -> None:
    # 64^3 voxels: summed in bf16 (8 bits of mantissa) the result would be off by percents.
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 3, 64, 64, 64, generator=g).to(torch.bfloat16)
    target = torch.rand(1, 3, 64, 64, 64, generator=g) > 0.5
    reference = dice_loss(logits.double(), target, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dice_loss(logits, target, True)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="same shape"):
        dice_loss(torch.zeros(1, 3, 4), torch.zeros(1, 3, 5), True)


def test_make_loss_picks_the_form() -> None:
    zeros = torch.zeros_like(TARGET)
    assert make_loss("dice_squared")(zeros, TARGET).item() == pytest.approx(EXPECTED_A, abs=1e-6)
    assert make_loss("dice")(zeros, TARGET).item() == pytest.approx(EXPECTED_B, abs=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        make_loss("focal")  # type: ignore[arg-type]


def test_deep_supervision_sum_and_mean() -> None:
    fn = make_loss("dice_squared")
    g = torch.Generator().manual_seed(3)
    target = torch.rand(1, 3, 4, 4, 4, generator=g) > 0.5
    main = torch.randn(1, 3, 4, 4, 4, generator=g)
    aux = [torch.randn(1, 3, 4, 4, 4, generator=g) for _ in range(4)]
    parts = [fn(main, target).item()] + [fn(a, target).item() for a in aux]
    summed = deep_supervision_loss(main, aux, target, fn)  # the paper's default
    assert summed.item() == pytest.approx(sum(parts), rel=1e-6)
    mean = deep_supervision_loss(main, aux, target, fn, weighting="mean")
    assert mean.item() == pytest.approx(sum(parts) / 5, rel=1e-6)
    assert output_loss((main, aux), target, fn).item() == pytest.approx(summed.item())
    assert output_loss(main, target, fn).item() == pytest.approx(parts[0])
    with pytest.raises(ValueError, match="weighting"):
        deep_supervision_loss(main, aux, target, fn, weighting="max")  # type: ignore[arg-type]


def test_on_a_tiny_model_output() -> None:
    from brats_lab.config import ModelConfig
    from brats_lab.models import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="equiunet_tiny")).train()
    x = torch.randn(1, 4, 16, 16, 16)
    target = torch.rand(1, 3, 16, 16, 16) > 0.5
    loss = output_loss(model(x), target, make_loss("dice_squared"))
    loss.backward()
    assert math.isfinite(loss.item()) and 0 < loss.item() < 5  # a sum of 5 losses in [0, 1]
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
