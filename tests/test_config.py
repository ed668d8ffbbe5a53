"""brats_lab.config: the experiment TOMLs, profiles, overrides, checks, flatten and hash."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from brats_lab.config import (
    EXPERIMENTS_DIR,
    ConfigError,
    DataConfig,
    ExperimentConfig,
    ModelConfig,
    TrainConfig,
    config_hash,
    flatten,
    from_dict,
    load_config,
    pipeline_path,
    to_dict,
    unflatten,
)


@pytest.mark.parametrize("profile", [None, "cpu", "paper"])
@pytest.mark.parametrize("pipeline", ["A", "B"])
def test_every_pipeline_loads_with_every_profile(pipeline, profile):
    cfg = load_config(pipeline_path(pipeline), profile)
    assert cfg.pipeline == pipeline
    assert cfg.model.name == "equiunet" and cfg.model.deep_supervision
    if profile == "cpu":
        assert cfg.model.width < 48 and max(cfg.data.patch_size) <= 64 and cfg.train.epochs <= 50
    else:
        assert cfg.model.width == 48 and cfg.data.patch_size == (128, 128, 128)


def test_pipeline_a_is_the_papers():
    cfg = load_config(pipeline_path("A"), "paper")
    assert cfg.data.normalization == "minmax" and cfg.model.norm == "group"
    assert (cfg.optim.name, cfg.optim.lr) == ("ranger", 1e-4)
    assert (cfg.train.batch_size, cfg.train.epochs, cfg.train.decay_start) == (1, 200, 0.5)
    swa = cfg.train.swa
    assert (swa.enabled, swa.cycles, swa.cycle_epochs, swa.lr, swa.snapshot_every) == (True, 5, 30, 5e-5, 3)
    assert cfg.data.pad_multiple == 8  # section 3.4: padded to be divisible by 8
    assert (cfg.train.amp, cfg.train.val_every, cfg.train.loss, cfg.train.deep_supervision_weighting) == ("fp16", 3, "dice_squared", "sum")
    assert (cfg.model.name, cfg.model.width, cfg.model.deep_supervision, cfg.model.dropout) == ("equiunet", 48, True, 0.0)
    assert cfg.data.normalization == "minmax" and cfg.data.patch_size == (128, 128, 128) and cfg.train.augment == "A"
    assert (cfg.data.split, cfg.data.seed, cfg.data.folds) == ("authors", 16111990, 5)  # the authors' folds


def test_pipeline_b_is_the_papers():
    cfg = load_config(pipeline_path("B"), "paper")
    assert cfg.data.normalization == "zscore" and cfg.model.norm == "instance"
    o = cfg.optim
    assert (o.name, o.lr, o.betas, o.eps, o.weight_decay) == ("adam", 1e-4, (0.9, 0.999), 1e-4, 0.0)
    assert cfg.train.batch_size == 3 and cfg.train.keep == "best" and not cfg.train.swa.enabled
    assert cfg.train.loss == "dice" and cfg.train.decay_start == 0.0
    assert cfg.data.pad_multiple == 8 and cfg.data.split == "authors"
    assert (cfg.train.amp, cfg.train.augment, cfg.train.schedule, cfg.train.epochs) == ("fp16", "B", "cosine", 400)


def test_overrides_are_toml_literals_or_strings():
    cfg = load_config(
        pipeline_path("A"),
        "cpu",
        [
            "optim.lr=3e-4",
            "model.name=att_equiunet",  # not a TOML literal: a string
            "data.patch_size=[32, 32, 64]",
            "train.amp=bf16",
            "train.swa.enabled=false",
            "data.dataset=data/other",
            "model.dropout=0",  # an int where a float is expected
        ],
    )
    assert cfg.optim.lr == 3e-4 and cfg.model.name == "att_equiunet"
    assert cfg.data.patch_size == (32, 32, 64) and cfg.train.amp == "bf16"
    assert cfg.train.swa.enabled is False and cfg.data.dataset == "data/other"
    assert cfg.model.dropout == 0.0 and isinstance(cfg.model.dropout, float)
    # A string field takes the text as written, even when it would parse as a number.
    assert load_config(pipeline_path("A"), overrides=["data.dataset=1"]).data.dataset == "1"
    assert load_config(pipeline_path("A"), overrides=['data.dataset="a b"']).data.dataset == "a b"
    # The last layer wins.
    assert load_config(pipeline_path("A"), "cpu", ["model.width=16", "model.width=24"]).model.width == 24


def test_unknown_key_is_rejected_naming_key_file_allowed_keys_and_close_match(tmp_path):
    bad = tmp_path / "p.toml"
    bad.write_text('[model]\nname = "equiunet"\nwidht = 8\n')
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    msg = str(e.value)
    assert "'model.widht'" in msg and str(bad) in msg and "did you mean 'model.width'" in msg
    assert "Allowed keys in [model]: name, width, norm" in msg

    with pytest.raises(ConfigError, match=r"unknown key 'modle'.*did you mean 'model'.*pipeline, data, model"):
        from_dict({"modle": {}})
    with pytest.raises(ConfigError, match=r"unknown key 'train.swa.cycle'.*--set train.swa.cycle=2.*'train.swa.cycles'"):
        load_config(pipeline_path("A"), overrides=["train.swa.cycle=2"])


def test_unknown_key_in_a_profile_names_the_profile(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "pipeline_a.toml").write_text((EXPERIMENTS_DIR / "pipeline_a.toml").read_text())
    (tmp_path / "profiles" / "mine.toml").write_text("[optim]\nlearning_rate = 1.0\n")
    with pytest.raises(ConfigError, match=r"optim.learning_rate.*mine\.toml"):
        load_config(tmp_path / "pipeline_a.toml", "mine")
    with pytest.raises(ConfigError, match=r"no profile 'gpu'.*known profiles: mine"):
        load_config(tmp_path / "pipeline_a.toml", "gpu")


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optim.lr=fast", r"optim.lr in --set optim.lr=fast: expected a number, got 'fast' \(str\)"),
        ("model.width=true", r"model.width .*expected an integer, got True \(bool\)"),
        ("model.width=8.5", r"model.width .*expected an integer, got 8.5"),
        ("train.amp=1", r"train.amp .*expected one of 'auto', 'fp16', 'bf16', 'off', got '1'"),
        ("data.patch_size=[32, 32]", r"data.patch_size .*expected a list of 3 integers"),
        ("model.norm=batch", r"model.norm .*expected one of 'group', 'instance', got 'batch'"),
        ("model.name=equinet", r"did you mean 'equiunet'"),
        ("train.swa=3", r"'train.swa' is a section; set one of its keys \(train.swa.enabled"),
        ("optim.lr", r"expected key=value"),
    ],
)
def test_wrong_types_and_values_are_rejected_with_a_clear_message(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(pipeline_path("A"), "cpu", [override])


def test_invalid_values_name_the_key_and_the_layer():
    with pytest.raises(ConfigError, match=r"data.patch_size \(from --set data.patch_size=\[30, 32, 32\]\): .*multiple of 8"):
        load_config(pipeline_path("A"), overrides=["data.patch_size=[30, 32, 32]"])
    with pytest.raises(ConfigError, match=r"optim.lr .*must be > 0"):
        load_config(pipeline_path("A"), overrides=["optim.lr=-1e-4"])
    with pytest.raises(ConfigError, match=r"is a value, not a section"):
        from_dict({"model": {"width": {"x": 1}}})
    with pytest.raises(ConfigError, match=r"\[model\]\), not a value"):
        from_dict({"model": 3})
    with pytest.raises(ConfigError):  # direct construction checks too
        DataConfig(folds=1)


def test_a_missing_or_broken_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[model\n")
    with pytest.raises(ConfigError, match=r"broken.toml is not valid TOML"):
        load_config(broken)


def test_tiny_model_names_pin_the_width():
    assert ModelConfig(name="equiunet_tiny").width == 4
    cfg = load_config(pipeline_path("A"), overrides=["model.name=unet_tiny"])  # file says width 48
    assert cfg.model.width == 4 and flatten(cfg)["model.width"] == "4"
    with pytest.raises(ConfigError, match=r"model.width .*'unet_tiny' has width 4, got width=8"):
        load_config(pipeline_path("A"), "cpu", ["model.name=unet_tiny"])


def test_hash_is_stable_across_key_order_and_sensitive_to_any_change(tmp_path):
    cfg = load_config(pipeline_path("A"), "cpu")
    h = config_hash(cfg)
    assert len(h) == 64 and h == config_hash(load_config(pipeline_path("A"), "cpu"))
    # The same values written in another order, in one file, hash the same.
    text = (EXPERIMENTS_DIR / "pipeline_a.toml").read_text()
    sections = text.split("\n[")
    shuffled = tmp_path / "pipeline_a.toml"
    shuffled.write_text(sections[0] + "\n[" + "\n[".join(reversed(sections[1:])))
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "cpu.toml").write_text((EXPERIMENTS_DIR / "profiles" / "cpu.toml").read_text())
    assert config_hash(load_config(shuffled, "cpu")) == h
    assert config_hash(from_dict(to_dict(cfg))) == h
    assert config_hash(ExperimentConfig()) == config_hash(from_dict({}))  # defaults are pipeline A's
    assert config_hash(load_config(pipeline_path("A"), "cpu", ["optim.lr=1.1e-4"])) != h
    assert config_hash(load_config(pipeline_path("A"), "cpu", ["train.swa.cycles=3"])) != h


def test_each_fold_and_seed_index_trains_with_its_own_seed_the_same_on_every_machine():
    train = TrainConfig(seed=16111990)
    seeds = {(k, fold): dataclasses.replace(train, seed_index=k).run_seed(fold) for k in range(3) for fold in range(5)}
    assert len(set(seeds.values())) == 15 and all(0 <= s < 2**32 for s in seeds.values())
    # A hash of (seed, seed index, fold), not Python's hash() (salted per process): pinned here.
    assert seeds[(0, 0)] == 3816776235 and seeds[(1, 4)] == TrainConfig(seed=16111990, seed_index=1).run_seed(4)
    assert TrainConfig(seed=16111991).run_seed(0) not in seeds.values()  # not seed + k: another train.seed, other seeds
    assert {TrainConfig(seed=16111990, epochs=3).run_seed(f) for f in range(5)} == {seeds[(0, f)] for f in range(5)}  # the seed's alone
    cfg = load_config(pipeline_path("A"), "cpu", ["train.seed_index=2"])
    assert cfg.train.seed_index == 2 and config_hash(cfg) != config_hash(load_config(pipeline_path("A"), "cpu"))
    with pytest.raises(ConfigError, match=r"train.seed_index .*between 0 and 2\*\*32 - 1, got -1"):
        load_config(pipeline_path("A"), "cpu", ["train.seed_index=-1"])


def test_flatten_gives_dotted_string_params_and_round_trips():
    cfg = load_config(pipeline_path("B"), "cpu", ["model.name=att_equiunet", "optim.eps=1e-8"])
    flat = flatten(cfg)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in flat.items())
    assert flat["optim.lr"] == "0.003" and flat["data.patch_size"] == "[48, 48, 48]"
    assert flat["train.swa.enabled"] == "false" and flat["pipeline"] == "B"
    n_leaves = sum(1 for _ in _leaves(to_dict(cfg)))
    assert len(flat) == n_leaves
    assert unflatten(flat) == cfg
    assert from_dict(to_dict(cfg)) == cfg


def test_configs_are_frozen():
    cfg = load_config(pipeline_path("A"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.model.width = 8  # type: ignore[misc]


def _leaves(d: dict):
    for v in d.values():
        if isinstance(v, dict):
            yield from _leaves(v)
        else:
            yield v


def test_experiments_dir_holds_the_pipelines():
    assert pipeline_path("a") == EXPERIMENTS_DIR / "pipeline_a.toml"
    assert isinstance(EXPERIMENTS_DIR, Path) and pipeline_path("B").is_file()
    with pytest.raises(ConfigError, match="unknown pipeline 'C'"):
        pipeline_path("C")


def test_excluded_cases_are_a_list_of_names_that_round_trips():
    cfg = load_config(pipeline_path("A"), "cpu", ['data.exclude=["BraTS20_Training_007", "BraTS20_Training_012"]'])
    assert cfg.data.exclude == ("BraTS20_Training_007", "BraTS20_Training_012")
    assert flatten(cfg)["data.exclude"] == '["BraTS20_Training_007", "BraTS20_Training_012"]'
    assert unflatten(flatten(cfg)) == cfg
    assert config_hash(cfg) != config_hash(load_config(pipeline_path("A"), "cpu"))
    with pytest.raises(ConfigError, match="data.exclude.*expected a string"):
        load_config(pipeline_path("A"), "cpu", ["data.exclude=[1, 2]"])


def test_channel_counts_are_the_modalities_and_the_regions():
    """config.py sits below data/ and labels.py in the import graph: its constants are kept equal
    to theirs here."""
    from brats_lab.config import IN_CHANNELS, OUT_CHANNELS
    from brats_lab.data.cases import MODALITIES
    from brats_lab.labels import REGIONS

    assert (IN_CHANNELS, OUT_CHANNELS) == (len(MODALITIES), len(REGIONS))
