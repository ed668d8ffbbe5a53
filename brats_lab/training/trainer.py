"""Train one fold of one configuration, tracked in MLflow. Reads top to bottom:

    data (cache, splits) -> tracking (arm and fold runs) -> model, optimizer, loss -> resume?
    -> epochs: [SWA cycle start] lr, train steps, validation, snapshot, metrics, checkpoint
    -> final weights (SWA average, best or last) -> whole-volume validation with BraTS metrics
    -> per-case table, overlays of the best and worst cases, final model

A checkpoint is written atomically at the end of every `checkpoint_every`-th epoch. Everything a
resumed run needs is in it (weights, optimizer, scaler, the SWA average, the best weights, RNG
state, the epoch); the data of epoch e depends only on (seed, e), so a run resumed after a crash
continues exactly as if it had never stopped.

Under `torchrun` the processes share each batch (`training/distributed.py`); rank 0 alone logs,
validates and writes checkpoints.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from brats_lab import DataError
from brats_lab.config import ExperimentConfig, config_hash, flatten, to_dict
from brats_lab.data.cache import Cache, prepare
from brats_lab.data.cases import discover
from brats_lab.data.dataset import EpochSampler, TrainPatches, WholeVolumes
from brats_lab.data.preprocess import paste_back, unpad
from brats_lab.data.splits import load_splits, make_splits, save_splits, training_cases
from brats_lab.evaluation.metrics import case_metrics
from brats_lab.io import atomic_path, read_image, write_image
from brats_lab.labels import REGIONS
from brats_lab.models import build_model, count_parameters
from brats_lab.training import distributed
from brats_lab.training.losses import make_loss
from brats_lab.training.optim import (
    WeightAverage,
    build_optimizer,
    build_swa_optimizer,
    is_swa_cycle_start,
    lr_at,
    set_lr,
    swa_snapshot_epochs,
    total_epochs,
)
from brats_lab.training.step import train_step

CHECKPOINT = "checkpoints/last.pt"
FINAL_MODEL = "model/model.pt"
CHECKPOINT_KEYS = ("epoch", "model", "optimizer", "scaler", "average", "best", "rng", "config_hash")
EXPERIMENT = "brats-lab"  # the MLflow experiment of trainings outside an ablation


@dataclass
class FoldResult:
    run_id: str
    arm_id: str
    per_case: pd.DataFrame  # one row per validation case: dice_ET, ..., hd95_WT
    epochs: int

    def mean(self, metric: str = "dice") -> dict[str, float]:
        return {r: float(self.per_case[f"{metric}_{r}"].mean()) for r in REGIONS}


def train_fold(
    cfg: ExperimentConfig,
    fold: int,
    *,
    resume: bool = False,
    experiment: str = EXPERIMENT,
    parent: Any = None,
    project_root: Path | None = None,
    progress: bool = True,
    device: str | None = None,
) -> FoldResult | None:
    """Train fold `fold` of `cfg`, validate it on its held-out cases, log everything to MLflow.

    `resume` continues the newest unfinished run of the same configuration and fold from its last
    checkpoint. `parent` is an arm run to nest under (an ablation's); by default the arm run of
    this configuration in `experiment` is found or created. In a process group (`torchrun`, see
    `training/distributed.py`) the processes share each batch; rank 0 returns the result, the
    others None.
    """
    from brats_lab import tracking

    started = time.perf_counter()
    rank, processes = distributed.rank_and_size()  # (0, 1) unless launched by torchrun
    is_main = rank == 0  # the process that logs, validates and writes
    progress = progress and is_main
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    chash = config_hash(cfg)

    # --- data: the cache and the folds ----------------------------------------------------------
    cache = prepare(Path(cfg.data.dataset), cfg.data.normalization, progress=progress)
    for case_id, why in cache.report.built.items():
        if why != "new" and is_main:  # a corrupt or changed entry built again is worth a line
            print(f"data cache {cache.dir}: rebuilt {case_id} ({why})", file=sys.stderr)
    # Before any run starts: test data (no segmentations) would otherwise fail only mid-fold.
    if unlabelled := [c for c in cache.case_ids if not cache.entry(c).has_labels]:
        raise DataError(f"{unlabelled[0]}: no segmentation file in {cfg.data.dataset}"
                        + (f" (nor in {len(unlabelled) - 1} more cases)" if len(unlabelled) > 1 else "")
                        + "; training needs one per case")
    splits = _splits(cache, cfg)
    if not 0 <= fold < len(splits):
        raise DataError(f"fold {fold} does not exist: the splits have folds 0 to {len(splits) - 1}")
    train_ids, val_ids = splits[fold]["train"], splits[fold]["val"]
    train_ids = training_cases(splits, fold, cfg.data.exclude, cfg.data.dataset)
    if processes > 1:
        distributed.check_batches(len(train_ids), cfg.train.batch_size, processes)

    # --- tracking: arm run, fold run (rank 0 only) -----------------------------------------------
    state = None  # the checkpoint to resume from (rank 0 reads it)
    if is_main:
        arm = parent or tracking.arm_run(experiment, chash, name=f"pipeline {cfg.pipeline}", params=flatten(cfg), root=project_root)
        if parent is None and arm.status != "RUNNING":  # a training of our own: the arm runs while a fold does
            arm.reopen()
        if resume:
            run = tracking.latest_fold_run(experiment, chash, fold, statuses=("RUNNING", "FAILED", "KILLED"), root=project_root)
            if run is None:
                raise DataError(f"nothing to resume: no unfinished run of fold {fold} for this configuration (hash {chash[:12]})")
            if not (_workdir(run, project_root) / CHECKPOINT).is_file():
                raise DataError(f"nothing to resume: run {run.id} stopped before its first checkpoint; train afresh")
            # Read before reopening: a checkpoint that does not load leaves the run as it was.
            state = load_checkpoint(_workdir(run, project_root) / CHECKPOINT, CHECKPOINT_KEYS)
            run.reopen()
        else:
            run = tracking.fold_run(arm, fold, name=f"pipeline {cfg.pipeline} fold {fold}")
            run.log_params(flatten(cfg))
            run.log_dict(to_dict(cfg), "config.json")
            run.set_tags({"manifest_hash": cache.manifest_hash, "train_cases": str(len(train_ids)), "val_cases": str(len(val_ids))})
        workdir = _workdir(run, project_root)
    else:
        arm = run = distributed.NoRun()

    # --- model, optimizer, loss, precision ------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    # Training patches have one shape: let cuDNN pick its fastest kernels for it (measured 1.15x on
    # an H100). Validation volumes vary in shape, so they run on the uncompiled `model`.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    forward = model if processes == 1 else torch.nn.parallel.DistributedDataParallel(model)  # averages gradients
    forward = torch.compile(forward) if cfg.train.compile else forward
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    amp_dtype = _amp_dtype(cfg.train.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    loss_fn = make_loss(cfg.train.loss, cfg.train.dice_eps)
    # Several processes: the Dice of the global batch, its sums added over the processes.
    train_loss_fn = loss_fn if processes == 1 else make_loss(cfg.train.loss, cfg.train.dice_eps, distributed.global_sum)
    average = WeightAverage()
    snapshots = {cfg.train.epochs + e for e in swa_snapshot_epochs(cfg.train.swa)}
    best: dict[str, Any] = {"loss": float("inf"), "epoch": -1, "state": None}
    start_epoch = 0
    if resume:
        if processes > 1:  # rank 0's checkpoint, on every process
            state = distributed.broadcast(state)
        model.load_state_dict(state["model"])
        if state["epoch"] >= cfg.train.epochs:  # stopped in the SWA phase: the state is its Adam's
            optimizer = build_swa_optimizer(model.parameters(), cfg.train.swa)
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        average.load_state_dict(state["average"])
        best = state["best"]
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
        start_epoch = state["epoch"] + 1
    else:
        run.set_tags({"parameters": str(count_parameters(model)), "device": str(device), "amp": str(amp_dtype).removeprefix("torch.")})
    run.set_tags({"host": socket.gethostname(), "pid": str(os.getpid())})  # which worker trains it (again, on resume)
    if processes > 1:
        run.set_tags({"processes": str(processes)})

    patches = TrainPatches(cache, train_ids, cfg.data.patch_size, augment=cfg.train.augment, seed=cfg.train.seed)
    sampler = EpochSampler(len(patches), seed=cfg.train.seed)
    if processes == 1:
        loader = DataLoader(patches, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers, drop_last=False)
    else:  # this process's share of each batch
        batches = distributed.RankBatches(sampler, cfg.train.batch_size, rank, processes)
        loader = DataLoader(patches, batch_sampler=batches, num_workers=cfg.data.num_workers)
    volumes = WholeVolumes(cache, val_ids, cfg.data.pad_multiple)
    epochs = total_epochs(cfg.train)

    # --- the epochs -----------------------------------------------------------------------------
    bar = _progress(progress, total=(epochs - start_epoch) * len(loader), desc=f"fold {fold}")
    try:
        for epoch in range(start_epoch, epochs):
            tic = time.perf_counter()
            swa_epoch = epoch - cfg.train.epochs
            if swa_epoch >= 0 and is_swa_cycle_start(swa_epoch, cfg.train.swa):
                optimizer = build_swa_optimizer(model.parameters(), cfg.train.swa)  # restart, fresh moments
            lr = lr_at(epoch, cfg)
            set_lr(optimizer, lr)
            patches.set_epoch(epoch)
            sampler.set_epoch(epoch)

            model.train()
            losses = []
            for image, target in loader:
                image = image.to(device, non_blocking=True)  # (B, 4, P, P, P)
                target = target.to(device, non_blocking=True)  # (B, 3, P, P, P) bool
                if cfg.train.channels_last:
                    image = image.contiguous(memory_format=torch.channels_last_3d)
                loss = train_step(forward, image, target, optimizer, scaler, train_loss_fn, cfg.train.deep_supervision_weighting, amp_dtype)
                losses.append(loss.item())
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")

            metrics = {"train_loss": float(np.mean(losses)), "lr": lr}
            last = epoch == epochs - 1
            if is_main and ((epoch + 1) % cfg.train.val_every == 0 or last):
                val = validate(model, volumes, loss_fn, device, amp_dtype)
                metrics.update(val)
                if val["val_loss"] < best["loss"]:
                    best = {"loss": val["val_loss"], "epoch": epoch, "state": _copy_state(model)}
            if epoch in snapshots:
                average.update(model.state_dict())
            metrics["epoch_seconds"] = time.perf_counter() - tic
            run.log_metrics(metrics, step=epoch)

            if is_main and ((epoch + 1) % cfg.train.checkpoint_every == 0 or last):
                _save(workdir / CHECKPOINT, {
                    "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "average": average.state_dict(), "best": best,
                    "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
                    "config": to_dict(cfg), "config_hash": chash,
                })
        bar.close()
        if not is_main:
            return None  # rank 0 makes, scores and logs the final model

        # --- the final model: the self-ensemble, the best or the last weights ---------------------
        if average.count:
            model.load_state_dict(average.average())
            chosen = f"average of {average.count} snapshots"
        elif cfg.train.keep == "best" and best["state"] is not None:
            model.load_state_dict(best["state"])
            chosen = f"best validation loss (epoch {best['epoch']})"
        else:
            chosen = "last epoch"
        _save(workdir / FINAL_MODEL, {"model": model.state_dict(), "config": to_dict(cfg), "config_hash": chash, "fold": fold})

        # --- whole-volume validation in the original geometry, with the BraTS metrics -------------
        per_case = evaluate_cases(model, cache, volumes, Path(cfg.data.dataset), device, amp_dtype, workdir, progress)
        summary = {f"final_{c}": float(per_case[c].mean()) for c in per_case.columns if c != "case"}
        run.log_metrics(summary, step=epochs - 1)
        run.log_table(per_case, "per_case_metrics.csv")
        run.set_tags({"final_model": chosen, "wall_seconds": f"{time.perf_counter() - started:.0f}"})
        if run.artifact_dir() is None:  # a remote store: upload what was written locally
            run.log_artifact(workdir / FINAL_MODEL, "model")
            run.log_artifact(workdir / CHECKPOINT, "checkpoints")
            for png in sorted((workdir / "overlays").glob("*.png")):
                run.log_artifact(png, "overlays")
            for prediction in sorted((workdir / "predictions").glob("*.nii.gz")):
                run.log_artifact(prediction, "predictions")
        run.finish("FINISHED")
        if parent is None:
            arm.finish("FINISHED")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM through the CLI
        bar.close()
        run.finish("KILLED")
        if parent is None:
            arm.finish("KILLED")  # as on success: the arm of our own training is not left RUNNING
        raise
    except BaseException:
        bar.close()  # the error goes on a line of its own
        run.finish("FAILED")
        if parent is None:
            arm.finish("FAILED")
        raise
    return FoldResult(run_id=run.id, arm_id=arm.id, per_case=per_case, epochs=epochs)


@torch.no_grad()
def validate(model, volumes: WholeVolumes, loss_fn, device: torch.device, amp_dtype) -> dict[str, float]:
    """Mean loss and Dice per region (threshold 0.5) over whole padded brain crops.

    In eval mode the models return the main output only, so this is the main head's loss.
    """
    model.eval()
    losses, dice = [], {r: [] for r in REGIONS}
    for item in volumes:
        logits = _predict(model, item.image, device, amp_dtype)  # (3, Z, Y, X) float32
        target = item.target.to(device)
        losses.append(loss_fn(logits[None], target[None]).item())
        pred = logits > 0  # sigmoid > 0.5
        for channel, region in enumerate(REGIONS):
            p, t = pred[channel], target[channel]
            denominator = (p.sum() + t.sum()).item()
            # BraTS rule: both empty is a perfect score.
            dice[region].append(1.0 if denominator == 0 else 2 * (p & t).sum().item() / denominator)
    return {"val_loss": float(np.mean(losses)), **{f"val_dice_{r}": float(np.mean(v)) for r, v in dice.items()}}


@torch.no_grad()
def evaluate_cases(model, cache: Cache, volumes: WholeVolumes, dataset: Path, device, amp_dtype, workdir: Path, progress: bool) -> pd.DataFrame:
    """Predict each validation case whole, paste it back into its original geometry (written to
    `predictions/<case>.nii.gz`) and score it against its segmentation file with the BraTS 2020
    metrics; draw the best and worst cases."""
    from brats_lab.viz import render_case

    model.eval()
    segs = {c.id: c.seg for c in discover(dataset)}
    rows, predictions = [], {}
    for item in _progress(progress, iterable=volumes, desc="validation", total=len(volumes)):
        entry = cache.entry(item.case_id)
        logits = _predict(model, item.image, device, amp_dtype).cpu().numpy()
        regions = unpad(logits > 0, item.pads)
        labels = paste_back(entry.convention.from_regions(regions), entry.bbox, entry.original_shape)
        reference, _ = read_image(segs[item.case_id])
        write_image(labels, entry.geometry, workdir / "predictions" / f"{item.case_id}.nii.gz")
        scores = case_metrics(labels, reference, entry.geometry.spacing_zyx, entry.convention)
        rows.append({"case": item.case_id, **{f"{m}_{r}": v for r, s in scores.items() for m, v in s.as_dict().items()}})
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
            with atomic_path(workdir / "overlays" / f"{tag}_{case_id}.png", suffix=".png") as tmp:
                render_case(images, entry.convention, tmp, reference=reference, prediction=labels,
                            title=f"{tag}: {case_id}, Dice {dice}; {{slice}}")
    return table


def _predict(model, image: torch.Tensor, device: torch.device, amp_dtype) -> torch.Tensor:
    """Logits (3, Z, Y, X) in float32 for one padded volume (4, Z, Y, X)."""
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        logits = model(image[None].to(device))
    return logits[0].float()


def _splits(cache: Cache, cfg: ExperimentConfig) -> list[dict]:
    """The folds of this data, made once and kept beside the cache so every run uses the same."""
    path = cache.dir / f"splits_{cfg.data.folds}folds_seed{cfg.data.seed}.json"
    if path.is_file():
        return load_splits(path, cache.manifest_hash, cache.case_ids)
    if len(cache.case_ids) < cfg.data.folds:
        raise DataError(f"{cfg.data.dataset}: {len(cache.case_ids)} cases cannot make {cfg.data.folds} folds")
    splits = make_splits(cache.case_ids, cfg.data.folds, cfg.data.seed)
    save_splits(path, splits, cache.manifest_hash, cfg.data.seed)
    return splits


def _workdir(run, project_root: Path | None) -> Path:
    """Where checkpoints are written: the run's own artifact folder when the store is local."""
    local = run.artifact_dir()
    if local is not None:
        return Path(local)
    return Path(project_root or Path.cwd()) / "mlruns" / "checkpoints" / run.id


def checkpoint_path(run, project_root: Path | None = None) -> Path:
    """Where `run`'s resumable checkpoint is, seen from this machine. With a remote artifact
    store (an MLflow server serving artifacts) it is a local folder of the machine that trained
    the run, so another machine finds nothing there."""
    return _workdir(run, project_root) / CHECKPOINT


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.amp` on this device (None: float32)."""
    if amp == "off":
        return None
    if device.type != "cuda":
        # CPU autocast in fp16 is slow and unscaled; bf16 only when asked for explicitly.
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _save(path: Path, state: dict) -> None:
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
        raise OSError(f"{path}: could not write ({error.strerror or error})") from None


def load_checkpoint(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """A file written by `_save`, on the CPU, holding at least `keys`. Loaded with weights_only,
    so nothing but tensors and plain data is unpickled (a file that would run code is refused);
    a file cut short or not a checkpoint at all raises DataError naming it."""
    import pickle
    import warnings

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


def _progress(enabled: bool, **kwargs):
    from tqdm import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kwargs)
