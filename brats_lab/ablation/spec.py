"""An ablation as data: a base pipeline, the arms (config diffs), the baseline arm and the folds.

    experiments/ablations/attention.toml
        name, description, pipeline, baseline, folds
        [arms]   arm name = ["key=value", ...]    (--set overrides over the pipeline + profile)
        [cpu]    folds, set                       (the CPU demo: fewer folds, a shorter schedule)
        [removal] arm, metric, fraction           (patient removal: which arm trains without the
                                                   cases the baseline scores worst out of fold)
        [phantom] dataset, corrupt_fraction       (the phantoms written when there is no data)
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path

from brats_lab.config import EXPERIMENTS_DIR, ConfigError, ExperimentConfig, load_config, pipeline_path

ABLATIONS_DIR = EXPERIMENTS_DIR / "ablations"
_KEYS = {"name", "description", "pipeline", "baseline", "folds", "arms", "cpu", "removal", "phantom"}
_CPU_KEYS = {"folds", "set"}
_REMOVAL_KEYS = {"arm", "metric", "fraction"}
_PHANTOM_KEYS = {"dataset", "corrupt_fraction"}


@dataclass(frozen=True)
class Removal:
    """Patient removal: `arm` retrains without the `fraction` of cases with the lowest out-of-fold
    `metric` under the baseline (a case whose labels the network cannot learn scores worst)."""

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
    cpu_folds: int | None = None
    cpu_set: tuple[str, ...] = ()
    removal: Removal | None = None
    phantom_dataset: str | None = None  # where to write phantoms when there is no data
    phantom_corrupt_fraction: float = 0.0
    source: str = ""

    def fold_count(self, profile: str) -> int:
        return self.cpu_folds if profile == "cpu" and self.cpu_folds else self.folds

    def arm_config(self, arm: str, profile: str, extra: list[str] = ()) -> ExperimentConfig:
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
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None
    _known(data, _KEYS, path, "")
    _known(data.get("cpu", {}), _CPU_KEYS, path, "cpu.")
    _known(data.get("removal", {}), _REMOVAL_KEYS, path, "removal.")
    _known(data.get("phantom", {}), _PHANTOM_KEYS, path, "phantom.")
    for key in ("name", "pipeline", "baseline", "arms"):
        if key not in data:
            raise ConfigError(f"{path}: missing key {key!r}")
    for arm, overrides in data["arms"].items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{path}: arm {arm!r} must be a list of \"key=value\" overrides, got {overrides!r}")
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
    ablation = Ablation(
        name=str(data["name"]),
        description=str(data.get("description", "")),
        pipeline=str(data["pipeline"]),
        baseline=str(data["baseline"]),
        folds=int(data.get("folds", 5)),
        arms=arms,
        cpu_folds=data.get("cpu", {}).get("folds"),
        cpu_set=tuple(data.get("cpu", {}).get("set", ())),
        removal=removal,
        phantom_dataset=data.get("phantom", {}).get("dataset"),
        phantom_corrupt_fraction=float(data.get("phantom", {}).get("corrupt_fraction", 0.0)),
        source=str(path),
    )
    for arm in arms:  # every arm must resolve to a valid config, now rather than mid-study
        ablation.arm_config(arm, "cpu")
        ablation.arm_config(arm, "paper")
    return ablation


def _known(data: dict, keys: set[str], path: Path, prefix: str) -> None:
    for key in data:
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f"; did you mean {prefix}{close[0]!r}?" if close else ""
            raise ConfigError(f"{path}: unknown key {prefix}{key!r} (allowed: {', '.join(sorted(keys))}){hint}")
