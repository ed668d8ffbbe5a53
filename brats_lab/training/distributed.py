"""One fold on several processes (PyTorch DDP), launched by `torchrun`; one process per GPU.

    torchrun --nproc_per_node 2 -m brats_lab.cli train --pipeline A --fold 0

`torchrun` sets WORLD_SIZE, RANK and LOCAL_RANK; `process_group()` reads them and joins the group
(NCCL on CUDA, gloo on CPU). Without them, or with one process, nothing changes.

The training is the one-process training, split, not a different one:
- The global batch stays `train.batch_size`: each global batch of the one-process order
  (`EpochSampler`, seeded per epoch) is cut into one contiguous share per process
  (`RankBatches`). The patches and their augmentations are drawn per sample index from
  (seed, epoch, index), so every sample is the same whichever process draws it.
- The Dice losses sum over the batch before dividing (one Dice per channel for the whole batch),
  so a per-process loss would not be the batch's. `global_sum` adds the per-process sums over all
  processes, with gradients, before the ratio: every process gets the loss of the global batch,
  and after DDP's gradient average the gradients are those of one process.
- GroupNorm and InstanceNorm normalise each sample on its own: there are no batch statistics to
  synchronise. Dropout (off unless set) draws its masks from each process's own generator, so
  with dropout the processes do not reproduce one process's masks.

Only rank 0 talks to MLflow, validates, writes checkpoints and shows progress; the others train
(and read the data cache, which the cache's file lock lets one process build at a time).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Mapping

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from brats_lab import DataError

if TYPE_CHECKING:
    import pandas as pd

# Rank 0 validates and writes checkpoints while the others wait in their next collective; the
# default timeout (10 min for NCCL) can be shorter than a validation of a full fold.
TIMEOUT = timedelta(hours=1)


@contextmanager
def process_group() -> Iterator[None]:
    """Join the process group `torchrun` describes in the environment, and leave it at the end.
    Does nothing in a plain process (no WORLD_SIZE, or WORLD_SIZE=1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" is this process's GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def rank_and_size() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def check_batches(cases: int, batch_size: int, processes: int) -> None:
    """Refuse a batch that cannot be shared: every process needs a share of every batch."""
    if batch_size % processes:
        raise DataError(f"train.batch_size={batch_size} cannot be shared by {processes} processes: "
                        f"the batch is global (each process takes batch_size / {processes}); use a multiple of {processes}")
    last = cases % batch_size
    if 0 < last < processes:
        raise DataError(f"{cases} training cases in batches of {batch_size} leave a last batch of {last}, "
                        f"fewer than the {processes} processes; choose another batch size or number of processes")


class RankBatches(Sampler[list[int]]):
    """This process's share of each batch of `sampler`'s order (`DataLoader(batch_sampler=...)`).

    The batches are those of `DataLoader(batch_size=batch_size, sampler=sampler)` in one process;
    each is cut into `processes` contiguous shares (sizes differ by at most one, for the last
    batch), share `rank` goes to this process. Call `sampler.set_epoch` as usual."""

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int, processes: int) -> None:
        self.sampler, self.batch_size, self.rank, self.processes = sampler, batch_size, rank, processes

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        for start in range(0, len(order), self.batch_size):
            yield np.array_split(order[start:start + self.batch_size], self.processes)[self.rank].tolist()

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)  # type: ignore[arg-type]


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes, differentiable (module docstring)."""
    return _GlobalSum.apply(tensor)


class _GlobalSum(torch.autograd.Function):
    """Every process computes the same loss from the summed tensor; the gradient of its own share
    is the sum of the processes' gradients, i.e. N times one loss's, which DDP's average over the
    N processes divides back. (torch.distributed.nn.functional.all_reduce does the same, but is
    deprecated in favour of collectives without a backward.)"""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(total)
        return total


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every process (e.g. a checkpoint loaded on rank 0, to CPU)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class NoRun:
    """Stands in for the MLflow run on the processes other than rank 0, which log nothing: a
    `tracking.RunLog`, as `tracking.Run` is."""

    id = ""  # no run: rank 0 reports the run's id

    def log_params(self, params: Mapping[str, Any]) -> None:
        pass

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: Path | str, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, obj: Any, name: str) -> None:
        pass

    def log_table(self, df: pd.DataFrame, name: str) -> None:
        pass

    def artifact_dir(self) -> Path | None:
        return None

    def reopen(self) -> None:
        pass

    def finish(self, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        pass
