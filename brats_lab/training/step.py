"""The training step, shared by the trainer and `benchmarks/bench_train.py` (which must measure
exactly what trains). Needs only torch: the benchmark runs where the data stack is not installed."""

from __future__ import annotations

import torch

from brats_lab.training.losses import output_loss


def train_step(forward, image, target, optimizer, scaler, loss_fn, weighting: str, amp_dtype) -> torch.Tensor:
    """One optimizer step on a batch: forward under autocast, the (deep-supervision) loss in
    float32, backward with loss scaling (a no-op unless fp16), step. Returns the loss."""
    with torch.autocast(image.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        output = forward(image)
    loss = output_loss(output, target, loss_fn, weighting)  # type: ignore[arg-type]
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss
