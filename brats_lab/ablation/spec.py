"""An ablation as data: a base pipeline, the arms (config diffs), the baseline arm and the folds.

    experiments/ablations/attention.toml
        name, description, pipeline, baseline, folds, seeds
        [arms]   arm name = ["key=value", ...]    (--set overrides over the pipeline + profile)
        [cpu]    folds, seeds, set                (the CPU demo: fewer folds and seeds, on the shared
                                                   schedule of experiments/cpu_demo.toml, then `set`)

`seeds = K` trains every (arm, fold) K times: seed k sets `train.seed_index` = k, and each fold run
trains with a seed drawn from (the arm's `train.seed`, k, fold) (weights, patches, augmentation;
`TrainConfig.run_seed`), so no two folds nor seeds share one. Arms with the same `train.seed` get
the same seed in each (k, fold), and an A/A study is two arms that differ only in `train.seed`
(seeds.toml). The seed index is the ablation's own: an arm may not set it, and no two (arm, seed)
may train the same run in any fold (`refuse_shared_runs`).
        [removal] arm, metric, fraction           (patient removal: which arm trains without the
                                                   cases the baseline scores worst out of fold)
        [phantom] dataset, corrupt_fraction       (the phantoms written when there is no data)
        [search]  trials, seed, [search.params] "key" = {low, high, log}
                                                  (optional: after the arms, Optuna's TPE sampler
                                                   searches these values around the baseline arm)
        [slurm]   partition, account, workers, ... (`--slurm`: the job array; ablation/slurm.py)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from typing import Any, Sequence
from dataclasses import dataclass
from pathlib import Path

from brats_lab import DataError
from brats_lab.ablation.slurm import check_table
from brats_lab.config import EXPERIMENTS_DIR, SEED_LIMIT, ConfigError, ExperimentConfig, config_hash, load_config, pipeline_path
from brats_lab.evaluation.metrics import METRIC_REGIONS, metric_direction

ABLATIONS_DIR = EXPERIMENTS_DIR / "ablations"
CPU_DEMO = EXPERIMENTS_DIR / "cpu_demo.toml"  # the one CPU demo schedule every ablation's [cpu] shares
_KEYS = {"name", "description", "pipeline", "baseline", "folds", "seeds", "arms", "cpu", "removal", "phantom", "search", "slurm"}
_CPU_KEYS = {"folds", "seeds", "set"}
_REMOVAL_KEYS = {"arm", "metric", "fraction"}
_PHANTOM_KEYS = {"dataset", "corrupt_fraction"}
_SEARCH_KEYS = {"trials", "seed", "params"}


@dataclass(frozen=True)
class Search:
    """A hyperparameter search over the baseline arm: each trial is one sampled configuration,
    trained on the ablation's folds and scored by its mean out-of-fold `metric`."""

    trials: int
    params: dict[str, tuple[float, float, bool]]  # dotted key -> (low, high, log scale)
    seed: int = 0
    metric: str = "dice_WT"


@dataclass(frozen=True)
class Removal:
    """Patient removal: `arm` retrains without the `fraction` of cases with the worst out-of-fold
    `metric` under the baseline, in the metric's direction (the lowest Dice, the highest HD95): a
    case whose labels the network cannot learn scores worst. `metric` is a per-case column
    (`dice_WT`), checked when the ablation is loaded."""

    arm: str
    metric: str = "dice_WT"
    fraction: float = 0.1


@dataclass(frozen=True)
class Ablation:
    name: str
    description: str
    pipeline: str
    baseline: str
    folds: int
    arms: dict[str, tuple[str, ...]]  # arm name -> overrides
    seeds: int = 1
    cpu_folds: int | None = None
    cpu_seeds: int | None = None
    cpu_set: tuple[str, ...] = ()
    removal: Removal | None = None
    search: Search | None = None
    phantom_dataset: str | None = None  # where to write phantoms when there is no data
    phantom_corrupt_fraction: float = 0.0
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)  # the [slurm] table, checked (ablation/slurm.py)
    source: str = ""
    text: str = ""  # the TOML itself, so a worker on another machine needs no copy of the file

    def fold_count(self, profile: str) -> int:
        return self.cpu_folds if profile == "cpu" and self.cpu_folds else self.folds

    def seed_count(self, profile: str) -> int:
        return self.cpu_seeds if profile == "cpu" and self.cpu_seeds else self.seeds

    def arm_config(self, arm: str, profile: str, extra: Sequence[str] = ()) -> ExperimentConfig:
        """The resolved config of one arm: pipeline, profile, the profile's demo settings, the arm's
        overrides, then `extra` (e.g. the dataset)."""
        base = list(self.cpu_set) if profile == "cpu" else []
        return load_config(pipeline_path(self.pipeline), profile, [*base, *self.arms[arm], *extra])


def available() -> list[str]:
    return sorted(p.stem for p in ABLATIONS_DIR.glob("*.toml"))


def load_ablation(name_or_path: str | Path) -> Ablation:
    """`attention` -> experiments/ablations/attention.toml, or a path to a TOML file."""
    text = str(name_or_path)
    path = Path(text) if text.endswith(".toml") else ABLATIONS_DIR / f"{text}.toml"
    if not path.is_file():
        close = difflib.get_close_matches(text, available(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"no ablation {text!r} ({path} does not exist); known: {', '.join(available())}{hint}")
    return parse_ablation(path.read_text(), path)


def parse_ablation(text: str, path: Path | str) -> Ablation:
    """An ablation from its TOML text (`path` names it in messages and in `Ablation.source`)."""
    path = Path(path)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    _known(data, _KEYS, path, "")
    _known(data.get("cpu", {}), _CPU_KEYS, path, "cpu.")
    _known(data.get("removal", {}), _REMOVAL_KEYS, path, "removal.")
    _known(data.get("phantom", {}), _PHANTOM_KEYS, path, "phantom.")
    _known(data.get("search", {}), _SEARCH_KEYS, path, "search.")
    for key in ("name", "pipeline", "baseline", "arms"):
        if key not in data:
            raise ConfigError(f"{path}: missing key {key!r}")
    _check_types(data, path)
    arms = {str(k): tuple(v) for k, v in data["arms"].items()}
    if len(arms) < 2 or data["baseline"] not in arms:
        raise ConfigError(f"{path}: needs at least two arms, one of them the baseline {data['baseline']!r}; got {list(arms)}")
    removal = None
    if "removal" in data:
        removal = Removal(**data["removal"])
        if removal.arm not in arms or removal.arm == data["baseline"]:
            raise ConfigError(f"{path}: removal.arm must be one of the arms other than the baseline, got {removal.arm!r}")
        if not 0 < removal.fraction < 1:
            raise ConfigError(f"{path}: removal.fraction must be between 0 and 1, got {removal.fraction}")
        _check_removal_metric(removal.metric, path)
    search = None
    if "search" in data:
        params = {}
        for key, spec in data["search"].get("params", {}).items():
            if not isinstance(spec, dict) or not {"low", "high"} <= set(spec) or not spec["low"] < spec["high"]:
                raise ConfigError(f"{path}: search.params.{key} must be {{low = ..., high = ..., log = true|false}} with low < high")
            low, high, log = float(spec["low"]), float(spec["high"]), bool(spec.get("log", False))
            if log and low <= 0:  # Optuna refuses it only when the first search trial samples, after every arm trained
                raise ConfigError(f"{path}: search.params.{key}: a log-scale range needs low > 0, got low = {spec['low']!r}")
            params[key] = (low, high, log)
        if not params or int(data["search"].get("trials", 0)) < 1:
            raise ConfigError(f"{path}: a [search] needs trials >= 1 and at least one entry in [search.params]")
        search = Search(trials=int(data["search"]["trials"]), params=params, seed=int(data["search"].get("seed", 0)))
    if "slurm" in data:  # not part of any run's config: where the workers run
        try:
            check_table(data["slurm"], str(path))
        except DataError as e:
            raise ConfigError(str(e)) from None
    ablation = Ablation(
        name=str(data["name"]),
        description=str(data.get("description", "")),
        pipeline=str(data["pipeline"]),
        baseline=str(data["baseline"]),
        folds=int(data.get("folds", 5)),
        arms=arms,
        seeds=int(data.get("seeds", 1)),
        cpu_folds=data.get("cpu", {}).get("folds"),
        cpu_seeds=data.get("cpu", {}).get("seeds"),
        cpu_set=(*_cpu_demo(), *data["cpu"].get("set", ())) if "cpu" in data else (),
        removal=removal,
        search=search,
        phantom_dataset=data.get("phantom", {}).get("dataset"),
        phantom_corrupt_fraction=float(data.get("phantom", {}).get("corrupt_fraction", 0.0)),
        slurm=dict(data.get("slurm", {})),
        source=str(path),
        text=text,
    )
    for arm in arms:  # every arm must resolve to a valid config, now rather than mid-study
        ablation.arm_config(arm, "cpu")
        ablation.arm_config(arm, "paper")
    for profile in ("cpu", "paper"):
        refuse_shared_runs(ablation, profile, ablation.fold_count(profile), ablation.seed_count(profile))
    if search is not None:  # every searched key must exist, and take both ends of its range
        for profile in ("cpu", "paper"):
            for end in (0, 1):  # Optuna samples floats: a key that takes none is refused here
                try:
                    ablation.arm_config(ablation.baseline, profile, [f"{k}={bounds[end]!r}" for k, bounds in search.params.items()])
                except ConfigError as e:
                    raise ConfigError(f"{path}: [search.params] {e}") from None
    return ablation


def _check_removal_metric(metric: str, path: Path) -> None:
    """A misspelt metric is refused now, not after the baseline's whole pass: it must be a metric
    with a declared direction, and a per-case column, so one region (`dice_WT`, not `dice`)."""
    try:
        metric_direction(metric)
    except DataError as e:
        raise ConfigError(f"{path}: removal.metric: {e}") from None
    if metric.startswith(("final_", "val_")) or metric.rpartition("_")[2] not in METRIC_REGIONS:
        raise ConfigError(f"{path}: removal.metric must be a per-case column, one metric of one region "
                          f"such as 'dice_WT' or 'hd95_WT', got {metric!r}")


def _cpu_demo() -> tuple[str, ...]:
    """The overrides of experiments/cpu_demo.toml: one schedule for every ablation's CPU demo."""
    try:
        data = tomllib.loads(CPU_DEMO.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{CPU_DEMO}: cannot read the CPU demo schedule ({e})") from None
    _known(data, {"set"}, CPU_DEMO, "")
    return tuple(data.get("set", ()))


def _known(data: dict, keys: set[str], path: Path, prefix: str) -> None:
    for key in data:
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f"; did you mean {prefix}{close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown key {prefix}{key!r} (allowed: {', '.join(sorted(keys))}){hint}")


# Each key's expected type: (checks, what to say). Integers are accepted where numbers are.
_INT = (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")
_NUMBER = (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number")
_FINITE = (lambda v: _NUMBER[0](v) and math.isfinite(v), "a finite number")
_TEXT = (lambda v: isinstance(v, str), "a string")
_BOOL = (lambda v: isinstance(v, bool), "a boolean (true/false)")
_TABLE = (lambda v: isinstance(v, dict), "a table")
_ANY = (lambda v: True, "anything")  # a key this table does not know yet: `_known` decides
_TEXTS = (lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v), 'a list of "key=value" strings')
_TYPES: dict[str, tuple[Any, str]] = {
    "name": _TEXT, "description": _TEXT, "pipeline": _TEXT, "baseline": _TEXT, "folds": _INT,
    "arms": _TABLE, "cpu": _TABLE, "removal": _TABLE, "phantom": _TABLE, "search": _TABLE, "slurm": _TABLE,
    "seeds": _INT, "cpu.folds": _INT, "cpu.seeds": _INT, "cpu.set": _TEXTS,
    "removal.arm": _TEXT, "removal.metric": _TEXT, "removal.fraction": _NUMBER,
    "phantom.dataset": _TEXT, "phantom.corrupt_fraction": _NUMBER,
    "search.trials": _INT, "search.seed": _INT, "search.params": _TABLE,
}
_AT_LEAST_ONE = ("folds", "seeds", "cpu.folds", "cpu.seeds", "search.trials")


def _check_types(data: dict, path: Path) -> None:
    """Every value of the right type (and fold and trial counts >= 1), so a typo such as
    `folds = "two"` is one line naming the key and what was expected, not a traceback later."""

    def expect(key: str, value: Any, kind: tuple[Any, str]) -> None:
        if not kind[0](value):
            raise ConfigError(f"{path}: {key} must be {kind[1]}, got {value!r}")

    for key, value in data.items():
        expect(key, value, _TYPES.get(key, _ANY))
        if isinstance(value, dict) and key != "arms":
            for sub, subvalue in value.items():
                expect(f"{key}.{sub}", subvalue, _TYPES.get(f"{key}.{sub}", _ANY))
    for key in _AT_LEAST_ONE:
        section, _, sub = key.rpartition(".")
        value = data.get(section, {}).get(sub) if section else data.get(key)
        if value is not None and value < 1:
            raise ConfigError(f"{path}: {key} must be >= 1, got {value}")
    if "removal" in data and "arm" not in data["removal"]:
        raise ConfigError(f"{path}: [removal] needs arm = \"...\" (the arm that trains without the removed cases)")
    for arm, overrides in data["arms"].items():
        if not _TEXTS[0](overrides):
            raise ConfigError(f"{path}: arm {arm!r} must be a list of \"key=value\" overrides, got {overrides!r}")
    for param, spec in data.get("search", {}).get("params", {}).items():
        where = f"search.params.{param}"
        expect(where, spec, _TABLE)
        _known(spec, {"low", "high", "log"}, path, f"{where}.")
        for bound in ("low", "high"):
            if bound in spec:
                expect(f"{where}.{bound}", spec[bound], _FINITE)
        if "log" in spec:
            expect(f"{where}.log", spec["log"], _BOOL)
    seed = data.get("search", {}).get("seed")
    if seed is not None and not 0 <= seed < SEED_LIMIT:  # what Optuna's TPE sampler (numpy) accepts
        raise ConfigError(f"{path}: search.seed must be between 0 and 2**32 - 1, got {seed}")
    for key in ("removal.fraction", "phantom.corrupt_fraction"):
        section, _, sub = key.partition(".")
        value = data.get(section, {}).get(sub)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{path}: {key} must be a finite number, got {value!r}")
    corrupt = data.get("phantom", {}).get("corrupt_fraction")
    if corrupt is not None and not 0 <= corrupt <= 1:
        raise ConfigError(f"{path}: phantom.corrupt_fraction must be between 0 and 1, got {corrupt}")


def refuse_shared_runs(ablation: Ablation, profile: str, folds: int, seeds: int) -> None:
    """No two (arm, seed k) may train the same run: the same configuration with the same run seed
    in the same fold. One run would stand for both, and the study would compare it with itself
    (issue 27: when seed k was `train.seed` + k, an arm at the baseline's seed + 1 trained the
    baseline's seed 1 as its seed 0). Every (arm, seed) is checked in every fold; no arm may set
    `train.seed_index`, which the seeds set. A removal arm differs from the baseline only once its
    excluded cases are known, so it is left out of the comparison."""
    arms = {arm: ablation.arm_config(arm, profile) for arm in ablation.arms}
    for arm, cfg in arms.items():
        if cfg.train.seed_index != 0:
            raise ConfigError(f"{ablation.source}: arm {arm!r} sets train.seed_index={cfg.train.seed_index} (profile {profile}); "
                              "the ablation's seeds set it (seed k trains with seed_index k): use seeds = K, or another train.seed")
    if ablation.removal is not None:
        del arms[ablation.removal.arm]
    identical: dict[str, str] = {}
    for arm, cfg in arms.items():
        chash = config_hash(cfg)
        if chash in identical:
            raise ConfigError(
                f"{ablation.source}: arms {identical[chash]!r} and {arm!r} resolve to the same configuration "
                f"(profile {profile}): they would train the same runs and compare an arm with itself; "
                "make them differ, or for an A/A comparison use seeds (brats-lab ablate seeds)")
        identical[chash] = arm
    for fold in range(folds):
        seen: dict[str, tuple[str, int]] = {}
        for arm, cfg in arms.items():
            for k in range(seeds):
                train = dataclasses.replace(cfg.train, seed_index=k)
                # The run as the trainer sees it: this fold's seed in place of (train.seed, k).
                run = dataclasses.replace(cfg, train=dataclasses.replace(train, seed=train.run_seed(fold), seed_index=0))
                key = config_hash(run)
                if key in seen:
                    other, j = seen[key]
                    raise ConfigError(
                        f"{ablation.source}: arm {other!r} seed {j} and arm {arm!r} seed {k} would train the same run in fold {fold} "
                        f"(profile {profile}: the same configuration with run seed {run.train.seed}); one run would count for "
                        "both and the study would compare it with itself; give one of the arms another train.seed")
                seen[key] = (arm, k)
