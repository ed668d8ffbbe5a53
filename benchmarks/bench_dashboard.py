"""Time each dashboard page on a study of 2 arms x 5 folds x 40 cases: first open (cold caches)
against the next open of the same page (warm), in one process.

    python benchmarks/bench_dashboard.py                     # 40 phantoms at the demo's 96 x 96 x 62
    python benchmarks/bench_dashboard.py --shape 240 240 155 # full-size volumes on the Cases page

Builds a real store in a temporary folder the way the ablation writes one (study, arm and fold
runs in SQLite, per-case tables, per-epoch metrics, one prediction NIfTI per case and fold run, a
comparison table), then runs the app with Streamlit's AppTest: each page's script run, store
reads and pictures included, the browser's drawing not. Cold: a fresh app session with
Streamlit's caches cleared; warm: the same page again in that session (what a click costs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from brats_lab import tracking

ARMS = ("equiunet", "att_equiunet")
APP = Path(__file__).resolve().parents[1] / "dashboard" / "app.py"


def build_store(root: Path, cases: int, folds: int, epochs: int, shape: tuple[int, int, int]) -> None:
    from brats_lab.data.cases import discover
    from brats_lab.data.phantom import synthesize
    from brats_lab.evaluation.stats import compare_runs
    from brats_lab.io import read_image, write_image

    data = root / "phantom"
    synthesize(data, cases=cases, seed=0, shape=shape, progress=False)
    found = discover(data)
    rng = np.random.default_rng(0)
    study = tracking.start_run("ablation-bench", "bench", "study", {"study": "bench-0"}, root=root)
    study.log_params({"arms": ",".join(ARMS), "folds": str(folds), "baseline": ARMS[0]})
    per_case_all = []
    for a, arm_name in enumerate(ARMS):
        arm = tracking.arm_run("ablation-bench", f"h{a}", arm_name, {"model.name": arm_name}, parent=study)
        for fold in range(folds):
            with tracking.fold_run(arm, fold, f"{arm_name} fold {fold}") as run:
                run.log_params({"data.dataset": str(data)})
                for epoch in range(epochs):
                    run.log_metrics({"train_loss": 4.8 / (1 + epoch), "val_loss": 5.0 / (1 + epoch), "lr": 3e-3,
                                     "val_dice_ET": epoch / epochs}, step=epoch)
                rows = []
                for case in found[fold::folds]:
                    seg, geometry = read_image(case.seg, np.uint8)
                    prediction = np.roll(seg, int(rng.integers(-3, 4)), axis=2)  # a plausible miss
                    write_image(prediction, geometry, run.artifact_dir() / "predictions" / f"{case.id}.nii.gz")
                    rows.append({"case": case.id, **{f"{m}_{r}": float(rng.uniform(*span))
                                 for m, span in (("dice", (0.2, 0.95)), ("hd95", (1, 40)))
                                 for r in ("ET", "TC", "WT")}})
                table = pd.DataFrame(rows)
                run.log_table(table, "per_case_metrics.csv")
                per_case_all.append(table.assign(arm=arm_name, fold=fold))
        arm.finish()
    per_case = pd.concat(per_case_all, ignore_index=True)
    columns = [f"dice_{r}" for r in ("ET", "TC", "WT")]
    study.log_table(compare_runs(per_case, ARMS[0], columns), "comparison.csv")  # as the study writes it
    study.finish()


def time_pages(repeats: int) -> dict[str, tuple[float, float]]:
    import streamlit as st
    from streamlit.testing.v1 import AppTest

    out = {}
    for page in ("Studies", "Compare", "Cases"):
        cold, warm = [], []
        for _ in range(repeats):
            st.cache_data.clear()
            at = AppTest.from_file(str(APP), default_timeout=300)
            at.session_state["page"] = page
            tic = time.perf_counter()
            at.run()
            cold.append(time.perf_counter() - tic)
            assert not at.exception, at.exception
            tic = time.perf_counter()
            at.run()
            warm.append(time.perf_counter() - tic)
        out[page] = (statistics.median(cold), statistics.median(warm))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--shape", type=int, nargs=3, default=(96, 96, 62), help="phantom size x y z")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        tic = time.perf_counter()
        build_store(root, args.cases, args.folds, args.epochs, tuple(args.shape))
        print(f"store: {len(ARMS)} arms x {args.folds} folds x {args.cases} cases, {args.epochs} epochs, "
              f"volumes {tuple(args.shape)}, built in {time.perf_counter() - tic:.0f} s", file=sys.stderr)
        os.chdir(root)
        times = time_pages(args.repeats)
    print(f"{'page':<8} {'cold s':>7} {'warm s':>7} {'cold/warm':>9}")
    for page, (cold, warm) in times.items():
        print(f"{page:<8} {cold:7.2f} {warm:7.2f} {cold / warm:8.1f}x")


if __name__ == "__main__":
    main()
