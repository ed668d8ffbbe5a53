"""Training-step throughput: the paper's setup against faster paths, in one process.

    python benchmarks/bench_train.py                      # cpu profile (here: 2 cores)
    python benchmarks/bench_train.py --profile paper      # width 48, 128^3: for a GPU
    python benchmarks/bench_train.py --profile paper --json out.json

One step = forward, the deep-supervision Dice loss, backward, optimizer step, on a batch of the
profile's patch size. Variants:

    paper      eager, fp16 autocast with loss scaling on a GPU (float32 on CPU), as the paper
    bf16       eager, bf16 autocast (no loss scaling needed)
    bf16+tune  bf16 + cuDNN autotuning (torch.backends.cudnn.benchmark)
    cl+bf16    channels_last_3d memory format + bf16 + autotuning
    compiled   torch.compile + bf16 + autotuning

Reported: samples/s, the ratio to `paper`, peak memory, and on a GPU the model FLOP utilisation
(FLOPs of one step, counted by torch's FlopCounterMode, per second, over the device's dense peak).
The data loader is measured on real phantom files too: patches/s from the cache with the profile's
augmentation, to check that it keeps up with the step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from brats_lab.config import load_config, pipeline_path
from brats_lab.models import build_model
from brats_lab.training.losses import make_loss
from brats_lab.training.optim import build_optimizer
from brats_lab.training.step import Compute, Step, train_step

# Dense bf16/fp16 tensor-core peaks, TFLOP/s (vendor datasheets, without sparsity).
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def device_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key.replace(" ", "") in name.replace(" ", ""):
            return tflops * 1e12
    return None


def make_step(cfg, device: torch.device, variant: str):
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    channels_last = variant == "cl+bf16"
    # Autotuning picks the fastest cuDNN algorithm per shape: worth it when shapes repeat (patches).
    torch.backends.cudnn.benchmark = variant not in ("paper", "bf16")
    if channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    forward = torch.compile(model) if variant == "compiled" else model
    optimizer = build_optimizer(model.parameters(), cfg.optim)
    dtype = {"paper": torch.float16 if device.type == "cuda" else None}.get(variant, torch.bfloat16)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    loss_fn = make_loss(cfg.train.loss, cfg.train.dice_eps)
    batch = cfg.train.batch_size
    image = torch.randn(batch, 4, *cfg.data.patch_size, device=device)
    if channels_last:
        image = image.contiguous(memory_format=torch.channels_last_3d)
    target = torch.rand(batch, 3, *cfg.data.patch_size, device=device) > 0.7
    model.train()
    how = Step(forward, loss_fn, cfg.train.deep_supervision_weighting, Compute(device, dtype), channels_last)

    def step() -> None:  # the trainer's own step
        train_step(how, image, target, optimizer, scaler)

    return step, model, image


def count_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def time_step(step, device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per step, after warm-up (compilation, cuDNN autotuning)."""
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - tic) / steps


def loader_rate(cfg, seconds: float = 10.0) -> float:
    """Training patches per second from a phantom cache on disk, in the main process."""
    from brats_lab.data.cache import prepare
    from brats_lab.data.dataset import TrainPatches
    from brats_lab.data.phantom import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        synthesize(Path(tmp), cases=4, seed=0, progress=False)  # full 240 x 240 x 155 cases
        cache = prepare(Path(tmp), cfg.data.normalization, progress=False)
        patches = TrainPatches(cache, cache.case_ids, cfg.data.patch_size, augment=cfg.train.augment, seed=0)
        n, tic = 0, time.perf_counter()
        while time.perf_counter() - tic < seconds:
            patches.set_epoch(n)
            for i in range(len(patches)):
                patches[i]
                n += 1
        return n / (time.perf_counter() - tic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", help="cpu or paper")
    parser.add_argument("--pipeline", default="A", choices=("A", "B"))
    parser.add_argument("--variants", nargs="+", default=["paper", "bf16", "bf16+tune", "cl+bf16", "compiled"])
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on a GPU, 5 on CPU)")
    parser.add_argument("--skip-loader", action="store_true", help="skip the data-loader measurement (needs SimpleITK)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, as `brats-lab train --set` (gpu_e2e.sh times the step it trains)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(pipeline_path(args.pipeline), args.profile, args.overrides)
    steps = args.steps or (20 if device.type == "cuda" else 5)
    peak = device_peak(device)
    batch = cfg.train.batch_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; profile {args.profile}: {cfg.model.name} width {cfg.model.width}, "
          f"patch {cfg.data.patch_size}, batch {batch}, deep supervision {cfg.model.deep_supervision}")

    results = []
    for variant in args.variants:
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            step, model, _ = make_step(cfg, device, variant)
            flops = count_flops(step) if variant == "paper" else results[0]["flops"] if results else None
            seconds = time_step(step, device, warmup=3 if variant == "compiled" else 2, steps=steps)
        except Exception as e:  # a path this torch/device cannot take is reported, not fatal
            print(f"{variant:10s} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        row = {"variant": variant, "seconds_per_step": seconds, "samples_per_s": batch / seconds, "peak_gib": memory,
               "flops": flops, "mfu": (flops / seconds / peak) if (flops and peak) else None}
        results.append(row)
        del step, model

    base = results[0]["samples_per_s"] if results else 1.0
    print(f"\n{'variant':10s} {'s/step':>8s} {'samples/s':>10s} {'x paper':>8s} {'peak GiB':>9s} {'MFU':>6s}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"{r['variant']:10s} {r['seconds_per_step']:8.3f} {r['samples_per_s']:10.2f} "
              f"{r['samples_per_s'] / base:7.2f}x {r['peak_gib']:9.2f} {mfu:>6s}")
    if results and results[0]["flops"]:
        print(f"FLOPs per step (forward + backward): {results[0]['flops'] / 1e12:.2f} TFLOP")
    rate = None
    if not args.skip_loader:
        rate = loader_rate(cfg)
        best = max((r["samples_per_s"] for r in results), default=0.0)
        print(f"data loader: {rate:.1f} patches/s per process from full-size phantom files "
              f"({'keeps up' if rate >= best else f'needs {best / rate:.1f} worker processes'} with the fastest step)")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "profile": args.profile, "results": results, "loader_patches_per_s": rate}, indent=1))


if __name__ == "__main__":
    main()
