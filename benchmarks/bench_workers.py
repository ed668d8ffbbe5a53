"""Platform overhead under several workers: trials per hour with N worker processes against one,
on the same cores and the same grid of tiny trials.

    python benchmarks/bench_workers.py                          # 1 and 3 workers, 2 arms x 3 folds
    python benchmarks/bench_workers.py --workers 1 3 1 3 --json out.json  # each count twice
    python benchmarks/bench_workers.py --threads 1                # one thread per worker, whatever N

For each worker count: a fresh project folder with the embedded stores (MLflow in SQLite,
Optuna in SQLite), the study launched in this process (`launch`), then N `brats-lab worker`
processes started together, each with cores/N threads (at least 1), as `brats-lab ablate
--workers N` gives them. The clock runs from their start until the last one exits, so it counts
everything a worker pays: Python and torch start-up, claiming trials, MLflow logging, checkpoints,
the final evaluation and the per-case table, on top of training. The phantom dataset and its
cache are made once, before any clock starts, and shared.

Reported per worker count: wall seconds, trials per hour, the ratio to the first count, CPU
seconds per trial (user + system of the worker processes: on a machine shared with other jobs,
where more processes also get a larger share of the CPU, this is the fair measure of overhead),
and the mean of the trials' own wall time (the fold runs' `wall_seconds` tag, from data loading to
the logged table). A count given twice is timed twice, to see the noise. Trials are tiny on
purpose (width-4 network, 32^3 patches, a few epochs), so the platform's own share is as large as
it gets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ABLATION = """
name = "bench-workers"
description = "two tiny arms, for timing the platform under several workers"
pipeline = "A"
baseline = "equiunet"
folds = {folds}

[arms]
equiunet = ["model.name=equiunet", {tiny}]
att_equiunet = ["model.name=att_equiunet", {tiny}]
"""


def tiny(folds: int, epochs: int) -> list[str]:
    return ["model.width=4", "data.patch_size=[32, 32, 32]", f"data.folds={folds}", "train.batch_size=2",
            f"train.epochs={epochs}", "train.swa.enabled=false", "train.val_every=1", "train.amp=off"]


def run(workers: int, toml: Path, dataset: Path, folds: int, project: Path, threads: int | None) -> dict:
    from brats_lab import tracking
    from brats_lab.ablation.study import DEFAULT_STORAGE, launch, make_plan

    project.mkdir()
    os.chdir(project)  # the embedded stores live under mlruns/ of the current folder
    plan = make_plan(str(toml), "cpu", folds, str(dataset), DEFAULT_STORAGE)
    launch(plan)
    cores = os.cpu_count() or 1
    threads = threads or max(1, cores // workers)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "brats_lab.cli", "worker", "--study", plan.study_name, "--storage", DEFAULT_STORAGE, "--quiet"]
    cpu_before = _children_cpu()
    started = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(workers)]
    outputs = [p.communicate() for p in procs]
    wall = time.perf_counter() - started
    cpu = _children_cpu() - cpu_before
    if any(p.returncode for p in procs):
        sys.exit("a worker failed:\n" + "\n".join(err[-2000:] for _, err in outputs))
    runs = tracking.find_runs(plan.experiment, {"kind": "fold"}, statuses=("FINISHED",))
    if len(runs) != len(plan.cells()):
        sys.exit(f"{workers} workers finished {len(runs)} trials of {len(plan.cells())}")
    per_trial = [float(r.tags["wall_seconds"]) for r in runs]
    return {"workers": workers, "threads_each": threads, "trials": len(runs), "wall_s": wall,
            "trials_per_hour": len(runs) / wall * 3600, "cpu_s_per_trial": cpu / len(runs),
            "mean_trial_s": statistics.mean(per_trial),
            "ran_per_worker": sorted(int(out.split("ran ")[1].split()[0]) for out, _ in outputs)}


def _children_cpu() -> float:
    """User + system CPU seconds of the child processes waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 3], help="worker counts to time (the first is the reference)")
    parser.add_argument("--folds", type=int, default=3, help="folds per arm (2 arms)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial")
    parser.add_argument("--cases", type=int, default=6, help="phantom cases (48 x 48 x 32)")
    parser.add_argument("--threads", type=int, default=None, help="threads per worker (default: cores / workers, at least 1)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    from brats_lab.ablation.spec import load_ablation
    from brats_lab.data.cache import prepare
    from brats_lab.data.phantom import synthesize

    with tempfile.TemporaryDirectory(prefix="bench_workers_") as tmp:
        root = Path(tmp)
        dataset = root / "phantom"
        synthesize(dataset, cases=args.cases, seed=0, shape=(48, 48, 32), progress=False)
        toml = root / "bench.toml"
        toml.write_text(ABLATION.replace("{folds}", str(args.folds))
                        .replace("{tiny}", ", ".join(f'"{s}"' for s in tiny(args.folds, args.epochs))))
        ablation = load_ablation(str(toml))
        prepare(dataset, ablation.arm_config(ablation.baseline, "cpu").data.normalization, progress=False)

        load_before, here = os.getloadavg()[0], Path.cwd()
        try:
            results = []
            for i, n in enumerate(args.workers):  # a count given twice is timed twice, for the noise
                results.append(run(n, toml, dataset, args.folds, root / f"run{i}-{n}-workers", args.threads))
                print(f"{n} workers: {results[-1]['wall_s']:.1f} s", flush=True)
        finally:
            os.chdir(here)
        load_after = os.getloadavg()[0]

    reference = results[0]["trials_per_hour"]
    print(f"{len(ablation.arms)} arms x {args.folds} folds = {results[0]['trials']} trials of {args.epochs} epochs; "
          f"{os.cpu_count()} cores; load average {load_before:.1f} before, {load_after:.1f} after")
    print(f"{'workers':>7} {'threads each':>12} {'wall s':>8} {'trials/h':>9} {'ratio':>6} {'CPU s/trial':>11} "
          f"{'mean trial s':>12}  trials per worker")
    for r in results:
        print(f"{r['workers']:>7} {r['threads_each']:>12} {r['wall_s']:>8.1f} {r['trials_per_hour']:>9.0f} "
              f"{r['trials_per_hour'] / reference:>5.2f}x {r['cpu_s_per_trial']:>11.1f} {r['mean_trial_s']:>12.1f}  {r['ran_per_worker']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
