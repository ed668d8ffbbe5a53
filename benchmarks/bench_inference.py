"""Time per case of the paper's 80-prediction setting (5 folds x 16 TTA views), views batched
against one view at a time, in one process.

    python benchmarks/bench_inference.py                   # cpu profile models, here
    python benchmarks/bench_inference.py --profile paper   # width 48 on a full-size brain: a GPU

The input is a brain crop of a 240 x 240 x 155 case padded to a multiple of 16 (144 x 176 x 144
voxels, about the BraTS brain's bounding box; scaled to the phantom grid for --profile cpu). The
five models have random weights: speed does not depend on them. Needs only torch, so it runs on a
GPU machine without the data stack. Time per case covers the forwards, the inverse views and the
average, not reading or writing NIfTI.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from brats_lab.config import load_config, pipeline_path
from brats_lab.inference.tta import predict_tta
from brats_lab.models import build_model
from brats_lab.training.step import Compute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu", help="cpu or paper")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = load_config(pipeline_path("A"), args.profile)
    shape = (144, 176, 144) if args.profile == "paper" else (64, 80, 64)  # 1 mm, or the 2.5 mm phantoms
    dtype = torch.bfloat16 if device.type == "cuda" else None
    torch.backends.cudnn.benchmark = device.type == "cuda"
    models = []
    for fold in range(args.folds):
        torch.manual_seed(fold)
        models.append(build_model(cfg.model).to(device).eval())
    x = torch.randn(1, 4, *shape, device=device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {cfg.model.name} width {cfg.model.width}, {args.folds} folds x 16 views, input {shape}, "
          f"{'bf16' if dtype else 'float32'}")

    def case(batch_views: int | None) -> float:
        tic = time.perf_counter()
        with Compute(device, dtype).autocast():
            total = sum(predict_tta(m, x, batch_views=batch_views) for m in models)
        (total / len(models)).sum().item()  # synchronises
        return time.perf_counter() - tic

    results = {}
    for label, batch_views in (("one view at a time", 1), ("views batched", None)):
        case(batch_views)  # warm-up: cuDNN autotuning, allocator
        results[label] = min(case(batch_views) for _ in range(args.repeats))
        print(f"{label:20s} {results[label]:8.2f} s per case")
    ratio = results["one view at a time"] / results["views batched"]
    print(f"batched views: {ratio:.2f}x faster")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "profile": args.profile, "seconds_per_case": results}, indent=1))


if __name__ == "__main__":
    main()
