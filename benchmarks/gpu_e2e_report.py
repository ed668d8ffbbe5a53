"""The summary of a `gpu_e2e.sh` run: read back from its MLflow store and output folder.

    python benchmarks/gpu_e2e_report.py --root build/e2e-work --out build/gpu-e2e --cases 10

Writes `e2e.json` and `e2e.md` to `--out`: per pipeline, each epoch's wall time split into data
wait / training steps / validation (the trainer's `epoch_*_seconds` metrics), the GPU memory
peak, the training samples per second of the steps against `bench_train.py`'s step-only figure
for the same config, the fold's final validation metrics; then the held-out cases' mean metrics
of A, B and the merge (from `evaluate`'s CSVs) and the seconds `predict --tta` took.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pandas as pd

from brats_lab import tracking
from brats_lab.labels import REGIONS

SPLIT = ("epoch_data_seconds", "epoch_step_seconds", "epoch_val_seconds", "epoch_seconds")


def pipeline_summary(run: tracking.Run, bench: dict | None) -> dict:
    """Per-epoch split, memory peak, samples/s and final metrics of one fold run."""
    # A resumed run may log an epoch twice (killed after logging it, before its checkpoint):
    # the later value is the epoch that counts.
    history = {key: dict(run.metric_history(key)) for key in (*SPLIT, "gpu_memory_peak_gib", "train_loss")}
    train_cases = int(run.tags["train_cases"])
    batches = -(-train_cases // int(run.params["train.batch_size"]))
    epochs = []
    for epoch in sorted(history["epoch_seconds"]):
        row = {"epoch": epoch, **{k.removeprefix("epoch_"): history[k].get(epoch) for k in SPLIT}}
        row["train_loss"] = history["train_loss"].get(epoch)
        row["samples_per_s_steps"] = train_cases / row["step_seconds"] if row["step_seconds"] else None
        epochs.append(row)
    # The first epoch pays for warm-up (cuDNN autotuning, allocator); the steady state is after it.
    steady = [e for e in epochs[1:] if e["samples_per_s_steps"]] or epochs
    rate = sum(e["samples_per_s_steps"] or 0 for e in steady) / len(steady)
    step_only = bench["results"][0]["samples_per_s"] if bench and bench.get("results") else None
    metrics = run.metrics()
    return {
        "run_id": run.id, "status": run.status, "final_model": run.tags.get("final_model"),
        "device": run.tags.get("device"), "amp": run.tags.get("amp"), "train_cases": train_cases, "batches_per_epoch": batches,
        "epochs": epochs,
        "gpu_memory_peak_gib": max(history["gpu_memory_peak_gib"].values(), default=None),
        "samples_per_s_steps": rate, "bench_train_samples_per_s": step_only,
        "trainer_vs_bench": rate / step_only if step_only else None,
        "data_wait_share": sum(e["data_seconds"] for e in steady) / max(sum(e["data_seconds"] + e["step_seconds"] for e in steady), 1e-12),
        "final": {f"{m}_{r}": metrics.get(f"final_{m}_{r}") for m in ("dice", "hd95") for r in REGIONS},
        "wall_seconds": run.tags.get("wall_seconds"),
    }


def heldout_summary(out: Path) -> dict:
    """Mean Dice and HD95 per region of each prediction set on the held-out cases."""
    summary = {}
    for name in ("A", "B", "merged"):
        table = pd.read_csv(out / f"evaluate_{name}.csv")
        summary[name] = {"cases": len(table), **{f"{m}_{r}": float(table[f"{m}_{r}"].mean()) for m in ("dice", "hd95") for r in REGIONS}}
        seconds = out / f"predict_{name}.seconds"
        if seconds.is_file():
            start, end = map(float, seconds.read_text().split())
            summary[name]["predict_tta_seconds"] = end - start
    return summary


def markdown(report: dict) -> str:
    lines = [f"# gpu_e2e.sh: {report['device']}", ""]
    for name, p in report["pipelines"].items():
        lines += [f"## pipeline {name} (run {p['run_id']}, {p['status']}, amp {p['amp']}, final model: {p['final_model']})", "",
                  "| epoch | data wait s | steps s | validation s | epoch s | train loss | samples/s (steps) |",
                  "|---|---|---|---|---|---|---|"]
        for e in p["epochs"]:
            lines.append(f"| {e['epoch']} | {e['data_seconds']:.2f} | {e['step_seconds']:.2f} | {e['val_seconds']:.2f} | "
                         f"{e['seconds']:.2f} | {e['train_loss']:.4f} | {e['samples_per_s_steps']:.2f} |")
        peak = f"{p['gpu_memory_peak_gib']:.2f} GiB" if p["gpu_memory_peak_gib"] is not None else "n/a (CPU)"
        bench = f"{p['bench_train_samples_per_s']:.2f}" if p["bench_train_samples_per_s"] else "n/a"
        ratio = f"{p['trainer_vs_bench']:.2f}x" if p["trainer_vs_bench"] else "n/a"
        lines += ["", f"GPU memory peak {peak}; steps {p['samples_per_s_steps']:.2f} samples/s after epoch 0 against "
                      f"bench_train.py's {bench} ({ratio}); data wait {100 * p['data_wait_share']:.1f}% of the training time; "
                      f"wall {p['wall_seconds']} s.",
                  "Final validation (fold 0): " + ", ".join(f"Dice {r} {p['final'][f'dice_{r}']:.3f}" for r in REGIONS), ""]
    lines += ["## held-out cases", "", "| predictions | cases | Dice ET | Dice TC | Dice WT | HD95 ET | HD95 TC | HD95 WT | predict --tta s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, h in report["heldout"].items():
        tta = f"{h['predict_tta_seconds']:.1f}" if "predict_tta_seconds" in h else "-"
        lines.append(f"| {name} | {h['cases']} | " + " | ".join(f"{h[f'{m}_{r}']:.3f}" for m in ("dice", "hd95") for r in REGIONS) + f" | {tta} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True, help="the folder gpu_e2e.sh worked in (holds mlruns/)")
    parser.add_argument("--out", type=Path, required=True, help="gpu_e2e.sh's output folder")
    parser.add_argument("--cases", type=int, required=True, help="training phantoms written")
    args = parser.parse_args()
    out = args.out.resolve()
    os.chdir(args.root)  # the embedded MLflow store is mlruns/ there
    from brats_lab.training.trainer import EXPERIMENT

    pipelines = {}
    for name in ("A", "B"):
        runs = [r for r in tracking.find_runs(EXPERIMENT, {"kind": "fold"}) if r.params.get("pipeline") == name]
        if len(runs) != 1:  # B was killed and resumed: still one run
            raise SystemExit(f"expected one fold run of pipeline {name}, found {len(runs)}")
        bench_path = out / f"bench_train_{name}.json"
        bench = json.loads(bench_path.read_text()) if bench_path.is_file() else None
        pipelines[name] = pipeline_summary(runs[0], bench)
    gpu = out / "gpu.txt"
    device = gpu.read_text().strip() if gpu.is_file() else pipelines["A"]["device"]
    report = {"device": device, "training_cases": args.cases, "pipelines": pipelines, "heldout": heldout_summary(out)}
    (out / "e2e.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "e2e.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
