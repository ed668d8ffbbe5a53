"""The checkpoint format, in one place: where a run's files live, what they hold, how they are
written (atomically) and read (weights only).

Two files per fold run, in the run's artifact folder when the store is local:

    checkpoints/last.pt   everything a resumed run needs (`CHECKPOINT_KEYS`, plus the config),
                          rewritten at the end of every `checkpoint_every`-th epoch
    model/model.pt        the final weights, the config that builds them and the fold

Both carry the resolved config (`config`, as `config.to_dict`) and its `config_hash`, so a model
file alone rebuilds its network (nanoGPT's checkpoints do the same). `inference/predict.py` and
`ablation/` read this module, never the trainer. Needs torch, `brats_lab.config`, `brats_lab.files`
and `brats_lab.run_files` only.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch

from brats_lab import DataError
from brats_lab.config import ExperimentConfig, config_hash, to_dict
from brats_lab.files import atomic_path, write_error
from brats_lab.run_files import CHECKPOINT

CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scaler", "average", "best", "rng", "config_hash")
MODEL_KEYS = ("model", "config")  # what a final model needs to be rebuilt and loaded


def workdir(run: Any, project_root: Path | None = None) -> Path:
    """Where a run's checkpoint and final model are written: the run's own artifact folder when
    the store is local, else `<project root>/mlruns/checkpoints/<run id>` on this machine."""
    local = run.artifact_dir()
    if local is not None:
        return Path(local)
    return Path(project_root or Path.cwd()) / "mlruns" / "checkpoints" / run.id


def checkpoint_path(run: Any, project_root: Path | None = None) -> Path:
    """Where `run`'s resumable checkpoint is, seen from this machine. With a remote artifact
    store (an MLflow server serving artifacts) it is a local folder of the machine that trained
    the run, so another machine finds nothing there."""
    return workdir(run, project_root) / CHECKPOINT


def training_state(
    epoch: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    average: Any,
    best: dict[str, Any],
    cfg: ExperimentConfig,
    device: torch.device,
) -> dict[str, Any]:
    """The resumable state after `epoch`: weights, optimizer, loss scaler, the SWA average
    (`optim.WeightAverage`), the best weights so far, the RNG states and the config."""
    return {
        "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(), "average": average.state_dict(), "best": best,
        "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
        "config": to_dict(cfg), "config_hash": config_hash(cfg),
    }


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    """Set the RNG states saved by `training_state`."""
    torch.set_rng_state(state["rng"]["torch"])
    if device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])


def model_state(model: torch.nn.Module, cfg: ExperimentConfig, fold: int) -> dict[str, Any]:
    """The final model file's content: weights, the config that builds them, its hash, the fold."""
    return {"model": model.state_dict(), "config": to_dict(cfg), "config_hash": config_hash(cfg), "fold": fold}


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
