"""The training step, shared by the trainer and `benchmarks/bench_train.py` (which must measure
exactly what trains). Needs only torch: the benchmark runs where the data stack is not installed.

`Compute` says where a model runs and in what precision (the trainer's steps, validation and
final scoring share it); `Step` holds what every step of a training calls, fixed for the whole
training; `train_step` takes one batch through it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from brats_lab.training.losses import LossFn, Weighting, output_loss


@dataclass(frozen=True)
class Compute:
    """Where a model runs (`device`) and the dtype of its autocast regions (`amp_dtype`, as
    `precision.autocast_dtype` picks it; None: float32 throughout, no autocast)."""

    device: torch.device
    amp_dtype: torch.dtype | None = None

    def autocast(self) -> torch.autocast:
        """The autocast context of `amp_dtype` on `device`; disabled for None."""
        return torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None)


@dataclass(frozen=True)
class Step:
    """What every training step calls, fixed for the whole training: `forward` (the model, or its
    DDP or compiled wrapper), the loss and its deep-supervision weighting
    (`train.deep_supervision_weighting`), where and in what precision it runs, and whether a batch
    goes to the network channels-last (`train.channels_last`, as the model's weights)."""

    forward: Callable[[torch.Tensor], Any]
    loss_fn: LossFn
    weighting: Weighting
    compute: Compute
    channels_last: bool = False


def train_step(step: Step, image: torch.Tensor, target: torch.Tensor, optimizer: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler) -> torch.Tensor:
    """One optimizer step on a batch: the batch onto the device, forward under autocast, the
    (deep-supervision) loss in float32, backward with loss scaling (a no-op unless fp16), step.
    Returns the loss, still on the device."""
    image = image.to(step.compute.device, non_blocking=True)  # (B, 4, P, P, P)
    target = target.to(step.compute.device, non_blocking=True)  # (B, 3, P, P, P) bool
    if step.channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    with step.compute.autocast():
        output = step.forward(image)
    loss = output_loss(output, target, step.loss_fn, step.weighting)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss
