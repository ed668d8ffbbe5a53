"""Ablations end to end: a real Optuna storage, real MLflow runs, real worker processes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from brats_lab import tracking
from brats_lab.ablation.spec import load_ablation
from brats_lab.ablation.study import DEFAULT_STORAGE, launch, make_plan, run_study
from brats_lab.config import ConfigError
from conftest import TINY_TRAINING, tiny_ablation

ABLATION = tiny_ablation()


@pytest.fixture
def project(phantom_dataset: Path, tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(phantom_dataset, tmp_path / "phantom")
    (tmp_path / "tiny.toml").write_text(ABLATION)
    return tmp_path / "tiny.toml", tmp_path / "phantom"


def fold_runs(experiment: str) -> list:
    return tracking.find_runs(experiment, {"kind": "fold"})


def test_a_study_trains_every_arm_and_fold_once_reports_and_reuses(project):
    toml, data = project
    plan = make_plan(str(toml), "cpu", None, str(data), DEFAULT_STORAGE)
    result = run_study(plan, progress=False)

    runs = fold_runs(plan.experiment)
    assert sorted((r.tags["config_hash"][:8], r.tags["fold"]) for r in runs) == sorted(
        {(r.tags["config_hash"][:8], r.tags["fold"]) for r in runs})  # no (arm, fold) twice
    assert len(runs) == 4 and all(r.status == "FINISHED" for r in runs)
    (study_run,) = tracking.find_runs(plan.experiment, {"kind": "study"})
    arms = tracking.find_runs(plan.experiment, {"kind": "arm"})
    assert {a.parent_id for a in arms} == {study_run.id} and {r.parent_id for r in runs} == {a.id for a in arms}
    assert study_run.status == "FINISHED" and {a.status for a in arms} == {"FINISHED"}
    assert list(result.table.index) == ["equiunet", "att_equiunet"]
    assert set(result.comparison["metric"]) == {f"{m}_{r}" for m in ("dice", "hd95") for r in ("ET", "TC", "WT")}
    assert result.per_case.groupby("arm")["case"].nunique().tolist() == [4, 4]  # every case out of fold, per arm
    text = result.text()
    assert "att_equiunet" in text and "Wilcoxon" in text
    artifacts = {p.name for p in study_run.artifact_dir().iterdir()}
    assert {"report.md", "table3.csv", "comparison.csv", "per_case_out_of_fold.csv"} <= artifacts

    # The same command again does no work twice.
    again = run_study(plan, progress=False)
    assert len(fold_runs(plan.experiment)) == 4
    assert again.table.equals(result.table)
    study = optuna.load_study(study_name=plan.study_name, storage=DEFAULT_STORAGE)
    assert len(study.trials) == 4


def test_two_worker_processes_share_the_grid_without_duplicates(project, tmp_path):
    toml, data = project
    plan = make_plan(str(toml), "cpu", None, str(data), DEFAULT_STORAGE)
    launch(plan)
    workers = [subprocess.Popen([sys.executable, "-m", "brats_lab.cli", "worker", "--study", plan.study_name,
                                 "--storage", DEFAULT_STORAGE, "--quiet"], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [w.communicate(timeout=600) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [o[1][-2000:] for o in outputs]
    ran = sorted(int(o[0].split("ran ")[1].split()[0]) for o in outputs)
    assert sum(ran) == 4 and ran[0] >= 1, outputs  # both worked, together exactly the grid
    runs = fold_runs(plan.experiment)
    assert len(runs) == 4 and len({(r.tags["config_hash"], r.tags["fold"]) for r in runs}) == 4
    study = optuna.load_study(study_name=plan.study_name, storage=DEFAULT_STORAGE)
    assert sorted((t.user_attrs["arm"], t.user_attrs["fold"]) for t in study.trials) == sorted(plan.cells())
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_shipped_ablations_load_and_bad_ones_are_named(tmp_path):
    for name in ("attention", "norm"):
        ablation = load_ablation(name)
        assert ablation.baseline in ablation.arms and ablation.fold_count("cpu") == 2
    with pytest.raises(ConfigError, match="did you mean 'attention'"):
        load_ablation("atention")
    bad = tmp_path / "bad.toml"
    bad.write_text('foldz = 3\n' + ABLATION)
    with pytest.raises(ConfigError, match="unknown key 'foldz'.*did you mean 'folds'"):
        load_ablation(str(bad))
    bad.write_text(ABLATION + 'broken = 3\n')  # lands in [arms]
    with pytest.raises(ConfigError, match="arm 'broken'.*list"):
        load_ablation(str(bad))


REMOVAL = """
name = "tiny-removal"
pipeline = "A"
baseline = "all-cases"
folds = 2

[arms]
all-cases = [{tiny}]
without-worst = [{tiny}]

[removal]
arm = "without-worst"
metric = "dice_WT"
fraction = 0.25
""".replace("{tiny}", ", ".join(f'"{s}"' for s in TINY_TRAINING))


def test_patient_removal_retrains_without_the_worst_cases_and_names_them(project):
    toml, data = project
    toml.write_text(REMOVAL)
    plan = make_plan(str(toml), "cpu", None, str(data), DEFAULT_STORAGE)
    result = run_study(plan, progress=False)

    (removed,) = result.plan.excluded  # 25% of 4 cases
    baseline = result.per_case[result.per_case["arm"] == "all-cases"]
    assert baseline.groupby("case")["dice_WT"].mean().idxmin() == removed  # the worst-scored case
    (study_run,) = tracking.find_runs(plan.experiment, {"kind": "study"})
    assert study_run.tags["removed_cases"] == removed
    runs = fold_runs(plan.experiment)
    assert len(runs) == 4
    without = [r for r in runs if r.params["data.exclude"] != "[]"]
    assert len(without) == 2 and all(removed in r.params["data.exclude"] for r in without)
    assert int(without[0].tags["train_cases"]) == 1  # 2 training cases per fold, one removed in either fold
    assert f"left out of training in 'without-worst' (1): {removed}" in result.text()
    # Both arms are scored on every case, the removed one included.
    assert result.per_case.groupby("arm")["case"].nunique().tolist() == [4, 4]


def test_a_killed_worker_is_detected_and_its_fold_resumes_not_restarts(project, tmp_path, monkeypatch):
    import signal
    import time

    from brats_lab.ablation import study as study_module

    toml, data = project
    toml.write_text(ABLATION.replace('"train.epochs=2"', '"train.epochs=8"'))
    plan = make_plan(str(toml), "cpu", 1, str(data), DEFAULT_STORAGE)
    launch(plan)
    env = {**__import__("os").environ, "BRATS_LAB_HEARTBEAT_SECONDS": "1", "BRATS_LAB_GRACE_SECONDS": "3"}
    worker = subprocess.Popen([sys.executable, "-m", "brats_lab.cli", "worker", "--study", plan.study_name,
                               "--storage", DEFAULT_STORAGE, "--quiet"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not list((tmp_path / "mlruns" / "artifacts").rglob("checkpoints/last.pt")):
        assert worker.poll() is None, worker.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker.send_signal(signal.SIGKILL)  # no clean-up: its trial stays RUNNING, its fold run too
    worker.wait()
    (killed,) = tracking.find_runs(plan.experiment, {"kind": "fold"}, statuses=("RUNNING",))
    time.sleep(4)  # past the grace period

    monkeypatch.setattr(study_module, "GRACE_SECONDS", 3)
    monkeypatch.setattr(study_module, "HEARTBEAT_SECONDS", 1)
    result = run_study(plan, progress=False)
    runs = fold_runs(plan.experiment)
    assert len(runs) == 2 and all(r.status == "FINISHED" for r in runs)  # one per (arm, fold): no restart
    assert killed.id in {r.id for r in runs}  # the killed fold's own run, resumed and finished
    steps = [s for s, _ in tracking.get_run(killed.id).metric_history("train_loss")]
    assert sorted(set(steps)) == list(range(8))
    # No per-case result lost or counted twice: each held-out case of fold 0 exactly once per arm,
    # in the report and in the out-of-fold table logged on the study run.
    import pandas as pd

    val_cases = sorted(pd.read_csv(tracking.get_run(killed.id).artifact_dir() / "per_case_metrics.csv")["case"])
    assert len(val_cases) == 2 and len(set(val_cases)) == 2  # 4 cases in 2 folds
    (study_run,) = tracking.find_runs(plan.experiment, {"kind": "study"})
    for table in (result.per_case, pd.read_csv(study_run.artifact_dir() / "per_case_out_of_fold.csv")):
        assert len(table) == 4 and not table.duplicated(["arm", "case"]).any()
        assert {arm: sorted(cases) for arm, cases in table.groupby("arm")["case"]} == {
            "equiunet": val_cases, "att_equiunet": val_cases}
    study = optuna.load_study(study_name=plan.study_name, storage=DEFAULT_STORAGE)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]  # the dead worker's trial failed, then retried


def test_an_ablation_can_ask_optuna_to_search_hyperparameters(project):
    toml, data = project
    toml.write_text(ABLATION + """
[search]
trials = 2
seed = 1
[search.params]
"optim.lr" = {low = 1e-4, high = 1e-2, log = true}
""")
    plan = make_plan(str(toml), "cpu", 1, str(data), DEFAULT_STORAGE)
    result = run_study(plan, progress=False)
    assert list(result.search.columns) == ["optim.lr", "mean_dice_WT"] and len(result.search) == 2
    assert result.search["mean_dice_WT"].is_monotonic_decreasing
    assert all(1e-4 <= lr <= 1e-2 for lr in result.search["optim.lr"])
    lrs = {r.params["optim.lr"] for r in tracking.find_runs(plan.experiment, {"kind": "fold"})}
    assert len(lrs) == 3  # the two arms' lr plus two sampled ones: 1 + 2
    assert "search around 'equiunet' (2 trials" in result.text()
    run_study(plan, progress=False)  # again: the search is complete, nothing more is trained
    assert len(tracking.find_runs(plan.experiment, {"kind": "fold"})) == 4


def test_workers_option_runs_trials_in_parallel_processes(project):
    toml, data = project
    plan = make_plan(str(toml), "cpu", None, str(data), DEFAULT_STORAGE)
    result = run_study(plan, workers=2, progress=False)
    runs = fold_runs(plan.experiment)
    assert len(runs) == 4 and len({(r.tags["config_hash"], r.tags["fold"]) for r in runs}) == 4
    pids = {r.tags.get("pid") for r in runs}
    assert len(pids) == 2, pids  # both processes trained
    assert len(result.per_case) == 8
