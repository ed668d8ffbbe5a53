"""The plan of an ablation's runs and the fate of one cell (arm, fold, seed), in the test process:
reused by its config hash, fold and data, resumed from a checkpoint, or trained, without training
anything (the trainer is replaced by one that says what it was asked)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from brats_lab import DataError, run_files, tracking
from brats_lab.ablation import study as study_module
from brats_lab.ablation.report import data_hash
from brats_lab.ablation.study import DEFAULT_STORAGE, make_plan, run_cell
from brats_lab.config import ConfigError, config_hash, flatten
from brats_lab.training import trainer
from brats_lab.training.checkpoint import checkpoint_path


@pytest.fixture
def project(empty_mlflow_store: Path, phantom_copy: Path, tiny_ablation, tmp_path: Path, monkeypatch) -> Path:
    """tmp_path as the project: an empty MLflow store, the phantoms (`phantom/`), tiny.toml (two
    seeds) and removal.toml (patient removal from att_equiunet)."""
    monkeypatch.chdir(tmp_path)  # the MLflow store is mlruns/ here
    shutil.copytree(empty_mlflow_store, tmp_path / "mlruns")
    (tmp_path / "tiny.toml").write_text(tiny_ablation(seeds=2))
    (tmp_path / "removal.toml").write_text(tiny_ablation() + '\n[removal]\narm = "att_equiunet"\nfraction = 0.25\n')
    return tmp_path


def test_the_plan_lists_every_arm_fold_and_seed_and_names_its_study(project: Path, tiny_ablation) -> None:
    plan = make_plan("tiny.toml", "cpu", None, "phantom", DEFAULT_STORAGE)
    assert (plan.folds, plan.seeds, plan.dataset, plan.storage) == ((0, 1), (0, 1), "phantom", DEFAULT_STORAGE)
    assert plan.cells() == [(arm, fold, seed) for arm in ("equiunet", "att_equiunet") for seed in (0, 1) for fold in (0, 1)]
    assert plan.experiment == "ablation-tiny-attention"
    for arm in plan.ablation.arms:
        for seed in (0, 1):
            cfg = plan.config(arm, seed)
            assert cfg.train.seed_index == seed and cfg.data.dataset == "phantom"
            assert cfg.model.name == arm and cfg.train == dataclasses.replace(plan.ablation.arm_config(arm, "cpu").train, seed_index=seed)
    assert plan.config("equiunet") == plan.config("equiunet", 0)  # without a seed: the first
    assert plan.attrs() == {"ablation": "tiny.toml", "ablation_toml": tiny_ablation(seeds=2), "profile": "cpu", "folds": [0, 1],
                            "dataset": "phantom", "excluded": [], "seeds": [0, 1]}
    # The study's name: the ablation, the profile and a digest of the arms' configs, folds, seed count and data.
    name = plan.study_name
    assert name.startswith("tiny-attention-cpu-") and len(name) == len("tiny-attention-cpu-") + 10
    assert make_plan("tiny.toml", "cpu", None, "phantom", DEFAULT_STORAGE).study_name == name
    one_fold = make_plan("tiny.toml", "cpu", 1, "phantom", DEFAULT_STORAGE)
    one_seed = make_plan("tiny.toml", "cpu", None, "phantom", DEFAULT_STORAGE, seeds=1)
    assert len({name, one_fold.study_name, one_seed.study_name}) == 3 and one_seed.seeds == (0,) and one_fold.folds == (0,)
    (project / "wider.toml").write_text(tiny_ablation(seeds=2).replace('"model.name=att_equiunet", ', '"model.name=att_equiunet", "optim.lr=0.002", '))
    assert make_plan("wider.toml", "cpu", None, "phantom", DEFAULT_STORAGE).study_name != name
    # The same dataset folder with other content: another study.
    t1 = sorted((project / "phantom").glob("*/*_t1.nii.gz"))[0]
    t1.write_bytes(t1.with_name(t1.name.replace("_t1.", "_t2.")).read_bytes())
    assert make_plan("tiny.toml", "cpu", None, "phantom", DEFAULT_STORAGE).study_name != name


def test_the_counts_of_a_plan_are_checked(project: Path) -> None:
    with pytest.raises(DataError, match=r"^--folds must be between 1 and 2 \(the data is split in 2 folds\), got 3$"):
        make_plan("tiny.toml", "cpu", 3, "phantom", DEFAULT_STORAGE)
    with pytest.raises(DataError, match=r"^--folds must be between 1 and 2 \(the data is split in 2 folds\), got 0$"):
        make_plan("tiny.toml", "cpu", 0, "phantom", DEFAULT_STORAGE)
    with pytest.raises(DataError, match=r"^--seeds must be at least 1, got 0$"):
        make_plan("tiny.toml", "cpu", None, "phantom", DEFAULT_STORAGE, seeds=0)
    assert make_plan("tiny.toml", "cpu", 2, "phantom", DEFAULT_STORAGE, seeds=3).seeds == (0, 1, 2)


PROFILED = """
name = "profiled"
description = "what the profile decides"
pipeline = "A"
baseline = "equiunet"
folds = 2
seeds = 2

[arms]
equiunet = ["model.name=equiunet"]
slower = ["model.name=equiunet", "optim.lr=0.002"]

[cpu]
folds = 1
seeds = 1
"""


def test_the_profile_decides_the_counts_the_fold_limit_the_shared_runs_and_the_study(project: Path) -> None:
    """The profile a study runs with (cpu, paper or a TOML file of one's own) is the one its counts,
    its checks and its name are made with, not the defaults."""
    (project / "profiled.toml").write_text(PROFILED)
    cpu, paper = (make_plan("profiled.toml", p, None, "phantom", DEFAULT_STORAGE) for p in ("cpu", "paper"))
    assert (cpu.folds, cpu.seeds, paper.folds, paper.seeds) == ((0,), (0,), (0, 1), (0, 1))  # the [cpu] table's counts
    assert cpu.config("slower").model.width == 8 and paper.config("slower").model.width == 48
    # A profile that splits the data in 3 folds: --folds 3 is the most it allows.
    (project / "three-folds.toml").write_text("[data]\nfolds = 3\n")
    assert make_plan("profiled.toml", "three-folds.toml", 3, "phantom", DEFAULT_STORAGE).folds == (0, 1, 2)
    with pytest.raises(DataError, match=r"^--folds must be between 1 and 3 \(the data is split in 3 folds\), got 4$"):
        make_plan("profiled.toml", "three-folds.toml", 4, "phantom", DEFAULT_STORAGE)
    # A profile under which the two arms are the same configuration is refused.
    (project / "lr.toml").write_text("[optim]\nlr = 0.002\n")
    with pytest.raises(ConfigError, match=r"arms 'equiunet' and 'slower' resolve to the same configuration \(profile lr.toml\)"):
        make_plan("profiled.toml", "lr.toml", None, "phantom", DEFAULT_STORAGE)
    # The study's digest covers the configurations the profile makes (same folds, seeds and data).
    (project / "lr3.toml").write_text("[optim]\nlr = 0.003\n")
    digests = {make_plan("profiled.toml", p, None, "phantom", DEFAULT_STORAGE).study_name.rsplit("-", 1)[1]
               for p in ("three-folds.toml", "lr3.toml")}
    assert len(digests) == 2


def test_a_removal_arm_waits_for_the_cases_the_baselines_pass_removes(project: Path) -> None:
    plan = make_plan("removal.toml", "cpu", None, "phantom", DEFAULT_STORAGE)
    assert plan.ready_arms() == ["equiunet"] and plan.cells() == [("equiunet", 0, 0), ("equiunet", 1, 0)]
    with pytest.raises(DataError, match=r"^arm 'att_equiunet' has no configuration before the baseline's pass decides what to remove$"):
        plan.config("att_equiunet")
    assert plan.config("equiunet").data.exclude == ()
    second = dataclasses.replace(plan, excluded=("BraTS20_Training_002", "BraTS20_Training_004"))
    assert second.ready_arms() == ["equiunet", "att_equiunet"] and len(second.cells()) == 4
    assert second.config("att_equiunet").data.exclude == ("BraTS20_Training_002", "BraTS20_Training_004")
    assert second.config("equiunet").data.exclude == ()  # the baseline trains on every case
    assert second.study_name == plan.study_name  # one study, two passes


def _fold_run(plan, arm: str, seed: int, fold: int, status: str, manifest_hash: str | None, dice: float | None = None):
    cfg = plan.config(arm, seed)
    arm_run = tracking.arm_run(plan.experiment, config_hash(cfg), arm, flatten(cfg))
    run = tracking.fold_run(arm_run, fold, f"{arm} fold {fold}")
    if manifest_hash is not None:
        run.set_tags({"manifest_hash": manifest_hash})
    if dice is not None:
        run.log_table(pd.DataFrame({"case": ["a", "b"], "dice_WT": [dice, dice]}), run_files.PER_CASE)
    if status != "RUNNING":
        run.finish(status)
    return run


def test_a_cell_is_reused_resumed_or_trained_by_its_config_hash_fold_and_data(project: Path, monkeypatch) -> None:
    plan = make_plan("tiny.toml", "cpu", None, "phantom", DEFAULT_STORAGE)
    study_run, _ = tracking.study_run(plan.experiment, plan.study_name, plan.ablation.name, {})
    asked = []

    def train_fold(cfg, fold, resume=False, experiment=None, parent=None, progress=True, tags=None):
        asked.append({"hash": config_hash(cfg), "fold": fold, "resume": resume, "experiment": experiment, "parent": parent.id,
                      "arm": parent.tags["arm"], "seed": parent.tags["seed"], "parent's parent": parent.parent_id,
                      "progress": progress, "tags": tags})
        return SimpleNamespace(per_case=pd.DataFrame({"case": ["trained"]}))

    monkeypatch.setattr(trainer, "train_fold", train_fold)
    cfg = plan.config("att_equiunet", 1)
    data = data_hash(cfg)

    def cell(fold: int = 1, **kw) -> pd.DataFrame:
        asked.clear()
        return run_cell(plan, study_run, "att_equiunet", fold, False, 1, {"slurm_job": "7"}, **kw)

    # Nothing yet: trained, under the arm run of (arm, seed), itself under the study run.
    assert cell()["case"].tolist() == ["trained"]
    (one,) = asked
    assert one == {"hash": config_hash(cfg), "fold": 1, "resume": False, "experiment": "ablation-tiny-attention",
                   "parent": one["parent"], "arm": "att_equiunet", "seed": "1", "parent's parent": study_run.id,
                   "progress": False, "tags": {"slurm_job": "7"}}
    arm_run = tracking.get_run(one["parent"])
    assert arm_run.name == "att_equiunet seed 1" and arm_run.tags["config_hash"] == config_hash(cfg)
    run_cell(plan, study_run, "equiunet", 0, False, 0)
    assert tracking.get_run(asked[-1]["parent"]).name == "equiunet"  # seed 0: the arm's own name

    # Unfinished runs: a killed one whose checkpoint this machine can read is resumed ...
    killed = _fold_run(plan, "att_equiunet", 1, 1, "KILLED", data)
    checkpoint_path(killed).parent.mkdir(parents=True, exist_ok=True)
    checkpoint_path(killed).write_bytes(b"a checkpoint")
    cell()
    assert [a["resume"] for a in asked] == [True]
    checkpoint_path(killed).unlink()
    # ... and so is a failed one, or a running one (its worker died after its last checkpoint)
    for status in ("FAILED", "RUNNING"):
        stopped = _fold_run(plan, "att_equiunet", 1, 1, status, data)
        checkpoint_path(stopped).parent.mkdir(parents=True, exist_ok=True)
        checkpoint_path(stopped).write_bytes(b"a checkpoint")
        cell()
        assert [a["resume"] for a in asked] == [True] and stopped.status == status, status
        checkpoint_path(stopped).unlink()
        if status == "RUNNING":
            stopped.finish("KILLED")
    # ... one of another fold, another seed or other data is not the cell's
    for fold, seed, manifest in ((0, 1, data), (1, 0, data), (1, 1, "other data")):
        other = _fold_run(plan, "att_equiunet", seed, fold, "KILLED", manifest)
        checkpoint_path(other).parent.mkdir(parents=True, exist_ok=True)
        checkpoint_path(other).write_bytes(b"a checkpoint")
    cell()
    assert [a["resume"] for a in asked] == [False]
    # ... a failed one without a checkpoint is left as it is, and the fold trained afresh ...
    failed = _fold_run(plan, "att_equiunet", 1, 1, "FAILED", data)
    cell()
    assert [a["resume"] for a in asked] == [False] and failed.status == "FAILED" and "abandoned" not in failed.tags
    # ... and a running one without a checkpoint lost its worker: closed, and the fold trained afresh.
    running = _fold_run(plan, "att_equiunet", 1, 1, "RUNNING", data)
    cell()
    assert [a["resume"] for a in asked] == [False] and running.status == "FAILED"
    assert running.tags["abandoned"].startswith("its worker died; ") and str(checkpoint_path(running)) in running.tags["abandoned"]
    assert running.tags["abandoned"].endswith("and trained the fold again in a new run")

    # A finished run of the cell: reused, nothing trained; not one of another fold, seed or data.
    for fold, seed, manifest in ((0, 1, data), (1, 0, data), (1, 1, "other data")):
        _fold_run(plan, "att_equiunet", seed, fold, "FINISHED", manifest, dice=0.1)
    assert cell()["case"].tolist() == ["trained"]
    _fold_run(plan, "att_equiunet", 1, 1, "FINISHED", data, dice=0.7)
    assert cell()["dice_WT"].tolist() == [0.7, 0.7] and asked == []


def test_an_arm_run_found_with_other_tags_is_tagged_again(project: Path) -> None:
    """The arm run of (arm, seed) is found by its config hash; its `arm` and `seed` tags (which its
    fold runs are read by) are set again when they say otherwise (set by hand, or an older brats-lab)."""
    plan = make_plan("tiny.toml", "cpu", None, "phantom", DEFAULT_STORAGE)
    study_run, _ = tracking.study_run(plan.experiment, plan.study_name, plan.ablation.name, {})
    run = study_module._arm_run(plan, study_run, "att_equiunet", 1)
    assert (run.tags["arm"], run.tags["seed"]) == ("att_equiunet", "1")
    for arm, seed in (("att_equiunet", "0"), ("equiunet", "1")):  # one tag wrong, then the other
        run.set_tags({"arm": arm, "seed": seed})
        again = study_module._arm_run(plan, study_run, "att_equiunet", 1)
        assert again.id == run.id and (again.tags["arm"], again.tags["seed"]) == ("att_equiunet", "1"), (arm, seed)
