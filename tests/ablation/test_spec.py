"""The ablation TOMLs as data: the CPU demo schedule they share (experiments/cpu_demo.toml), and the
removal metric they are refused for."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest

from brats_lab.ablation.spec import available, load_ablation
from brats_lab.ablation.study import DEFAULT_STORAGE, make_plan
from brats_lab.config import EXPERIMENTS_DIR, ConfigError, TrainConfig, load_config, pipeline_path, to_dict


def _values(overrides: list[str]) -> dict[str, str]:
    return dict(o.split("=", 1) for o in overrides)


def test_every_shipped_ablation_demo_trains_on_the_one_shared_schedule():
    shared = tomllib.loads((EXPERIMENTS_DIR / "cpu_demo.toml").read_text())["set"]
    demo_epochs = int(_values(shared)["train.epochs"])
    assert load_config(pipeline_path("A"), "cpu").train.epochs != demo_epochs  # not the cpu profile's own schedule
    for name in available():
        ablation = load_ablation(name)
        # 5 folds x 1 seed: the folds are the verdict's replicates (issue 21)
        assert (ablation.cpu_folds, ablation.seed_count("cpu")) == (5, 1) and ablation.cpu_set == tuple(shared), name
        for arm, overrides in ablation.arms.items():
            own = _values(list(overrides)).get("train.epochs")  # the positive control's handicap sets its own
            cfg = to_dict(ablation.arm_config(arm, "cpu"))
            assert cfg["train"]["epochs"] == int(own or demo_epochs) and cfg["train"]["swa"]["cycles"] == 2, (name, arm)
            paper = to_dict(ablation.arm_config(arm, "paper"))
            assert paper["train"]["epochs"] != demo_epochs, (name, arm)  # the paper profile never takes the demo's


def test_the_positive_control_handicaps_one_arm_by_half_the_demo_epochs():
    ablation = load_ablation("handicap")
    base, handicapped = (ablation.arm_config(arm, "cpu") for arm in ("equiunet", "half-epochs"))
    assert ablation.baseline == "equiunet" and handicapped.train.epochs * 2 == base.train.epochs
    assert to_dict(dataclasses.replace(handicapped, train=dataclasses.replace(handicapped.train, epochs=base.train.epochs))) == to_dict(base)


def test_an_ablation_without_a_cpu_table_takes_no_demo_schedule_and_a_cpu_set_adds_to_it(tmp_path, tiny_ablation, tiny_training):
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
    assert cfg.train.epochs == int(_values(list(tiny_training))["train.epochs"])  # and the arm's overrides after both


def test_a_removal_metric_that_is_not_a_per_case_column_is_refused_when_the_ablation_loads(tmp_path, tiny_ablation):
    """Before anything trains, not as a KeyError after the baseline's whole pass."""
    toml = tmp_path / "removal.toml"

    def removal(metric: str) -> None:
        toml.write_text(tiny_ablation() + f'\n[removal]\narm = "att_equiunet"\nmetric = "{metric}"\nfraction = 0.25\n')
        load_ablation(str(toml))

    removal("hd95_WT")  # every metric of a region is fine, lesion-wise ones too
    removal("lesion_hd95_ET")
    with pytest.raises(ConfigError, match=re.escape(f"{toml}: removal.metric: unknown metric 'dice_wt'") + ".*did you mean 'dice_WT'"):
        removal("dice_wt")
    with pytest.raises(ConfigError, match="removal.metric: unknown metric 'hd_95_WT'"):
        removal("hd_95_WT")
    for whole in ("dice", "final_dice_WT"):  # a known metric, but no per-case column
        with pytest.raises(ConfigError, match=re.escape(f"removal.metric must be a per-case column, one metric of one region "
                                                        f"such as 'dice_WT' or 'hd95_WT', got {whole!r}")):
            removal(whole)


def test_every_arm_and_seed_is_checked_in_every_fold_and_a_shared_run_names_both(tmp_path, monkeypatch, reseeded_ablation):
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


def test_an_arm_may_not_set_the_seed_index_the_seeds_set(tmp_path, tiny_ablation):
    toml = tmp_path / "indexed.toml"
    toml.write_text(tiny_ablation().replace('"model.name=att_equiunet", ', '"model.name=att_equiunet", "train.seed_index=1", '))
    with pytest.raises(ConfigError, match=r"arm 'att_equiunet' sets train.seed_index=1 .*the ablation's seeds set it"):
        load_ablation(toml)
