"""The CPU half of `benchmarks/gpu_e2e.sh`: the GPU check's own steps, run by the script itself
with `--cpu` (profile cpu, a tiny network, small phantoms): train B, SIGKILL it after its first
checkpoint, resume it, train A with SWA snapshots, predict each arm with TTA on held-out cases,
merge, evaluate, time the step alone, and write the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about a minute of CPU: ten fresh processes, each importing torch and MLflow
def test_gpu_e2e_script_runs_its_steps_on_cpu(tmp_path: Path) -> None:
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "E2E_WORK": str(work), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_e2e.sh"), "--cpu"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]

    report = json.loads((out / "e2e.json").read_text())
    # The script's settings: A 2 epochs + 1 SWA cycle of 2 (snapshot every epoch), B 4 epochs.
    expected_epochs = {"A": [0, 1, 2, 3], "B": [0, 1, 2, 3]}
    for name, pipeline in report["pipelines"].items():
        assert pipeline["status"] == "FINISHED"
        assert [e["epoch"] for e in pipeline["epochs"]] == expected_epochs[name]
        for epoch in pipeline["epochs"]:
            assert min(epoch["data_seconds"], epoch["step_seconds"], epoch["val_seconds"]) >= 0
        assert pipeline["gpu_memory_peak_gib"] is None  # measured on a GPU only
        assert pipeline["bench_train_samples_per_s"] > 0 and pipeline["samples_per_s_steps"] > 0
        assert all(v is not None for v in pipeline["final"].values())
    assert report["pipelines"]["A"]["final_model"] == "average of 2 snapshots"

    # B was killed before it finished, and the same run (the report found one) was resumed.
    assert "killed pipeline B" in (out / "steps.log").read_text()
    assert "mean Dice" not in (out / "train_B_killed.log").read_text()
    assert "mean Dice" in (out / "train_B.log").read_text()
    # Two held-out cases predicted by each arm with TTA, merged and scored.
    for name in ("A", "B", "merged"):
        assert report["heldout"][name]["cases"] == 2
        assert sorted(p.name for p in (work / f"pred_{name}").glob("*.nii.gz")) == [
            "BraTS20_Training_001.nii.gz", "BraTS20_Training_002.nii.gz"]
    assert (out / "e2e.md").read_text().startswith("# gpu_e2e.sh")
