"""Train one fold of one configuration, tracked in MLflow. `train_fold` reads top to bottom:

    data (cache, folds) -> runs (arm and fold, or the run to resume) -> model, optimizer, loss
    -> epochs: [SWA cycle start] lr, train steps, validation, snapshot, metrics, checkpoint
    -> final weights (SWA average, best or last) -> scoring in the original geometry -> close runs

What changes from epoch to epoch is one `checkpoint.TrainState` (model, optimizer, loss scaler,
SWA average, the `Best` validation so far, the last epoch trained); what every step calls is one
`step.Step` (the module, the loss, where and in what precision it runs). Its helpers, in this
file, do one thing each: open the arm run, open a fold run or reopen an unfinished one, restore
a checkpoint, choose the final weights, upload to a remote store, close the runs with one
status. The checkpoint format is `training/checkpoint.py`; the per-epoch validation and the
final scoring with pictures are `training/scoring.py`.

A checkpoint is written atomically at the end of every `checkpoint_every`-th epoch. Everything a
resumed run needs is in it (weights, optimizer, scaler, the SWA average, the best weights, RNG
state, the epoch); the data of epoch e depends only on (seed, e), so a run resumed after a crash
continues exactly as if it had never stopped.

The loop does not wait for the GPU to log: the step losses stay on the device and are read once
per epoch, where the epoch's mean is logged and a non-finite loss stops the run as FAILED
(`TrainingDiverged`, naming the epoch and step). Each epoch logs its wall time split into
waiting for data, training steps and validation (`epoch_data_seconds`, `epoch_step_seconds`,
`epoch_val_seconds`), and on a GPU the memory peak (`gpu_memory_peak_gib`).

Under `torchrun` the processes share each batch (`training/distributed.py`); rank 0 alone logs,
validates and writes checkpoints, the others log to a `distributed.NoRun`.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from brats_lab import DataError, UserError, precision, run_files, tracking
from brats_lab.config import ExperimentConfig, config_hash, flatten, to_dict
from brats_lab.data.cache import Cache, prepare
from brats_lab.data.dataset import EpochSampler, TrainPatches, WholeVolumes
from brats_lab.data.splits import kept_splits, training_cases
from brats_lab.labels import REGIONS
from brats_lab.models import build_model, count_parameters
from brats_lab.tracking import Run, RunLog
from brats_lab.training import checkpoint, distributed
from brats_lab.training.checkpoint import CHECKPOINT_KEYS, Best, TrainState
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
from brats_lab.training.scoring import score_cases, validate
from brats_lab.training.step import Compute, Step, train_step

EXPERIMENT = "brats-lab"  # the MLflow experiment of trainings outside an ablation


class TrainingDiverged(UserError):
    """The training loss stopped being finite: the weights are lost, the run is FAILED."""


@dataclass
class FoldResult:
    run_id: str
    arm_id: str
    per_case: pd.DataFrame  # one row per validation case: dice_ET, ..., hd95_WT
    epochs: int

    def mean(self, metric: str = "dice") -> dict[str, float]:
        return {r: float(self.per_case[f"{metric}_{r}"].mean()) for r in REGIONS}


def train_fold(cfg: ExperimentConfig, fold: int, *, resume: bool = False, experiment: str = EXPERIMENT,
               parent: Run | None = None, progress: bool = True,
               device: str | None = None, tags: dict[str, str] | None = None) -> FoldResult | None:
    """Train fold `fold` of `cfg`, validate it on its held-out cases, log everything to MLflow.

    `resume` continues the newest unfinished run of the same configuration and fold from its last
    checkpoint. `parent` is an arm run to nest under (an ablation's); by default the arm run of
    this configuration in `experiment` is found or created. In a process group (`torchrun`, see
    `training/distributed.py`) the processes share each batch; rank 0 returns the result, the
    others None. A non-finite training loss raises `TrainingDiverged` (the run is FAILED).
    `tags` go on the fold run, set again on resume (e.g. the SLURM job and its log file).
    """
    started = time.perf_counter()
    rank, processes = distributed.rank_and_size()  # (0, 1) unless launched by torchrun
    is_main = rank == 0  # the process that logs, validates and writes
    progress = progress and is_main
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))  # `device` as given, `dev` as used

    # --- data, runs --------------------------------------------------------------------------
    data = _fold_data(cfg, fold, processes, is_main, progress)
    arm: RunLog = distributed.NoRun()  # on rank 0 the runs; the other processes log nothing
    run: RunLog = distributed.NoRun()
    saved: dict[str, Any] | None = None  # the checkpoint to resume from
    if is_main:
        arm = _arm_run(cfg, experiment, parent)
        run, saved = _unfinished_run(cfg, fold, experiment) if resume else (_new_run(arm, cfg, fold, data), None)
        workdir = checkpoint.workdir(run)

    # --- model, optimizer, loss, precision ------------------------------------------------------
    seed = cfg.train.run_seed(fold)  # this fold's own: weights, patch order, crops, augmentation
    model, forward = _model(cfg, seed, dev, processes)  # forward: for training steps (DDP, compiled)
    compute = Compute(dev, precision.autocast_dtype(cfg.train.amp, dev))
    if is_main and progress:
        print(precision.describe(cfg.train.amp, dev), file=sys.stderr)
    scaler = torch.amp.GradScaler(dev.type, enabled=compute.amp_dtype == torch.float16)
    state = TrainState(model, build_optimizer(model.parameters(), cfg.optim), scaler, WeightAverage())
    loss_fn = make_loss(cfg.train.loss, cfg.train.dice_eps)
    # Several processes: the Dice of the global batch, its sums added over the processes.
    train_loss_fn = loss_fn if processes == 1 else make_loss(cfg.train.loss, cfg.train.dice_eps, distributed.global_sum)
    step = Step(forward, train_loss_fn, cfg.train.deep_supervision_weighting, compute, cfg.train.channels_last)
    snapshots = {cfg.train.epochs + e for e in swa_snapshot_epochs(cfg.train.swa)}
    if resume:
        _restore(state, saved, cfg, dev, processes)
    _tag_run(run, resume, model, compute, processes)
    if tags:
        run.set_tags(tags)
    patches, sampler, loader = _loader(cfg, seed, data, rank, processes)
    volumes = WholeVolumes(data.cache, data.val_ids, cfg.data.pad_multiple)
    epochs = total_epochs(cfg.train)
    config = checkpoint.config_entries(cfg)  # in every checkpoint: hashed once, not every epoch

    # --- the epochs -----------------------------------------------------------------------------
    bar = _progress(progress, total=(epochs - state.epoch - 1) * len(loader), desc=f"fold {fold}")
    try:
        for epoch in range(state.epoch + 1, epochs):
            tic = time.perf_counter()
            swa_epoch = epoch - cfg.train.epochs
            if swa_epoch >= 0 and is_swa_cycle_start(swa_epoch, cfg.train.swa):
                state.optimizer = build_swa_optimizer(model.parameters(), cfg.train.swa)  # restart, fresh moments
            lr = lr_at(epoch, cfg)
            set_lr(state.optimizer, lr)
            patches.set_epoch(epoch)
            sampler.set_epoch(epoch)

            losses, data_seconds = _train_epoch(state, step, loader, bar)
            _stop_if_diverged(losses, epoch, fold, cfg)
            metrics = {"train_loss": float(np.mean(losses)), "lr": lr, "epoch_data_seconds": data_seconds,
                       "epoch_step_seconds": time.perf_counter() - tic - data_seconds}
            bar.set_postfix(epoch=epoch, loss=f"{metrics['train_loss']:.3f}", lr=f"{lr:.1e}")

            last = epoch == epochs - 1
            validated = time.perf_counter()
            if is_main and ((epoch + 1) % cfg.train.val_every == 0 or last):
                val = validate(model, volumes, loss_fn, compute)
                metrics.update(val)
                if val["val_loss"] < state.best.loss:
                    state.best = Best(val["val_loss"], epoch, _copy_state(model))
            metrics["epoch_val_seconds"] = time.perf_counter() - validated
            if epoch in snapshots:
                state.average.update(model.state_dict())
            metrics["epoch_seconds"] = time.perf_counter() - tic
            if dev.type == "cuda":  # the peak so far, for sizing batches and patches
                metrics["gpu_memory_peak_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
            run.log_metrics(metrics, step=epoch)

            state.epoch = epoch  # done: a checkpoint now holds it, a resume starts after it
            if is_main and ((epoch + 1) % cfg.train.checkpoint_every == 0 or last):
                checkpoint.save(workdir / run_files.CHECKPOINT, checkpoint.training_state(state, config, dev))
        bar.close()
        if not is_main:
            return None  # rank 0 makes, scores and logs the final model

        # --- final weights, scored in the original geometry -----------------------------------
        chosen = load_final_weights(model, state.average, state.best, cfg.train.keep)
        checkpoint.save(workdir / run_files.FINAL_MODEL, checkpoint.model_state(model, cfg, fold))
        per_case = score_cases(model, volumes, Path(cfg.data.dataset), workdir, compute, progress=progress)
        run.log_metrics({f"final_{c}": float(per_case[c].mean()) for c in per_case.columns if c != "case"}, step=epochs - 1)
        run.log_table(per_case, run_files.PER_CASE)
        run.set_tags({"final_model": chosen, "wall_seconds": f"{time.perf_counter() - started:.0f}"})
        _upload(run, workdir)
    except BaseException as e:  # KeyboardInterrupt: Ctrl-C, or SIGTERM through the CLI
        bar.close()  # the error goes on a line of its own
        _close(run, arm if parent is None else None, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    _close(run, arm if parent is None else None, "FINISHED")
    return FoldResult(run_id=run.id, arm_id=arm.id, per_case=per_case, epochs=epochs)


# --- the steps of train_fold, in its order -----------------------------------------------------


class FoldData(NamedTuple):
    """A fold's data: the prepared cache, the training cases (data.exclude applied), the
    validation cases."""

    cache: Cache
    train_ids: list[str]
    val_ids: list[str]


def _fold_data(cfg: ExperimentConfig, fold: int, processes: int, is_main: bool, progress: bool) -> FoldData:
    """The prepared cache and the fold's training and validation cases (data.exclude applied)."""
    cache = prepare(Path(cfg.data.dataset), cfg.data.normalization, progress=progress)
    for case_id, why in cache.report.built.items():
        if why != "new" and is_main:  # a corrupt or changed entry built again is worth a line
            print(f"data cache {cache.dir}: rebuilt {case_id} ({why})", file=sys.stderr)
    # Before any run starts: test data (no segmentations) would otherwise fail only mid-fold.
    if unlabelled := [c for c in cache.case_ids if not cache.entry(c).has_labels]:
        raise DataError(f"{unlabelled[0]}: no segmentation file in {cfg.data.dataset}"
                        + (f" (nor in {len(unlabelled) - 1} more cases)" if len(unlabelled) > 1 else "")
                        + "; training needs one per case")
    splits = kept_splits(cache.dir, cache.case_ids, cache.manifest_hash, cfg.data.folds, cfg.data.seed, cfg.data.split,
                         cfg.data.dataset)
    if not 0 <= fold < len(splits):
        raise DataError(f"fold {fold} does not exist: the splits have folds 0 to {len(splits) - 1}")
    train_ids = training_cases(splits, fold, cfg.data.exclude, cfg.data.dataset)
    if processes > 1:
        distributed.check_batches(len(train_ids), cfg.train.batch_size, processes)
    return FoldData(cache, train_ids, splits[fold]["val"])


def _arm_run(cfg: ExperimentConfig, experiment: str, parent: Run | None) -> Run:
    """`parent` (an ablation's arm run) if given, else this configuration's arm run in
    `experiment`, found or created, and running while a fold of it trains."""
    if parent is not None:
        return parent
    arm = tracking.arm_run(experiment, config_hash(cfg), name=f"pipeline {cfg.pipeline}", params=flatten(cfg))
    if arm.status != "RUNNING":
        arm.reopen()
    return arm


def _new_run(arm: Run, cfg: ExperimentConfig, fold: int, data: FoldData) -> RunLog:
    """A new fold run under `arm`, with the config (params and file) and what the fold trains on."""
    run = tracking.fold_run(arm, fold, name=f"pipeline {cfg.pipeline} fold {fold}")
    run.log_params(flatten(cfg))
    run.log_dict(to_dict(cfg), run_files.CONFIG)
    run.set_tags({"manifest_hash": data.cache.manifest_hash, "train_cases": str(len(data.train_ids)),
                  "val_cases": str(len(data.val_ids)),
                  "run_seed": str(cfg.train.run_seed(fold))})  # the seed it trains with (param train.seed is the arm's)
    return run


def _unfinished_run(cfg: ExperimentConfig, fold: int, experiment: str) -> tuple[RunLog, dict[str, Any]]:
    """(the newest unfinished fold run of this configuration, reopened; its checkpoint). The
    checkpoint is read first: one that does not load leaves the run as it was."""
    chash = config_hash(cfg)
    run = tracking.latest_fold_run(experiment, chash, fold, statuses=("RUNNING", "FAILED", "KILLED"))
    if run is None:
        raise DataError(f"nothing to resume: no unfinished run of fold {fold} for this configuration (hash {chash[:12]})")
    path = checkpoint.checkpoint_path(run)
    if not path.is_file():
        raise DataError(f"nothing to resume: run {run.id} stopped before its first checkpoint; train afresh")
    saved = checkpoint.load(path, CHECKPOINT_KEYS)
    run.reopen()
    return run, saved


def _model(cfg: ExperimentConfig, seed: int, device: torch.device, processes: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model, the module the training steps call): seeded with the run's `seed`, on `device`,
    wrapped in DDP with several processes and compiled with `train.compile`."""
    torch.manual_seed(seed)
    model = build_model(cfg.model).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # torch's stubs omit memory_format
    # Training patches have one shape: let cuDNN pick its fastest kernels for it (measured 1.15x on
    # an H100). Validation volumes vary in shape, so they run on the uncompiled `model`.
    torch.backends.cudnn.benchmark = device.type == "cuda"
    forward = model if processes == 1 else torch.nn.parallel.DistributedDataParallel(model)  # averages gradients
    return model, torch.compile(forward) if cfg.train.compile else forward  # type: ignore[return-value]  # compiled: called as the module


def _restore(state: TrainState, saved: dict[str, Any] | None, cfg: ExperimentConfig, device: torch.device, processes: int) -> None:
    """Load the checkpoint `saved` (rank 0's, on every process) into `state` and the RNGs; a
    checkpoint of the SWA phase gets the SWA optimizer its state belongs to."""
    if processes > 1:
        saved = distributed.broadcast(saved)
    assert saved is not None
    if saved["epoch"] >= cfg.train.epochs:  # stopped in the SWA phase: the state is its Adam's
        state.optimizer = build_swa_optimizer(state.model.parameters(), cfg.train.swa)
    checkpoint.restore(state, saved, device)


def _tag_run(run: RunLog, resumed: bool, model: torch.nn.Module, compute: Compute, processes: int) -> None:
    if not resumed:
        run.set_tags({"parameters": str(count_parameters(model)), "device": str(compute.device),
                      "amp": str(compute.amp_dtype).removeprefix("torch.")})
    run.set_tags({"host": socket.gethostname(), "pid": str(os.getpid())})  # which worker trains it (again, on resume)
    if processes > 1:
        run.set_tags({"processes": str(processes)})


def _loader(cfg: ExperimentConfig, seed: int, data: FoldData, rank: int, processes: int) -> tuple[TrainPatches, EpochSampler, DataLoader]:
    """The training patches, their per-epoch order and the loader of this process's batches, all
    drawn from the run's `seed`."""
    patches = TrainPatches(data.cache, data.train_ids, cfg.data.patch_size, augment=cfg.train.augment, seed=seed)
    sampler = EpochSampler(len(patches), seed=seed, length=min(cfg.train.epoch_cases, len(patches)) or None)
    if processes == 1:
        loader = DataLoader(patches, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers, drop_last=False)
    else:  # this process's share of each batch
        batches = distributed.RankBatches(sampler, cfg.train.batch_size, rank, processes)
        loader = DataLoader(patches, batch_sampler=batches, num_workers=cfg.data.num_workers)
    return patches, sampler, loader


def _train_epoch(state: TrainState, step: Step, loader: DataLoader, bar: Any) -> tuple[list[float], float]:
    """One pass over the loader, a `train_step` per batch: (the step losses, seconds spent waiting
    for batches). The losses stay on the device until the end: reading one per step would make
    the CPU wait for the GPU at every step, and it could not queue the next step's work meanwhile."""
    state.model.train()
    losses, data_seconds, waiting = [], 0.0, time.perf_counter()
    for image, target in loader:
        data_seconds += time.perf_counter() - waiting
        loss = train_step(step, image, target, state.optimizer, state.scaler)
        losses.append(loss.detach())
        bar.update(1)
        waiting = time.perf_counter()
    return (torch.stack(losses).tolist() if losses else []), data_seconds  # the epoch's one wait for the GPU


def _stop_if_diverged(losses: list[float], epoch: int, fold: int, cfg: ExperimentConfig) -> None:
    """Raise TrainingDiverged at the epoch's first non-finite step loss: from there on the
    weights are NaN, and a run that went on would finish with a model that predicts nothing."""
    bad = next((step for step, value in enumerate(losses) if not math.isfinite(value)), None)
    if bad is None:
        return
    raise TrainingDiverged(
        f"fold {fold}: the training loss is {losses[bad]} at epoch {epoch}, step {bad + 1} of {len(losses)}; "
        f"the run stops as FAILED (its weights are no longer finite). Try a lower learning rate "
        f"(--set optim.lr=..., now {cfg.optim.lr:g}) or train.amp=off")


def load_final_weights(model: torch.nn.Module, average: WeightAverage, best: Best, keep: str) -> str:
    """Load the final weights into `model`: the self-ensemble if there are snapshots, else the
    best validation loss's (with `keep="best"`; no weights in `best` before any validation), else
    the last epoch's. Says which (the run's `final_model` tag)."""
    if average.count:
        model.load_state_dict(average.average())
        return f"average of {average.count} snapshots"
    if keep == "best" and best.weights is not None:
        model.load_state_dict(best.weights)
        return f"best validation loss (epoch {best.epoch})"
    return "last epoch"


def _upload(run: RunLog, workdir: Path) -> None:
    """With a remote artifact store, upload what was written locally (with a local one the files
    are already the run's artifacts)."""
    if run.artifact_dir() is not None:
        return
    for name in (run_files.FINAL_MODEL, run_files.CHECKPOINT):
        run.log_artifact(workdir / name, str(Path(name).parent))
    for folder, pattern in ((run_files.OVERLAYS, "*.png"), (run_files.PREDICTIONS, "*.nii.gz")):
        for path in sorted((workdir / folder).glob(pattern)):
            run.log_artifact(path, folder)


def _close(run: RunLog, own_arm: RunLog | None, status: Literal["FINISHED", "FAILED", "KILLED"]) -> None:
    """End the fold run with `status`, and the arm run too when this training opened it (not an
    ablation's), so that neither is left RUNNING."""
    run.finish(status)
    if own_arm is not None:
        own_arm.finish(status)


def _copy_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _progress(enabled: bool, **kwargs):
    return tqdm(disable=not enabled, dynamic_ncols=True, **kwargs)
