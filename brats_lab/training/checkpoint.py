"""The checkpoint format, in one place: where a run's files live, what they hold, how they are
written (atomically) and read (weights only).

Two files per fold run, in the run's artifact folder when the store is local:

    checkpoints/last.pt   everything a resumed run needs (`CHECKPOINT_KEYS`, plus the config),
                          rewritten at the end of every `checkpoint_every`-th epoch
    model/model.pt        the final weights, the config that builds them and the fold

Both carry the resolved config (`config`, as `config.to_dict`) and its `config_hash`, so a model
file alone rebuilds its network (nanoGPT's checkpoints do the same). `inference/predict.py` and
`ablation/` read this module, never the trainer. Needs torch, `brats_lab.config`, `brats_lab.files`
and `brats_lab.run_files` only (`tracking` and `training.optim` for its annotations).

What a training carries from epoch to epoch is one `TrainState` (model, optimizer, loss scaler,
SWA average, the `Best` validation so far, the last epoch trained); `training_state` writes it
into a checkpoint and `restore` reads it back, in the same format since the first checkpoint.
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from brats_lab import DataError
from brats_lab.config import ExperimentConfig, config_hash, to_dict
from brats_lab.files import atomic_path, write_error
from brats_lab.run_files import CHECKPOINT

if TYPE_CHECKING:
    from brats_lab.tracking import RunLog
    from brats_lab.training.optim import WeightAverage

CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scaler", "average", "best", "rng", "config_hash")
MODEL_KEYS = ("model", "config")  # what a final model needs to be rebuilt and loaded


@dataclass
class Best:
    """The lowest validation loss so far, its epoch and a copy of the weights that gave it;
    `weights` is None (and `epoch` -1) before the first validation."""

    loss: float = math.inf
    epoch: int = -1
    weights: dict[str, torch.Tensor] | None = None

    def as_dict(self) -> dict[str, Any]:
        """As a checkpoint holds it (`"best"`): {"loss", "epoch", "state"}."""
        return {"loss": self.loss, "epoch": self.epoch, "state": self.weights}

    @classmethod
    def from_dict(cls, saved: Mapping[str, Any]) -> Best:
        return cls(loss=saved["loss"], epoch=saved["epoch"], weights=saved["state"])


@dataclass
class TrainState:
    """What a training carries from epoch to epoch, and what its checkpoint restores: the model,
    its optimizer (replaced at each SWA cycle start), the loss scaler, the SWA average
    (`optim.WeightAverage`), the best validation so far and the last epoch trained (-1 before
    the first)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    average: WeightAverage
    best: Best = field(default_factory=Best)
    epoch: int = -1


def workdir(run: RunLog, project_root: Path | None = None) -> Path:
    """Where a run's checkpoint and final model are written: the run's own artifact folder when
    the store is local, else `<project root>/mlruns/checkpoints/<run id>` on this machine."""
    local = run.artifact_dir()
    if local is not None:
        return Path(local)
    return Path(project_root or Path.cwd()) / "mlruns" / "checkpoints" / run.id


def checkpoint_path(run: RunLog, project_root: Path | None = None) -> Path:
    """Where `run`'s resumable checkpoint is, seen from this machine. With a remote artifact
    store (an MLflow server serving artifacts) it is a local folder of the machine that trained
    the run, so another machine finds nothing there."""
    return workdir(run, project_root) / CHECKPOINT


def config_entries(cfg: ExperimentConfig) -> dict[str, Any]:
    """What every file of a training carries of its config: `config` (as `config.to_dict`) and
    `config_hash`. A training computes them once, not at every checkpoint."""
    return {"config": to_dict(cfg), "config_hash": config_hash(cfg)}


def training_state(state: TrainState, config: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The checkpoint of `state` after its epoch: weights, optimizer, loss scaler, the SWA average,
    the best weights so far, the RNG states (CUDA's too on a `device` of type cuda) and `config`
    (`config_entries`)."""
    return {
        "epoch": state.epoch, "model": state.model.state_dict(), "optimizer": state.optimizer.state_dict(),
        "scaler": state.scaler.state_dict(), "average": state.average.state_dict(), "best": state.best.as_dict(),
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        **config,
    }


def restore(state: TrainState, saved: Mapping[str, Any], device: torch.device) -> None:
    """Load a checkpoint written by `training_state` (`saved`, as `load` returns it) into `state`:
    weights, optimizer, scaler, average, best and epoch, and set the RNG states it saved. The
    optimizer must be of the kind that wrote it (the SWA phase's Adam after `train.epochs`)."""
    state.model.load_state_dict(saved["model"])
    state.optimizer.load_state_dict(saved["optimizer"])
    state.scaler.load_state_dict(saved["scaler"])
    state.average.load_state_dict(saved["average"])
    state.best = Best.from_dict(saved["best"])
    state.epoch = saved["epoch"]
    torch.set_rng_state(saved["rng"]["torch"])
    if device.type == "cuda" and saved["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(saved["rng"]["cuda"])


def model_state(model: torch.nn.Module, cfg: ExperimentConfig, fold: int) -> dict[str, Any]:
    """The final model file's content: weights, the config that builds them, its hash, the fold."""
    return {"model": model.state_dict(), **config_entries(cfg), "fold": fold}


def save(path: Path, state: dict) -> None:
    """Write a checkpoint or model atomically: a write that fails half-way (disk full) leaves the
    previous file as it was, and the error names the file."""
    try:
        # Through a Python file, so a failed write raises OSError with its reason (torch's own
        # writer says only "unexpected pos"); fsync so the rename never exposes unwritten data.
        with atomic_path(path, suffix=".pt") as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
    except (OSError, RuntimeError) as e:
        error = e if isinstance(e, OSError) else e.__context__  # torch raises RuntimeError over it
        if not isinstance(error, OSError):
            raise
        raise write_error(path, error, "could not write") from None


def load(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A file written by `save`, on the CPU, holding at least `keys`. Loaded with weights_only,
    so nothing but tensors and plain data is unpickled (a file that would run code is refused);
    a file cut short or not a checkpoint at all raises DataError naming it."""
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # random bytes, or a pickle of other objects (which could run code)
        detail = next((ln.strip() for ln in str(e).splitlines() if "nsupported" in ln), "not tensors and plain data")
        raise DataError(f"{path}: not a brats-lab checkpoint, refused by the loader that unpickles only tensors "
                        f"and plain data ({detail})") from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... for damaged files
        first = (str(e).split(". ")[0].splitlines() or [""])[0]
        reason = f"{type(e).__name__}: {first}" if first else type(e).__name__
        raise DataError(f"{path}: unreadable checkpoint, cut short or not a checkpoint ({reason})") from None
    if not isinstance(state, dict) or (missing := [k for k in keys if k not in state]):
        raise DataError(f"{path}: not a brats-lab checkpoint (no {', '.join(missing) if isinstance(state, dict) else 'dict'} in it)")
    return state
