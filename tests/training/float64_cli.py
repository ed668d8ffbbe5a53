"""`brats-lab` in float64, with an optional fault in the gradient sharing: the program that
tests/training/test_ddp.py runs (directly, or as each torchrun worker).

Why float64: the one- and two-process trainings add the same numbers in another order. In float32
the rounding differences (1e-7 relative) grow through a short training at a high learning rate
to 1e-3 in a loss, by an amount that depends on the CPU's kernels (which order, which vector
width), so no float32 tolerance holds on every machine. In float64 the same reordering starts at
1e-16 and stays many orders of magnitude below the tolerances, while a wrong sharing of the
gradients changes the training at the level of its own effect, whatever the CPU.

The trainer runs unchanged: the weights and optimizer moments are float64 by the default dtype,
every module casts its float inputs to float64 (a global forward pre-hook), and `Tensor.float()`
leaves float64 tensors as they are (the loss casts its logits "to at least float32").

`BRATS_LAB_TEST_VAL_LOSSES` ("0.9,0.5,0.7"): the validation losses the trainer sees, one per
validation in order, in place of the ones it computes (its Dice scores stay real). A test that
needs "the best epoch is not the last" sets it so by construction: computed losses depend on the
CPU's arithmetic (which kernels, which vector width) and so would which epoch is the best.

`BRATS_LAB_TEST_FAULT` breaks the sharing on purpose, to show the test notices:
- `not_shared`: DDP's gradients are not all-reduced; each process steps on its own share.
- `summed`: DDP's gradients are summed over the processes instead of averaged.
- `dice_not_shared`: the Dice sums are not added over the processes; each process's loss is the
  Dice of its own share of the batch (what plain DDP would do).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

torch.set_default_dtype(torch.float64)


def _float64_inputs(module: torch.nn.Module, args: tuple) -> tuple:
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


torch.nn.modules.module.register_module_forward_pre_hook(_float64_inputs)
_float = torch.Tensor.float


def _at_least_float32(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return self if self.dtype == torch.float64 else _float(self, *args, **kwargs)


torch.Tensor.float = _at_least_float32  # type: ignore[method-assign]

FAULT = os.environ.get("BRATS_LAB_TEST_FAULT", "")


def _not_shared(state, bucket):
    done = torch.futures.Future()
    done.set_result(bucket.buffer())
    return done


def _summed(state, bucket):
    return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])


if FAULT in ("not_shared", "summed"):
    _init = DistributedDataParallel.__init__

    def _init_with_fault(self, *args, **kwargs) -> None:
        _init(self, *args, **kwargs)
        self.register_comm_hook(None, _not_shared if FAULT == "not_shared" else _summed)

    DistributedDataParallel.__init__ = _init_with_fault  # type: ignore[method-assign]
elif FAULT == "dice_not_shared":
    dist.all_reduce = lambda tensor, *args, **kwargs: None  # the loss's sums stay this process's
elif FAULT:
    raise SystemExit(f"unknown BRATS_LAB_TEST_FAULT={FAULT!r}")

VAL_LOSSES = [float(x) for x in os.environ.get("BRATS_LAB_TEST_VAL_LOSSES", "").split(",") if x]
if VAL_LOSSES:
    from brats_lab.training import trainer

    _validate = trainer.validate

    def _validate_with_set_losses(*args, **kwargs) -> dict[str, float]:
        if not VAL_LOSSES:
            raise SystemExit("BRATS_LAB_TEST_VAL_LOSSES has fewer losses than the training validates")
        return {**_validate(*args, **kwargs), "val_loss": VAL_LOSSES.pop(0)}

    trainer.validate = _validate_with_set_losses

if __name__ == "__main__":
    from brats_lab.cli import main

    sys.exit(main())
