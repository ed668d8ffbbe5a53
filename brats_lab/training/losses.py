"""The Dice losses of pipelines A and B, and how deep supervision combines them (paper section 2.3).

Both losses take **logits** (what every model returns, see `brats_lab.models`) and apply the sigmoid
themselves, in float32 with autocast switched off: under fp16/bf16 autocast a sum over 2 million
voxels of a 128^3 patch overflows fp16 and loses most of its digits in bf16.

Per region channel c (ET, TC, WT), with p = sigmoid(logits) and t the binary target, the sums
running jointly over the batch and all voxels ("batch-wise and channel-wise")::

    A (squared denominator):  D_c = (2 Σ p t + eps) / (Σ p² + Σ t² + eps)
    B (plain denominator):    D_c = (2 Σ p t + eps) / (Σ p  + Σ t  + eps)

    loss = mean over c of (1 - D_c)

The paper's equation (2) prints the numerator without the factor 2; with it a perfect prediction
scores D = 1 (without it, about 1/2), and the authors' code has it. eps (1 in both pipelines)
smooths numerator and denominator alike, so a channel that is empty in target and prediction
scores D = 1, not 0/0.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import torch

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Weighting = Literal["sum", "mean"]


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    squared_denominator: bool,
    eps: float = 1.0,
    batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Batch- and channel-wise soft Dice loss, a scalar float32 tensor in [0, 1].

    `logits` (B, C, *spatial), any float dtype; `target` the same shape, bool or float in {0, 1}.
    `squared_denominator=True` is pipeline A's form (Σp² + Σt²), False pipeline B's (Σp + Σt).
    The result is the mean over the C channels of 1 - D_c (module docstring). `batch_sum`, if
    given, turns the sums over this batch into the sums over the whole batch, of which this one is
    a share (`brats_lab.training.distributed.global_sum`: the batch is split over processes).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
    if logits.ndim < 3:
        raise ValueError(f"expected (B, C, *spatial), got shape {tuple(logits.shape)}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    # Autocast off and float32 explicitly: the sums must not run in fp16/bf16 (module docstring).
    with torch.autocast(device_type=logits.device.type, enabled=False):
        p = torch.sigmoid(logits.float())
        t = target.float()
        dims = (0, *range(2, p.ndim))  # batch and voxels, jointly: one Dice per channel
        intersection = (p * t).sum(dims)
        if squared_denominator:
            denominator = (p * p).sum(dims) + (t * t).sum(dims)
        else:
            denominator = p.sum(dims) + t.sum(dims)
        if batch_sum is not None:
            intersection, denominator = batch_sum(torch.stack([intersection, denominator]))
        dice = (2.0 * intersection + eps) / (denominator + eps)  # (C,)
        return (1.0 - dice).mean()


def make_loss(
    loss: Literal["dice_squared", "dice"], eps: float = 1.0, batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> LossFn:
    """The loss of `TrainConfig.loss` ("dice_squared": pipeline A, "dice": pipeline B) as
    `fn(logits, target) -> scalar`; `batch_sum` as in `dice_loss`."""
    if loss not in ("dice_squared", "dice"):
        raise ValueError(f"unknown loss {loss!r}; expected 'dice_squared' (pipeline A) or 'dice' (pipeline B)")
    squared = loss == "dice_squared"

    def fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_loss(logits, target, squared_denominator=squared, eps=eps, batch_sum=batch_sum)

    fn.__name__ = loss
    return fn


def deep_supervision_loss(
    main: torch.Tensor,
    aux_list: Sequence[torch.Tensor],
    target: torch.Tensor,
    loss_fn: LossFn,
    weighting: Weighting = "sum",
) -> torch.Tensor:
    """Loss of the main output plus the auxiliary (deep-supervision) outputs, all against the same
    full-resolution target (the models upsample their auxiliary heads to the input size).

    "sum": the paper's unweighted sum, loss(main) + Σ loss(aux). "mean": the authors' code, the same
    divided by 1 + len(aux_list) (equal weights, e.g. 1/5 with four heads). The two differ only by
    that constant factor, i.e. an effective learning-rate scale for plain SGD (for Adam-type
    optimizers, almost none: their steps are invariant to a gradient scale up to eps).
    """
    if weighting not in ("sum", "mean"):
        raise ValueError(f"weighting must be 'sum' (the paper) or 'mean' (the authors' code), got {weighting!r}")
    total = loss_fn(main, target)
    for aux in aux_list:
        total = total + loss_fn(aux, target)
    if weighting == "mean":
        total = total / (1 + len(aux_list))
    return total


def output_loss(
    output: torch.Tensor | tuple[torch.Tensor, Sequence[torch.Tensor]],
    target: torch.Tensor,
    loss_fn: LossFn,
    weighting: Weighting = "sum",
) -> torch.Tensor:
    """The loss of whatever a model's forward returned: a logits tensor, or `(logits, [aux, ...])`
    (deep supervision in training mode), combined with `deep_supervision_loss`."""
    if isinstance(output, torch.Tensor):
        return loss_fn(output, target)
    main, aux = output
    return deep_supervision_loss(main, aux, target, loss_fn, weighting)
