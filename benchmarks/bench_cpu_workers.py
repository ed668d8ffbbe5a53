"""One training process on every core, or one single-threaded process per core? (the CPU demo)

    python benchmarks/bench_cpu_workers.py                  # the attention demo's two arms
    python benchmarks/bench_cpu_workers.py --steps 20 --ablation handicap

`brats-lab ablate` on a CPU starts one worker per core, each training its own run on one thread
(`--workers`, brats_lab/ablation/study.py). This measures why, on the machine it runs on: the
trainer's step on a fixed batch (bench_cpu_step.py's floor) for the ablation's arms in turn,
  one process    all cores' threads, the arms one after the other (what `--workers 1` does)
  per core       one process per core at one thread each, all at once, each running the arms
and prints the steps per second of each and their ratio. Small 3D convolutions spread over two
threads waste much of the second core; two runs side by side do not.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time

import torch

from bench_cpu_step import fixed_step  # this folder, as a script runs it
from brats_lab.ablation.spec import load_ablation


def steps_seconds(ablation_name: str, threads: int, steps: int, start=None) -> float:
    """Seconds for `steps` float32 steps of every arm of the ablation, after a warm-up."""
    torch.set_num_threads(threads)
    ablation = load_ablation(ablation_name)
    calls = [fixed_step(ablation.arm_config(arm, "cpu", ["train.amp=off"]), None)[0] for arm in ablation.arms]
    for call in calls:
        call()
        call()
    if start is not None:
        start.wait()  # every process starts timing together
    tic = time.perf_counter()
    for call in calls:
        for _ in range(steps):
            call()
    return time.perf_counter() - tic


def _child(ablation_name: str, steps: int, start, results) -> None:
    results.put(steps_seconds(ablation_name, 1, steps, start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ablation", default="attention", help="the ablation whose CPU demo is measured")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per arm and process")
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each, the best kept")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    arms = len(load_ablation(args.ablation).arms)
    print(f"{cores} cores, torch {torch.__version__}; {arms} arms of {args.ablation!r}, {args.steps} float32 steps each")
    one = min(steps_seconds(args.ablation, cores, args.steps) for _ in range(args.repeats))
    one_rate = arms * args.steps / one
    spawn = mp.get_context("spawn")
    per_core = float("inf")
    for _ in range(args.repeats):
        start, results = spawn.Barrier(cores), spawn.Queue()
        children = [spawn.Process(target=_child, args=(args.ablation, args.steps, start, results)) for _ in range(cores)]
        for child in children:
            child.start()
        seconds = [results.get() for _ in children]
        for child in children:
            child.join()
        per_core = min(per_core, max(seconds))
    per_core_rate = cores * arms * args.steps / per_core
    print(f"one process, {cores} threads:      {one_rate:6.2f} steps/s")
    print(f"{cores} processes, 1 thread each: {per_core_rate:6.2f} steps/s")
    print(f"per core / one process: {per_core_rate / one_rate:.2f}x")


if __name__ == "__main__":
    main()
