"""The ablation TOMLs as data: the CPU demo schedule they share (experiments/cpu_demo.toml)."""

from __future__ import annotations

import tomllib

import pytest

from brats_lab.ablation.spec import available, load_ablation
from brats_lab.ablation.study import DEFAULT_STORAGE, make_plan
from brats_lab.config import EXPERIMENTS_DIR, ConfigError, TrainConfig, load_config, pipeline_path, to_dict
from conftest import TINY_TRAINING, reseeded_ablation, tiny_ablation


def _values(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


def test_every_shipped_ablation_demo_trains_on_the_one_shared_schedule():
    shared = tomllib.loads((EXPERIMENTS_DIR / "cpu_demo.toml").read_text())["set"]
    assert _values(shared)["train.epochs"] == "8"  # shorter than the cpu profile's own schedule
    assert load_config(pipeline_path("A"), "cpu").train.epochs != 8
    for name in available():
        ablation = load_ablation(name)
        assert ablation.cpu_folds == 2 and ablation.cpu_set == tuple(shared), name
        for arm in ablation.arms:
            cfg = to_dict(ablation.arm_config(arm, "cpu"))
            assert cfg["train"]["epochs"] == 8 and cfg["train"]["swa"]["cycles"] == 2, (name, arm)
            paper = to_dict(ablation.arm_config(arm, "paper"))
            assert paper["train"]["epochs"] != 8, (name, arm)  # the paper profile never takes the demo's


def test_an_ablation_without_a_cpu_table_takes_no_demo_schedule_and_a_cpu_set_adds_to_it(tmp_path):
    plain = tmp_path / "plain.toml"
    plain.write_text(tiny_ablation())
    assert load_ablation(str(plain)).cpu_set == ()
    demo = tmp_path / "demo.toml"
    demo.write_text(tiny_ablation() + '\n[cpu]\nfolds = 2\nset = ["train.swa.cycles=3"]\n')
    ablation = load_ablation(str(demo))
    shared = tomllib.loads((EXPERIMENTS_DIR / "cpu_demo.toml").read_text())["set"]
    assert ablation.cpu_set == (*shared, "train.swa.cycles=3")
    cfg = ablation.arm_config("equiunet", "cpu")
    assert cfg.train.swa.cycles == 3  # its own set after the shared one: its own wins
    assert cfg.train.epochs == int(_values(list(TINY_TRAINING))["train.epochs"])  # and the arm's overrides after both


def test_every_arm_and_seed_is_checked_in_every_fold_and_a_shared_run_names_both(tmp_path, monkeypatch):
    # Issue 27's collision, were seed k still train.seed + k in every fold: the baseline's seed 1
    # is the reseeded arm's seed 0. Such a pair is refused before anything trains, naming both.
    monkeypatch.setattr(TrainConfig, "run_seed", lambda train, fold: train.seed + train.seed_index)
    toml = tmp_path / "reseeded.toml"
    toml.write_text(reseeded_ablation(seeds=2))
    shared = r"arm 'equiunet' seed 1 and arm 'reseeded' seed 0 would train the same run in fold 0 \(profile cpu: .*run seed 16111991\)"
    with pytest.raises(ConfigError, match=shared):
        load_ablation(toml)
    # One seed in the TOML loads; --seeds 2 at launch is checked again.
    toml.write_text(reseeded_ablation(seeds=1))
    load_ablation(toml)
    with pytest.raises(ConfigError, match=shared):
        make_plan(str(toml), "cpu", None, str(tmp_path), DEFAULT_STORAGE, seeds=2)


def test_an_arm_may_not_set_the_seed_index_the_seeds_set(tmp_path):
    toml = tmp_path / "indexed.toml"
    toml.write_text(tiny_ablation().replace('"model.name=att_equiunet", ', '"model.name=att_equiunet", "train.seed_index=1", '))
    with pytest.raises(ConfigError, match=r"arm 'att_equiunet' sets train.seed_index=1 .*the ablation's seeds set it"):
        load_ablation(toml)
