"""Ablations end to end: a real Optuna storage, real MLflow runs, real worker processes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from brats_lab import DataError, tracking
from brats_lab.ablation import study as study_module
from brats_lab.ablation.spec import load_ablation, parse_ablation
from brats_lab.ablation.study import DEFAULT_STORAGE, Plan, default_workers, launch, make_plan, run_study
from brats_lab.config import ConfigError, config_hash, to_dict


@pytest.fixture
def project(phantom_copy: Path, tmp_path: Path, monkeypatch, tiny_ablation) -> tuple[Path, Path]:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.toml").write_text(tiny_ablation())
    return tmp_path / "tiny.toml", tmp_path / "phantom"


def fold_runs(experiment: str) -> list:
    return tracking.find_runs(experiment, {"kind": "fold"})


def test_a_study_trains_every_arm_fold_and_seed_once_reports_and_reuses(project, tiny_ablation):
    toml, data = project
    toml.write_text(tiny_ablation(seeds=2))
    plan = make_plan(str(toml), "cpu", None, str(data), DEFAULT_STORAGE)
    assert plan.seeds == (0, 1)
    result = run_study(plan, progress=False)

    runs = fold_runs(plan.experiment)
    cells = sorted((r.tags["config_hash"], r.tags["fold"], r.tags["seed"]) for r in runs)
    assert len(runs) == 8 and len(set(cells)) == 8 and all(r.status == "FINISHED" for r in runs)  # no (arm, fold, seed) twice
    # Seed k sets train.seed_index only, never the folds: both seeds of an arm and fold validate
    # the same cases. Each fold run trains with its own seed (tag run_seed), drawn from (train.seed,
    # k, fold): one per (seed, fold), the same for both arms (they share train.seed).
    assert {(r.tags["seed"], r.params["train.seed"], r.params["train.seed_index"]) for r in runs} == {
        ("0", "16111990", "0"), ("1", "16111990", "1")}
    assert {r.params["data.seed"] for r in runs} == {"16111990"}
    run_seeds = {(r.tags["seed"], r.tags["fold"], r.tags["run_seed"]) for r in runs}
    assert len(run_seeds) == 4 and len({s for *_, s in run_seeds}) == 4
    assert run_seeds == {(str(k), str(f), str(plan.config("equiunet", k).train.run_seed(f))) for k in (0, 1) for f in (0, 1)}
    (study_run,) = tracking.find_runs(plan.experiment, {"kind": "study"})
    arms = tracking.find_runs(plan.experiment, {"kind": "arm"})
    assert {a.parent_id for a in arms} == {study_run.id} and {r.parent_id for r in runs} == {a.id for a in arms}
    assert sorted((a.tags["arm"], a.tags["seed"]) for a in arms) == [
        ("att_equiunet", "0"), ("att_equiunet", "1"), ("equiunet", "0"), ("equiunet", "1")]
    assert study_run.status == "FINISHED" and {a.status for a in arms} == {"FINISHED"}
    assert study_run.params["seeds"] == "2"
    assert list(result.table.index) == ["equiunet", "att_equiunet"]
    assert set(result.comparison["metric"]) == {f"{m}_{r}" for m in ("dice", "hd95") for r in ("ET", "TC", "WT")}
    assert (result.comparison[["folds", "seeds"]] == [2, 2]).all().all()
    # Every case out of fold once per arm and seed.
    assert result.per_case.groupby(["arm", "seed"])["case"].nunique().tolist() == [4, 4, 4, 4]
    assert not result.per_case.duplicated(["arm", "seed", "case"]).any()
    # The noise floor is the seed-to-seed SD of one run's mean, recomputed here by hand. (Two
    # epochs of a tiny network predict no tumour whatever the seed, so it is 0 here; the stats
    # tests check it on values that vary.) Measured with two seeds: a number, not NaN.
    metric = "hd95_WT"
    run_means = result.per_case.groupby(["arm", "fold", "seed"])[metric].mean()
    variances = [run_means.loc[arm, fold].var(ddof=1) for arm in ("equiunet", "att_equiunet") for fold in (0, 1)]
    row = result.comparison.set_index("metric").loc[metric]
    assert result.comparison["noise_floor"].notna().all() and result.comparison["mde"].notna().all()
    assert abs(row["noise_floor"] - (sum(variances) / 4) ** 0.5) < 1e-9
    text = result.text()
    assert "2 folds x 2 seeds" in text and "noise floor" in text and "runs as the unit" in text and "Wilcoxon" not in text
    artifacts = {p.name for p in study_run.artifact_dir().iterdir()}
    assert {"report.md", "table3.csv", "comparison.csv", "comparison_per_case.csv", "seed_spread.csv",
            "per_case_out_of_fold.csv"} <= artifacts

    # The same command again does no work twice; nor does a study with fewer seeds (seed 0 is there).
    again = run_study(plan, progress=False)
    assert len(fold_runs(plan.experiment)) == 8
    assert again.table.equals(result.table)
    study = optuna.load_study(study_name=plan.study_name, storage=DEFAULT_STORAGE)
    assert sorted((t.user_attrs["arm"], t.user_attrs["fold"], t.user_attrs["seed"]) for t in study.trials) == sorted(plan.cells())
    one_seed = run_study(make_plan(str(toml), "cpu", None, str(data), DEFAULT_STORAGE, seeds=1), progress=False)
    assert len(fold_runs(plan.experiment)) == 8
    assert "One seed: the seed-to-seed noise floor is not measured" in one_seed.text()
    assert one_seed.comparison["noise_floor"].isna().all()

    # --plan reads the noise floor the 2-seed study measured (the newest finished one with seeds).
    from brats_lab.ablation.report import plan_text
    from brats_lab.evaluation.stats import minimum_detectable_effect

    floors = result.comparison.groupby("metric")["noise_floor"].first()
    if (floors > 0).any():
        planned = plan_text(plan)
        metric = floors[floors > 0].index[0]
        assert f"{metric}: noise floor {floors[metric]:.4g}" in planned and "2 folds x 2 seeds" in planned
        assert f"{minimum_detectable_effect(floors[metric], 2, 3, alpha=0.05 / 3):.4f} (12 runs)" in planned
    else:  # networks that predict nothing whatever the seed measured no noise: --plan says so, no MDE of 0
        with pytest.raises(DataError, match="no noise floor measured"):
            plan_text(plan)


def _old_hash(cfg) -> str:
    """The config hash of the same config before train.seed_index existed: what the runs seeded the
    old way (train.seed + k in every fold) carry in MLflow."""
    import hashlib
    import json

    old = to_dict(cfg)
    del old["train"]["seed_index"]
    return hashlib.sha256(json.dumps(old, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()


def test_each_fold_and_seed_trains_with_its_own_seed_and_both_arms_of_a_pair_with_the_same(tmp_path, tiny_ablation):
    toml = tmp_path / "tiny.toml"
    toml.write_text(tiny_ablation("tiny-seeds", "data.folds=3", seeds=3))
    plan = make_plan(str(toml), "cpu", 3, str(tmp_path), DEFAULT_STORAGE)
    arms = list(plan.ablation.arms)
    seeds = {(arm, k, f): plan.config(arm, k).train.run_seed(f) for arm in arms for k in plan.seeds for f in plan.folds}
    for arm in arms:  # 3 folds x 3 seeds: 9 seeds, none shared by two folds or two seeds
        assert len({s for (a, _, _), s in seeds.items() if a == arm}) == 9
    # Both arms have train.seed 16111990: in each (seed, fold) they train with the same seed.
    assert all(seeds[("equiunet", k, f)] == seeds[("att_equiunet", k, f)] for k in plan.seeds for f in plan.folds)
    # Each (arm, seed) is its own configuration (reuse is by its hash and the fold), and none is a
    # configuration the old scheme logged: a run seeded the old way is never reused for these.
    hashes = {config_hash(plan.config(arm, k)) for arm in arms for k in plan.seeds}
    old = {_old_hash(plan.ablation.arm_config(arm, "cpu", [f"data.dataset={tmp_path}", f"train.seed={16111990 + k}"]))
           for arm in arms for k in plan.seeds}
    assert len(hashes) == 6 and len(old) == 6 and not hashes & old


def test_an_arm_at_the_baselines_seed_plus_one_shares_no_run_with_it(project, reseeded_ablation):
    # Issue 27 (item 4): with seed k at train.seed + k, the baseline's seed 1 and this arm's seed 0
    # were one run: 3 runs trained for 4, "2 training runs per arm" reported, the shared run
    # tagged with one arm. Now each (arm, seed) trains its own run, with its own seed.
    toml, data = project
    toml.write_text(reseeded_ablation(seeds=2))
    plan = make_plan(str(toml), "cpu", 1, str(data), DEFAULT_STORAGE)
    assert len({config_hash(plan.config(arm, k)) for arm in plan.ablation.arms for k in plan.seeds}) == 4
    result = run_study(plan, progress=False)
    runs = fold_runs(plan.experiment)
    arms = {a.id: a for a in tracking.find_runs(plan.experiment, {"kind": "arm"})}
    cells = sorted((arms[r.parent_id].tags["arm"], r.tags["seed"]) for r in runs)
    assert cells == [("equiunet", "0"), ("equiunet", "1"), ("reseeded", "0"), ("reseeded", "1")]
    assert all(r.tags["seed"] == arms[r.parent_id].tags["seed"] for r in runs)
    assert len({r.tags["run_seed"] for r in runs}) == 4 and all(r.status == "FINISHED" for r in runs)
    assert result.per_case.groupby(["arm", "seed"])["case"].nunique().tolist() == [2, 2, 2, 2]


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
    assert sorted((t.user_attrs["arm"], t.user_attrs["fold"], t.user_attrs["seed"]) for t in study.trials) == sorted(plan.cells())
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)


def test_shipped_ablations_load_and_bad_ones_are_named(tmp_path, tiny_ablation):
    for name in ("attention", "norm"):
        ablation = load_ablation(name)
        assert ablation.baseline in ablation.arms and ablation.fold_count("cpu") == 5  # the demo: 5 folds x 1 seed (issue 21)
    with pytest.raises(ConfigError, match="did you mean 'attention'"):
        load_ablation("atention")
    bad = tmp_path / "bad.toml"
    bad.write_text('foldz = 3\n' + tiny_ablation())
    with pytest.raises(ConfigError, match="unknown key 'foldz'.*did you mean 'folds'"):
        load_ablation(str(bad))
    bad.write_text(tiny_ablation() + 'broken = 3\n')  # lands in [arms]
    with pytest.raises(ConfigError, match="arm 'broken'.*list"):
        load_ablation(str(bad))
    bad.write_text(tiny_ablation().replace("seeds = 1", "seeds = 0"))
    with pytest.raises(ConfigError, match="seeds must be >= 1, got 0"):
        load_ablation(str(bad))


def test_the_shipped_a_a_study_is_two_arms_that_differ_only_in_their_training_seeds():
    from brats_lab.config import flatten

    ablation = load_ablation("seeds")
    assert (ablation.seed_count("cpu"), ablation.seed_count("paper")) == (1, 3)
    assert load_ablation("attention").seed_count("cpu") == 1  # the demo: one seed, 5 folds (folds are the replicates)
    a, b = (flatten(ablation.arm_config(arm, "cpu")) for arm in ablation.arms)
    assert {k for k in a if a[k] != b[k]} == {"train.seed"}
    # Other train.seeds: every run of one arm trains with a seed no run of the other has, in
    # every fold and seed, on the same folds (data.seed).
    plan = make_plan("seeds", "cpu", None, "data/phantom", DEFAULT_STORAGE, seeds=2)
    seeds = {arm: {plan.config(arm, k).train.run_seed(f) for k in plan.seeds for f in plan.folds} for arm in ablation.arms}
    assert [len(s) for s in seeds.values()] == [10, 10] and not set.intersection(*seeds.values())
    assert {str(plan.config(arm, 1).data.seed) for arm in ablation.arms} == {str(a["data.seed"])}


def test_plan_prints_the_design_table_without_training_and_says_when_it_lacks_a_noise_floor(tmp_path):
    def ablate(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "brats_lab.cli", "ablate", "attention", "--profile", "cpu", "--plan", *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    given = ablate("--noise", "0.01")
    assert given.returncode == 0, given.stderr[-2000:]
    from brats_lab.evaluation.stats import minimum_detectable_effect

    assert f"{minimum_detectable_effect(0.01, 5, 3, alpha=0.05 / 3):.4f} (30 runs)" in given.stdout  # as the verdict tests
    assert f"{minimum_detectable_effect(0.01, 2, 1, alpha=0.05 / 3):.4f} (4 runs)" in given.stdout
    missing = ablate()
    assert missing.returncode == 1 and "no noise floor measured for 'attention'" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not (tmp_path / "data").exists()  # no phantoms written, nothing trained


# {tiny}: `tiny_training`'s settings (the `removal` fixture).
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
"""


@pytest.fixture(scope="module")
def removal(tiny_training) -> str:
    """The REMOVAL ablation's TOML, its arms of tiny networks."""
    return REMOVAL.replace("{tiny}", ", ".join(f'"{s}"' for s in tiny_training))


def test_patient_removal_retrains_without_the_worst_cases_and_names_them(project, removal):
    toml, data = project
    toml.write_text(removal)
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


@pytest.fixture
def removal_plan(removal):
    """The function `removal_plan(metric, fraction)`: a plan of the `removal` ablation with its
    metric and fraction replaced, two folds, two seeds."""
    return lambda metric, fraction: _removal_plan(removal, metric, fraction)


def _removal_plan(removal: str, metric: str, fraction: float) -> Plan:
    text = removal.replace('metric = "dice_WT"', f'metric = "{metric}"').replace("fraction = 0.25", f"fraction = {fraction}")
    return Plan(parse_ablation(text, "removal.toml"), "cpu", (0, 1), "phantom", DEFAULT_STORAGE, seeds=(0, 1))


def _baseline_table(scores: dict[str, dict[str, float]]) -> pd.DataFrame:
    """The baseline's out-of-fold per-case table `gather` would return: each case in one fold, two
    seeds whose scores differ (-/+ 1%), so only their mean is the case's score."""
    cases = sorted(next(iter(scores.values())))
    return pd.DataFrame([
        {"arm": "all-cases", "fold": i % 2, "seed": seed, "case": case,
         **{metric: values[case] * (0.99 if seed == 0 else 1.01) for metric, values in scores.items()}}
        for seed in (0, 1) for i, case in enumerate(cases)
    ])


def test_patient_removal_removes_the_worst_cases_in_the_metrics_direction_ties_by_case_id(monkeypatch, removal_plan):
    """Per-case scores made by hand (tiny networks score every case alike): Dice removes the lowest,
    HD95 the highest, each with a tie at the cut broken by case id, never an undefined case."""
    nan = float("nan")
    scores = {  # case -> mean over the two seeds
        "dice_WT": {"c1": 0.90, "c2": 0.50, "c3": 0.70, "c4": 0.30, "c5": 0.50, "c6": 0.80, "c7": 0.95, "c8": 0.60},
        "hd95_WT": {"c1": 60.0, "c2": 4.0, "c3": 30.0, "c4": 8.0, "c5": 6.0, "c6": 2.0, "c7": 1.0, "c8": 30.0},
        "lesion_hd95_WT": {"c1": nan, "c2": 4.0, "c3": 30.0, "c4": 8.0, "c5": 6.0, "c6": 2.0, "c7": 1.0, "c8": 300.0},
    }
    def gather(plan, arms):
        assert arms == [plan.ablation.baseline]  # the baseline's runs only
        return _baseline_table(scores)

    monkeypatch.setattr(study_module, "gather", gather)
    # 25% of 8 cases = 2. Dice: c4 (0.30), then c2 and c5 tie at 0.50: c2, the smaller id.
    assert study_module.choose_removed(removal_plan("dice_WT", 0.25)) == ("c2", "c4")
    # HD95: c1 (60), then c3 and c8 tie at 30: c3. The lowest HD95s (c7, c6) are the best cases.
    assert study_module.choose_removed(removal_plan("hd95_WT", 0.25)) == ("c1", "c3")
    assert study_module.choose_removed(removal_plan("hd95_WT", 0.1)) == ("c1",)  # round(0.8) = 1
    # Lesion-wise HD95, lower is better too; c1 is undefined (NaN) and never removed.
    assert study_module.choose_removed(removal_plan("lesion_hd95_WT", 0.25)) == ("c3", "c8")
    assert "c1" not in study_module.choose_removed(removal_plan("lesion_hd95_WT", 0.9))
    # A known metric the data was not scored with is named, not a KeyError.
    with pytest.raises(DataError, match=r"^removal.metric 'lesion_dice_WT': the baseline's per-case tables have no such column "
                                        r"\(they have dice_WT, hd95_WT, lesion_hd95_WT\)$"):
        study_module.choose_removed(removal_plan("lesion_dice_WT", 0.25))


def test_a_killed_worker_is_detected_and_its_fold_resumes_not_restarts(project, tmp_path, monkeypatch, tiny_ablation):
    import signal
    import time

    toml, data = project
    toml.write_text(tiny_ablation(seeds=2).replace('"train.epochs=2"', '"train.epochs=8"'))
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
    assert len(runs) == 4 and all(r.status == "FINISHED" for r in runs)  # one per (arm, fold, seed): no restart
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
        assert len(table) == 8 and not table.duplicated(["arm", "seed", "case"]).any()
        assert {(arm, seed): sorted(cases) for (arm, seed), cases in table.groupby(["arm", "seed"])["case"]} == {
            ("equiunet", 0): val_cases, ("att_equiunet", 0): val_cases, ("equiunet", 1): val_cases, ("att_equiunet", 1): val_cases}
    assert set(result.comparison["verdict"]) == {"cannot tell: one fold gives no fold-to-fold spread to test against"}
    study = optuna.load_study(study_name=plan.study_name, storage=DEFAULT_STORAGE)
    states = sorted(t.state.name for t in study.trials)
    assert states == ["COMPLETE"] * 4 + ["FAIL"]  # the dead worker's trial failed, then retried


def test_a_worker_whose_trial_was_failed_as_stale_while_it_ran_drops_that_result_and_goes_on(project, tmp_path, monkeypatch):
    """A worker suspended past the grace period (SIGSTOP; a machine too loaded to send heartbeats
    does the same) finds, when it resumes, its trial failed and queued again: it says so, does not
    crash, and takes the retry, which finds the fold run it finished."""
    import signal
    import time

    toml, data = project
    plan = make_plan(str(toml), "cpu", 1, str(data), DEFAULT_STORAGE)
    launch(plan)
    env = {**os.environ, "BRATS_LAB_HEARTBEAT_SECONDS": "1", "BRATS_LAB_GRACE_SECONDS": "3"}
    worker = subprocess.Popen([sys.executable, "-m", "brats_lab.cli", "worker", "--study", plan.study_name,
                               "--storage", DEFAULT_STORAGE, "--quiet"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not tracking.find_runs(plan.experiment, {"kind": "fold"}, statuses=("RUNNING",)):
        assert worker.poll() is None, worker.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    worker.send_signal(signal.SIGSTOP)
    time.sleep(4)  # past the grace period
    monkeypatch.setattr(study_module, "GRACE_SECONDS", 3)
    monkeypatch.setattr(study_module, "HEARTBEAT_SECONDS", 1)
    study = optuna.load_study(study_name=plan.study_name, storage=study_module._storage(DEFAULT_STORAGE))
    study_module._fail_stale(study)  # what any other worker or launcher does on its next claim
    (stale,) = [t for t in study.get_trials() if t.state.name == "FAIL"]
    worker.send_signal(signal.SIGCONT)
    _, stderr = worker.communicate(timeout=300)
    assert worker.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    arm, fold = stale.user_attrs["arm"], stale.user_attrs["fold"]
    assert (f"brats-lab: trial {stale.number} ({arm}, fold {fold}, seed 0) was marked failed while it ran; "
            "its fold run stays in MLflow for the retry to find") in stderr
    runs = fold_runs(plan.experiment)
    assert len(runs) == 2 and {r.status for r in runs} == {"FINISHED"}  # the retry trained nothing again
    states = sorted(t.state.name for t in optuna.load_study(study_name=plan.study_name, storage=DEFAULT_STORAGE).trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]


def test_an_ablation_can_ask_optuna_to_search_hyperparameters(project, tiny_ablation):
    toml, data = project
    toml.write_text(tiny_ablation() + """
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


def test_cpu_studies_default_to_one_single_threaded_worker_per_core(project, monkeypatch):
    # Two runs side by side on one thread each train more steps per second on a CPU than one run
    # on every core (benchmarks/bench_cpu_workers.py); never more workers than trials, one on a GPU profile.
    toml, data = project
    plan = make_plan(str(toml), "cpu", None, str(data), DEFAULT_STORAGE)  # 2 arms x 2 folds
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert default_workers(plan) == 2
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_workers(plan) == 4
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert default_workers(plan) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert default_workers(dataclasses.replace(plan, profile="paper")) == 1


def test_a_finished_run_is_reused_only_on_the_same_data(project, tiny_shape):
    # Issue 27: `ablate t.toml --data d`, then d replaced by other phantoms under the same name
    # (`rm -rf d; data synth --out d --layout 2023 --seed 5`), then `ablate t.toml --data d` again:
    # the old runs (of BraTS20_* cases that no longer exist) must not be reported for the new data.
    from brats_lab.data.phantom import synthesize

    toml, data = project
    plan = make_plan(str(toml), "cpu", None, str(data), DEFAULT_STORAGE)
    first = run_study(plan, progress=False)
    old = {r.id for r in fold_runs(plan.experiment)}
    assert len(old) == 4
    shutil.rmtree(data)
    synthesize(data, cases=4, seed=5, shape=tiny_shape, progress=False, layout="brats2023")
    again = make_plan(str(toml), "cpu", None, str(data), DEFAULT_STORAGE)
    assert again.study_name != plan.study_name  # another dataset, another study
    second = run_study(again, progress=False)
    runs = fold_runs(plan.experiment)
    assert len(runs) == 8 and all(r.status == "FINISHED" for r in runs)  # every cell trained again, on the new data
    new_hash = {r.tags["manifest_hash"] for r in runs if r.id not in old}
    assert len(new_hash) == 1 and new_hash.isdisjoint({r.tags["manifest_hash"] for r in runs if r.id in old})
    assert set(first.per_case["case"]) == {f"BraTS20_Training_00{i}" for i in range(1, 5)}
    assert set(second.per_case["case"]) == {f"BraTS-GLI-0000{i}-000" for i in range(1, 5)}
    # The same data again: everything reused, nothing trained.
    third = run_study(make_plan(str(toml), "cpu", None, str(data), DEFAULT_STORAGE), progress=False)
    key = ["arm", "fold", "seed", "case"]
    assert len(fold_runs(plan.experiment)) == 8
    assert third.per_case.sort_values(key).reset_index(drop=True).equals(second.per_case.sort_values(key).reset_index(drop=True))
