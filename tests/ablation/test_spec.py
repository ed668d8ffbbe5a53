"""The ablation TOMLs as data: the CPU demo schedule they share (experiments/cpu_demo.toml), and the
removal metric they are refused for."""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest

from brats_lab.ablation.spec import ABLATIONS_DIR, Ablation, Removal, Search, available, load_ablation, parse_ablation
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


def test_the_positive_control_trains_one_arm_a_quarter_of_the_demo_epochs():
    ablation = load_ablation("handicap")
    base, handicapped = (ablation.arm_config(arm, "cpu") for arm in ("equiunet", "quarter-epochs"))
    assert ablation.baseline == "equiunet" and handicapped.train.epochs * 4 == base.train.epochs
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


# --------------------------------------------------------------------------------------------
# The file read key by key, in the test process: what each key gives, and every refusal whole


def whole(message: str) -> str:
    """A `match` pattern for exactly this message."""
    return f"^{re.escape(message)}$"


PATH = "a.toml"  # the path `parse_ablation` names in its messages
TINY = ("model.width=4", "data.patch_size=[32, 32, 32]", "data.folds=2", "train.batch_size=2", "train.epochs=2",
        "train.swa.enabled=false", "train.val_every=1")  # each arm's settings in BASE
# The file these tests edit, spelled out (conftest's `tiny_ablation()`): the parser reads this text.
BASE = """
name = "tiny-attention"
description = "tiny equiunet against att_equiunet"
pipeline = "A"
baseline = "equiunet"
folds = 2
seeds = 1

[arms]
equiunet = ["model.name=equiunet", "model.width=4", "data.patch_size=[32, 32, 32]", "data.folds=2", "train.batch_size=2", "train.epochs=2", "train.swa.enabled=false", "train.val_every=1"]
att_equiunet = ["model.name=att_equiunet", "model.width=4", "data.patch_size=[32, 32, 32]", "data.folds=2", "train.batch_size=2", "train.epochs=2", "train.swa.enabled=false", "train.val_every=1"]
"""
ALLOWED = "arms, baseline, cpu, description, folds, name, phantom, pipeline, removal, search, seeds, slurm"
LR = '[search]\ntrials = 1\n[search.params]\n"optim.lr" = '  # then the range


def _edit(replace: dict[str, str] | None = None, *, top: str = "", append: str = "") -> str:
    text = BASE
    for old, new in (replace or {}).items():
        assert old in text
        text = text.replace(old, new)
    return top + text + append


ARM_LINE = next(line for line in BASE.splitlines() if line.startswith("att_equiunet = "))
REFUSALS = {  # name -> (TOML text, the whole message)
    "an unknown key, and a close one": (_edit(top="fold = 3\n"), f"unknown key 'fold' (allowed: {ALLOWED}); did you mean 'folds'?"),
    "an unknown key, nothing close": (_edit(top="zzz = 3\n"), f"unknown key 'zzz' (allowed: {ALLOWED})"),
    "cpu.fold": (_edit(append="[cpu]\nfold = 2\n"), "unknown key cpu.'fold' (allowed: folds, seeds, set); did you mean cpu.'folds'?"),
    "removal.arms": (_edit(append='[removal]\narms = "x"\n'),
                     "unknown key removal.'arms' (allowed: arm, fraction, metric); did you mean removal.'arm'?"),
    "phantom.data": (_edit(append='[phantom]\ndata = "x"\n'),
                     "unknown key phantom.'data' (allowed: corrupt_fraction, dataset); did you mean phantom.'dataset'?"),
    "search.trial": (_edit(append="[search]\ntrial = 2\n"),
                     "unknown key search.'trial' (allowed: params, seed, trials); did you mean search.'trials'?"),
    **{f"no {key}": (_edit({line: ""}), f"missing key {key!r}") for key, line in (
        ("name", 'name = "tiny-attention"\n'), ("pipeline", 'pipeline = "A"\n'), ("baseline", 'baseline = "equiunet"\n'))},
    "no arms": (BASE.split("[arms]")[0], "missing key 'arms'"),
    "folds as words": (_edit({"folds = 2": 'folds = "two"'}), "folds must be an integer, got 'two'"),
    "folds as a boolean": (_edit({"folds = 2": "folds = true"}), "folds must be an integer, got True"),
    "description as a number": (_edit({'description = "tiny equiunet against att_equiunet"': "description = 3"}),
                                "description must be a string, got 3"),
    "arms as a list": (BASE.split("[arms]")[0] + 'arms = ["a", "b"]\n', "arms must be a table, got ['a', 'b']"),
    "slurm as a number": (_edit(top="slurm = 3\n"), "slurm must be a table, got 3"),
    "cpu.folds as words": (_edit(append='[cpu]\nfolds = "x"\n'), "cpu.folds must be an integer, got 'x'"),
    "cpu.set as a string": (_edit(append='[cpu]\nset = "x"\n'), "cpu.set must be a list of \"key=value\" strings, got 'x'"),
    "removal.fraction as words": (_edit(append='[removal]\narm = "att_equiunet"\nfraction = "x"\n'),
                                  "removal.fraction must be a number, got 'x'"),
    **{f"{key} = 0": (text, f"{key} must be >= 1, got 0") for key, text in (
        ("folds", _edit({"folds = 2": "folds = 0"})), ("seeds", _edit({"seeds = 1": "seeds = 0"})),
        ("cpu.folds", _edit(append="[cpu]\nfolds = 0\n")), ("cpu.seeds", _edit(append="[cpu]\nseeds = 0\n")),
        ("search.trials", _edit(append='[search]\ntrials = 0\n[search.params]\n"optim.lr" = {low = 1e-5, high = 1e-3}\n')))},
    "removal without an arm": (_edit(append="[removal]\nfraction = 0.2\n"),
                               '[removal] needs arm = "..." (the arm that trains without the removed cases)'),
    "an arm of numbers": (_edit({ARM_LINE: "att_equiunet = [1]"}), "arm 'att_equiunet' must be a list of \"key=value\" overrides, got [1]"),
    "a search range as a number": (_edit(append=LR + "3\n"), "search.params.optim.lr must be a table, got 3"),
    "a search range with a misspelt key": (
        _edit(append=LR + "{low = 1e-5, high = 1e-3, lo = 1}\n"),
        "unknown key search.params.optim.lr.'lo' (allowed: high, log, low); did you mean search.params.optim.lr.'low'?"),
    "a search bound as words": (_edit(append=LR + '{low = "a", high = 1e-3}\n'), "search.params.optim.lr.low must be a finite number, got 'a'"),
    "a search bound inf": (_edit(append=LR + "{low = 1e-5, high = inf}\n"), "search.params.optim.lr.high must be a finite number, got inf"),
    "log as words": (_edit(append=LR + '{low = 1e-5, high = 1e-3, log = "yes"}\n'),
                     "search.params.optim.lr.log must be a boolean (true/false), got 'yes'"),
    **{f"search.seed = {seed}": (_edit(append=f'[search]\ntrials = 1\nseed = {seed}\n[search.params]\n"optim.lr" = {{low = 1e-5, high = 1e-3}}\n'),
                                 f"search.seed must be between 0 and 2**32 - 1, got {seed}") for seed in (-1, 2**32)},
    "removal.fraction nan": (_edit(append='[removal]\narm = "att_equiunet"\nfraction = nan\n'), "removal.fraction must be a finite number, got nan"),
    "phantom.corrupt_fraction nan": (_edit(append="[phantom]\ncorrupt_fraction = nan\n"),
                                     "phantom.corrupt_fraction must be a finite number, got nan"),
    **{f"phantom.corrupt_fraction = {v}": (_edit(append=f"[phantom]\ncorrupt_fraction = {v}\n"),
                                           f"phantom.corrupt_fraction must be between 0 and 1, got {v}") for v in (-0.5, 1.5)},
    "one arm": (_edit({ARM_LINE: ""}), "needs at least two arms, one of them the baseline 'equiunet'; got ['equiunet']"),
    "a baseline that is no arm": (_edit({'baseline = "equiunet"': 'baseline = "unet"'}),
                                  "needs at least two arms, one of them the baseline 'unet'; got ['equiunet', 'att_equiunet']"),
    **{f"removal.arm = {arm!r}": (_edit(append=f'[removal]\narm = "{arm}"\n'),
                                  f"removal.arm must be one of the arms other than the baseline, got {arm!r}") for arm in ("equiunet", "unet")},
    **{f"removal.fraction = {v}": (_edit(append=f'[removal]\narm = "att_equiunet"\nfraction = {v}\n'),
                                   f"removal.fraction must be between 0 and 1, got {v}") for v in (0, 1, 1.5)},
    "removal.metric of the validation": (_edit(append='[removal]\narm = "att_equiunet"\nmetric = "val_dice_WT"\n'),
                                         "removal.metric must be a per-case column, one metric of one region such as 'dice_WT' or "
                                         "'hd95_WT', got 'val_dice_WT'"),
    **{f"a search range {r}": (_edit(append=LR + r + "\n"),
                               "search.params.optim.lr must be {low = ..., high = ..., log = true|false} with low < high")
       for r in ("{low = 1e-3}", "{high = 1e-3}", "{low = 1e-3, high = 1e-3}", "{low = 1e-3, high = 1e-5}")},
    **{f"a log range from {low}": (_edit(append=LR + f"{{low = {low}, high = 1e-3, log = true}}\n"),
                                   f"search.params.optim.lr: a log-scale range needs low > 0, got low = {low}") for low in ("0.0", "-1.0")},
    "a search without params": (_edit(append="[search]\ntrials = 2\n"),
                                "a [search] needs trials >= 1 and at least one entry in [search.params]"),
    "a search without trials": (_edit(append='[search.params]\n"optim.lr" = {low = 1e-5, high = 1e-3}\n'),
                                "a [search] needs trials >= 1 and at least one entry in [search.params]"),
    "a search over an integer": (_edit(append='[search]\ntrials = 1\n[search.params]\n"model.width" = {low = 4, high = 8}\n'),
                                 "[search.params] model.width in --set model.width=4.0: expected an integer, got 4.0 (float)"),
    **{f"a search range {low} to {high}": (
        _edit(append=f'[search]\ntrials = 1\n[search.params]\n"train.decay_start" = {{low = {low}, high = {high}}}\n'),
        f"[search.params] train.decay_start (from --set train.decay_start={bad}): must be in [0, 1], got {bad}")
       for low, high, bad in ((0.5, 1.5, 1.5), (-0.5, 0.5, -0.5))},  # each end is tried
    "a misspelt slurm key": (_edit(append='[slurm]\npartitio = "x"\n'),
                             "unknown key 'slurm.partitio'; did you mean 'slurm.partition'? (allowed: partition, account, workers, "
                             "gpus_per_worker, cpus_per_worker, mem, time, signal_delay, sbatch; other sbatch options go in [slurm.sbatch])"),
    "an arm that sets the seed index": (
        _edit({'"model.name=att_equiunet", ': '"model.name=att_equiunet", "train.seed_index=1", '}),
        "arm 'att_equiunet' sets train.seed_index=1 (profile cpu); the ablation's seeds set it (seed k trains with seed_index k): "
        "use seeds = K, or another train.seed"),
    "two arms alike": (_edit({'"model.name=att_equiunet", ': '"model.name=equiunet", '}),
                       "arms 'equiunet' and 'att_equiunet' resolve to the same configuration (profile cpu): they would train the same "
                       "runs and compare an arm with itself; make them differ, or for an A/A comparison use seeds (brats-lab ablate seeds)"),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_every_refusal_of_an_ablation_file_is_one_message_naming_the_file_and_the_key(name):
    text, message = REFUSALS[name]
    with pytest.raises(ConfigError, match=whole(f"{PATH}: {message}")):
        parse_ablation(text, PATH)


def test_an_ablation_file_is_read_key_by_key():
    demo = tuple(tomllib.loads((EXPERIMENTS_DIR / "cpu_demo.toml").read_text())["set"])
    arms = {"equiunet": ("model.name=equiunet", *TINY), "att_equiunet": ("model.name=att_equiunet", *TINY)}
    text = _edit({"folds = 2\n": "", "seeds = 1\n": "", 'description = "tiny equiunet against att_equiunet"\n': ""}) + (
        '[cpu]\nfolds = 2\nseeds = 2\nset = ["train.swa.cycles=3"]\n'
        '[removal]\narm = "att_equiunet"\nmetric = "hd95_TC"\nfraction = 0.25\n'
        '[phantom]\ndataset = "ph"\ncorrupt_fraction = 1\n'
        '[search]\ntrials = 1\nseed = 4294967295\n'
        '[search.params]\n"optim.lr" = {low = 1e-5, high = 1e-3, log = true}\n"optim.weight_decay" = {low = 0, high = 1e-4}\n'
        '[slurm]\npartition = "gpu"\n')
    assert parse_ablation(text, PATH) == Ablation(
        name="tiny-attention", description="", pipeline="A", baseline="equiunet", folds=5, arms=arms, seeds=1,
        cpu_folds=2, cpu_seeds=2, cpu_set=(*demo, "train.swa.cycles=3"), removal=Removal("att_equiunet", "hd95_TC", 0.25),
        search=Search(1, {"optim.lr": (1e-5, 1e-3, True), "optim.weight_decay": (0.0, 1e-4, False)}, seed=4294967295),
        phantom_dataset="ph", phantom_corrupt_fraction=1.0, slurm={"partition": "gpu"}, source=PATH, text=text)
    # The defaults: no [cpu], [removal], [search], [phantom] or [slurm]; a search seed 0, a removal's metric and fraction.
    plain = parse_ablation(BASE, PATH)
    assert (plain.description, plain.folds, plain.seeds, plain.cpu_folds, plain.cpu_seeds, plain.cpu_set) == (
        "tiny equiunet against att_equiunet", 2, 1, None, None, ())
    assert (plain.removal, plain.search, plain.phantom_dataset, plain.phantom_corrupt_fraction, plain.slurm) == (None, None, None, 0.0, {})
    small = parse_ablation(_edit(append='[removal]\narm = "att_equiunet"\n[phantom]\ncorrupt_fraction = 0\n' + LR + "{low = 0.5, high = 1}\n"), PATH)
    assert parse_ablation(_edit(append=LR.replace("trials = 1", "trials = 1\nseed = 0") + "{low = 0.5, high = 1}\n"), PATH).search.seed == 0
    assert small.removal == Removal("att_equiunet", "dice_WT", 0.1) and small.phantom_corrupt_fraction == 0.0
    assert small.search == Search(1, {"optim.lr": (0.5, 1.0, False)}, seed=0, metric="dice_WT")


def test_the_cpu_profile_takes_its_own_fold_and_seed_counts_and_the_paper_profile_the_files():
    ablation = parse_ablation(_edit(append="[cpu]\nfolds = 3\nseeds = 2\n"), PATH)
    assert (ablation.fold_count("cpu"), ablation.seed_count("cpu"), ablation.fold_count("paper"), ablation.seed_count("paper")) == (3, 2, 2, 1)
    plain = parse_ablation(BASE, PATH)
    assert (plain.fold_count("cpu"), plain.seed_count("cpu")) == (2, 1)
    for arm, overrides in plain.arms.items():
        assert to_dict(plain.arm_config(arm, "paper")) == to_dict(load_config(pipeline_path("A"), "paper", list(overrides)))
        assert to_dict(plain.arm_config(arm, "paper", ["data.folds=4"])) == to_dict(
            load_config(pipeline_path("A"), "paper", [*overrides, "data.folds=4"]))


def test_a_run_shared_in_one_fold_or_by_the_cpu_profiles_seeds_only_is_found(monkeypatch, reseeded_ablation):
    """Every fold and every seed of each profile's counts is checked: seeds that collide in fold 1
    only, and with the [cpu] table's second seed only, are refused by name."""
    # fold 0: 10 x train.seed + k (no collision); other folds: train.seed + k (the reseeded arm's seed 0
    # is the baseline's seed 1)
    monkeypatch.setattr(TrainConfig, "run_seed", lambda train, fold: (10 if fold == 0 else 1) * train.seed + train.seed_index)
    shared = ("arm 'equiunet' seed 1 and arm 'reseeded' seed 0 would train the same run in fold 1 (profile {profile}: the same "
              "configuration with run seed 16111991); one run would count for both and the study would compare it with itself; "
              "give one of the arms another train.seed")
    with pytest.raises(ConfigError, match=whole(f"{PATH}: " + shared.format(profile="cpu"))):
        parse_ablation(reseeded_ablation(seeds=2), PATH)
    # Two seeds for the CPU demo only: the paper profile's single seed shares nothing.
    with pytest.raises(ConfigError, match=re.escape(shared.format(profile="cpu"))):
        parse_ablation(reseeded_ablation(seeds=1) + "[cpu]\nseeds = 2\n", PATH)
    # The paper profile's 2 folds, where the CPU demo trains fold 0 only.
    with pytest.raises(ConfigError, match=re.escape(shared.format(profile="paper"))):
        parse_ablation(reseeded_ablation(seeds=2) + "[cpu]\nfolds = 1\nseeds = 1\n", PATH)
    # The CPU demo's 2 folds, where the paper profile trains fold 0 only.
    with pytest.raises(ConfigError, match=re.escape(shared.format(profile="cpu"))):
        parse_ablation(reseeded_ablation(seeds=2).replace("folds = 2", "folds = 1") + "[cpu]\nfolds = 2\n", PATH)
    parse_ablation(reseeded_ablation(seeds=2).replace("folds = 2", "folds = 1"), PATH)  # fold 0 alone shares nothing


def test_arms_are_compared_as_each_profile_resolves_them():
    """An arm that sets pipeline A's own learning rate differs from one that does not under the
    cpu profile (which sets another), not under the paper profile: refused there, by name."""
    lr = load_config(pipeline_path("A")).optim.lr
    assert load_config(pipeline_path("A"), "cpu").optim.lr != lr == load_config(pipeline_path("A"), "paper").optim.lr
    text = _edit({'"model.name=att_equiunet", ': f'"model.name=equiunet", "optim.lr={lr!r}", '})
    with pytest.raises(ConfigError, match=whole(
            f"{PATH}: arms 'equiunet' and 'att_equiunet' resolve to the same configuration (profile paper): they would train the same "
            "runs and compare an arm with itself; make them differ, or for an A/A comparison use seeds (brats-lab ablate seeds)")):
        parse_ablation(text, PATH)


def test_a_file_that_is_not_toml_is_refused_by_name():
    with pytest.raises(ConfigError, match=f"^{re.escape(PATH)}: not valid TOML \\(.+\\)$"):
        parse_ablation(BASE + "[arms\n", PATH)


def test_a_misspelt_ablation_name_is_answered_with_the_known_ones(tmp_path):
    names = available()
    assert {"attention", "handicap", "seeds"} <= set(names) and names == sorted(p.stem for p in ABLATIONS_DIR.glob("*.toml"))
    known = ", ".join(names)
    with pytest.raises(ConfigError, match=whole(f"no ablation 'atention' ({ABLATIONS_DIR / 'atention.toml'} does not exist); "
                                                f"known: {known}; did you mean 'attention'?")):
        load_ablation("atention")
    with pytest.raises(ConfigError, match=whole(f"no ablation 'zzzz' ({ABLATIONS_DIR / 'zzzz.toml'} does not exist); known: {known}")):
        load_ablation("zzzz")
    missing = tmp_path / "mine.toml"
    with pytest.raises(ConfigError, match=re.escape(f"no ablation '{missing}' ({missing} does not exist)")):
        load_ablation(str(missing))


def test_the_shared_cpu_demo_schedule_is_read_and_checked(tmp_path, monkeypatch):
    from brats_lab.ablation import spec

    demo = tmp_path / "cpu_demo.toml"
    monkeypatch.setattr(spec, "CPU_DEMO", demo)
    with_cpu = _edit(append='[cpu]\nset = ["train.swa.cycles=3"]\n')
    demo.write_text("")  # no shared schedule: the ablation's own set alone
    assert parse_ablation(with_cpu, PATH).cpu_set == ("train.swa.cycles=3",)
    demo.write_text('sett = ["train.epochs=3"]\n')
    with pytest.raises(ConfigError, match=whole(f"{demo}: unknown key 'sett' (allowed: set); did you mean 'set'?")):
        parse_ablation(with_cpu, PATH)
    demo.write_text("set = [")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(demo))}: cannot read the CPU demo schedule \\(.+\\)$"):
        parse_ablation(with_cpu, PATH)
