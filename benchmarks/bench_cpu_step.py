"""The CPU training step against its floor, in float32 and bf16, on the machine it runs on.

    python benchmarks/bench_cpu_step.py                 # the attention demo's baseline arm (cpu profile + demo schedule)
    python benchmarks/bench_cpu_step.py --arm att_equiunet
    python benchmarks/bench_cpu_step.py --precisions fp32 --epochs 4

For each precision, in one process:
    floor      the trainer's own step function (forward under autocast, the deep-supervision
               loss, backward, optimizer step) on one fixed batch in a loop: no data, no logging
    fwd+bwd    forward and backward alone on the same batch (no optimizer step)
    trainer    `train_fold` itself on phantom files, from its logged per-epoch times
               (epoch_step_seconds + epoch_data_seconds over the steps, the first epoch left out)
    data       the data pipeline alone: the trainer's loader (patch sampling from the cache,
               augmentation, batching) per batch
The goal: trainer within 1.15x of the floor, data a small share of a step. First it prints what
the CPU executes natively: bf16 on a CPU without AMX or AVX512-BF16 is emulated and several
times slower than float32 (`train.amp = "auto"` takes float32 there; brats_lab/precision.py).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from brats_lab.ablation.spec import load_ablation
from brats_lab.data.phantom import DEMO_CASES, DEMO_SHAPE, synthesize
from brats_lab.models import build_model
from brats_lab.precision import autocast_dtype, cpu_capabilities, cpu_runs_natively
from brats_lab.training.losses import make_loss, output_loss
from brats_lab.training.optim import build_optimizer
from brats_lab.training.step import Compute, Step, train_step

CPU = torch.device("cpu")


def fixed_batch(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(cfg.train.batch_size, 4, *cfg.data.patch_size, generator=generator)
    target = torch.rand(cfg.train.batch_size, 3, *cfg.data.patch_size, generator=generator) > 0.7
    return image, target


def seconds_per_call(call, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        call()
    tic = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - tic) / repeats


def fixed_step(cfg, dtype):
    """(the trainer's step on one fixed batch, as a call; its model, batch and loss), seeded."""
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    loss_fn = make_loss(cfg.train.loss, cfg.train.dice_eps)
    image, target = fixed_batch(cfg)
    weighting = cfg.train.deep_supervision_weighting

    how = Step(model, loss_fn, weighting, Compute(torch.device("cpu"), dtype))

    def step() -> None:
        train_step(how, image, target, optimizer, scaler)

    return step, (model, image, target, loss_fn, weighting)


def floor(cfg, dtype, repeats: int) -> tuple[float, float]:
    """(the trainer's step on a fixed batch, forward + backward alone), seconds per step."""
    step, (model, image, target, loss_fn, weighting) = fixed_step(cfg, dtype)

    def forward_backward() -> None:
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            output = model(image)
        model.zero_grad(set_to_none=True)
        output_loss(output, target, loss_fn, weighting).backward()

    return seconds_per_call(step, 2, repeats), seconds_per_call(forward_backward, 1, repeats)


def data_alone(cfg, dataset: Path, batches: int) -> float:
    """Seconds per batch of the trainer's loader over fold 0's training cases."""
    from brats_lab.data.cache import prepare
    from brats_lab.data.dataset import EpochSampler, TrainPatches
    from torch.utils.data import DataLoader

    cache = prepare(dataset, cfg.data.normalization, progress=False)
    patches = TrainPatches(cache, cache.case_ids, cfg.data.patch_size, augment=cfg.train.augment, seed=0)
    sampler = EpochSampler(len(patches), seed=0)
    loader = DataLoader(patches, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers)
    n, tic = 0, time.perf_counter()
    for epoch in range(100):
        patches.set_epoch(epoch)
        sampler.set_epoch(epoch)
        for _ in loader:
            n += 1
            if n == batches:
                return (time.perf_counter() - tic) / n
    return (time.perf_counter() - tic) / max(n, 1)


def trainer(cfg, store: Path) -> tuple[float, int]:
    """(seconds per step of `train_fold`, steps per epoch), from the epochs after the first."""
    from brats_lab import tracking
    from brats_lab.training.trainer import train_fold

    store.mkdir(parents=True, exist_ok=True)
    here = Path.cwd()
    os.chdir(store)  # the MLflow store and the checkpoints go under the current folder
    try:
        result = train_fold(cfg, 0, progress=False)
        run = tracking.get_run(result.run_id)
        step = dict(run.metric_history("epoch_step_seconds"))
        data = dict(run.metric_history("epoch_data_seconds"))
    finally:
        os.chdir(here)
    epochs = sorted(step)[1:]  # the first epoch warms up the allocator and caches
    cases = _train_cases(cfg)
    steps_per_epoch = -(-min(cfg.train.epoch_cases or cases, cases) // cfg.train.batch_size)
    return float(np.mean([step[e] + data[e] for e in epochs])) / steps_per_epoch, steps_per_epoch


def _train_cases(cfg) -> int:
    from brats_lab.data.cases import discover

    cases = len(discover(Path(cfg.data.dataset)))
    return cases - cases // cfg.data.folds  # fold 0's training cases (the folds differ by at most one)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", default="attention", help="the ablation whose CPU demo is measured")
    parser.add_argument("--arm", default=None, help="its arm (default: the baseline)")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the trainer measurement (the first is left out)")
    parser.add_argument("--repeats", type=int, default=8, help="timed steps of the floor")
    parser.add_argument("--cases", type=int, default=DEMO_CASES, help="phantom cases (default: the demo's)")
    parser.add_argument("--shape", type=int, nargs=3, default=DEMO_SHAPE, metavar=("X", "Y", "Z"),
                        help="phantom shape (default: the demo's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value after the demo's settings, as `brats-lab train --set`")
    args = parser.parse_args()

    caps = cpu_capabilities()
    native = "yes" if cpu_runs_natively("bf16") else "no (emulated)"
    print(f"CPU: {caps.get('cpu_name', '?')}, {torch.get_num_threads()} threads, torch {torch.__version__} "
          f"(capability {torch.backends.cpu.get_cpu_capability()}); native bf16: {native}; "
          f"train.amp=auto picks {autocast_dtype('auto', CPU) or 'float32'}")
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "phantom"
        shape = tuple(args.shape)
        synthesize(dataset, cases=args.cases, seed=0, shape=shape, progress=False)
        ablation = load_ablation(args.ablation)
        arm = args.arm or ablation.baseline
        base = [f"data.dataset={dataset}", *args.overrides]
        cfg = ablation.arm_config(arm, "cpu", base)
        print(f"network: {cfg.model.name} width {cfg.model.width}, batch {cfg.train.batch_size} x 4 x "
              f"{'x'.join(map(str, cfg.data.patch_size))}, deep supervision {cfg.model.deep_supervision}; "
              f"{args.cases} phantom cases {'x'.join(map(str, shape))}")
        rows = []
        for name in args.precisions:
            run_cfg = ablation.arm_config(arm, "cpu", [
                *base, f"train.amp={'off' if name == 'fp32' else name}", f"train.epochs={args.epochs}",
                "train.swa.enabled=false", f"train.val_every={args.epochs}"])
            dtype = autocast_dtype(run_cfg.train.amp, CPU)
            step, fwd_bwd = floor(run_cfg, dtype, args.repeats)
            data = data_alone(run_cfg, dataset, batches=2 * args.repeats)
            trained, steps = trainer(run_cfg, Path(tmp) / f"store-{name}")
            rows.append((name, step, fwd_bwd, trained, trained / step, data, data / trained))
            print(f"  {name}: done ({steps} steps per epoch)", flush=True)
    print(f"\n{'precision':9s} {'floor s/step':>12s} {'fwd+bwd':>8s} {'trainer':>8s} {'trainer/floor':>13s} "
          f"{'data s/batch':>12s} {'data share':>10s}")
    for name, step, fwd_bwd, trained, ratio, data, share in rows:
        print(f"{name:9s} {step:12.3f} {fwd_bwd:8.3f} {trained:8.3f} {ratio:12.2f}x {data:12.3f} {100 * share:9.1f}%")
    if len(rows) == 2:
        print(f"\nbf16 / fp32, the floor: {rows[1][1] / rows[0][1]:.2f}x (above 1: bf16 is slower on this CPU)")


if __name__ == "__main__":
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # each measurement's store: a folder of its own
    main()
