"""Experiment configuration: frozen dataclasses, loaded from TOML in three layers.

    experiments/pipeline_a.toml          the pipeline (its values are the paper's)
      + experiments/profiles/cpu.toml    an optional profile layered over it (`cpu`, `paper`)
      + --set optim.lr=3e-4 ...          command-line overrides, dotted keys

Every layer is checked against the dataclasses before it is merged (`brats_lab/dataclass_toml.py`,
the loader, which knows no schema): an unknown section or key is rejected with a message naming
the key, the file it came from, the allowed keys and the closest one; a value of the wrong type is
rejected with the expected type. This module is the schema: the dataclasses and their checks, the
model registry, where the TOML files are, and the one frozen `ExperimentConfig` they load into;
`to_dict`/`from_dict`, `flatten`/`unflatten` (MLflow params) and `config_hash` (the identity of a
piece of work, with the fold) are defined on it.

Standard library only (and the package's `UserError`, and the loader): this module sits at the
bottom of the import graph.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from brats_lab import UserError
from brats_lab.dataclass_toml import FieldError, Loader, format_value, merge

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
PIPELINES: tuple[str, ...] = ("A", "B")
# The model registry, as data, so that names are checked without torch: each network's name and
# its class in `brats_lab.models.unet`. Every network also has a tiny variant, `<name>_tiny` (the
# same class; `ModelConfig` pins its width to TINY_WIDTH). `brats_lab.models.MODELS` is built from
# this: there is no second list of names.
NETWORKS: dict[str, str] = {
    "unet": "Unet",
    "equiunet": "EquiUnet",
    "att_equiunet": "AttEquiUnet",  # the authors' Att_EquiUnet (their CBAM)
    "att_equiunet_woo": "AttEquiUnetWoo",  # the CBAM paper's spatial gate instead: not the paper's network
}
TINY_SUFFIX = "_tiny"
MODEL_NAMES: tuple[str, ...] = (*NETWORKS, *(name + TINY_SUFFIX for name in NETWORKS))
TINY_WIDTH = 4  # the width a `*_tiny` model name pins
DEFAULT_WIDTH = 48
# The networks pool three times: every spatial size they see must be a multiple of 2**3.
MODEL_STRIDE = 8
IN_CHANNELS = 4  # the modalities, brats_lab.data.cases.MODALITIES; a test keeps the two equal
OUT_CHANNELS = 3  # the regions ET, TC, WT, brats_lab.labels.REGIONS; likewise
SEED_LIMIT = 2**32  # seeds are in [0, 2**32): what every numpy and torch seeding call accepts


class ConfigError(UserError, ValueError):
    """A configuration that cannot be used (a `UserError`; a ValueError as well, as it always was). The message names the key, where it came from, and
    what was expected."""


class _FieldError(FieldError, ConfigError):
    """Raised by a dataclass's own checks; the loader prefixes the section and names the source
    (and a dataclass built directly raises it as a ConfigError)."""


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise _FieldError(name, message)


# --- the dataclasses -------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """Which data, how it is normalised and cut into patches, and how it is split into folds."""

    dataset: str = "data/phantom"  # a dataset root in any supported layout
    normalization: Literal["minmax", "zscore"] = "minmax"  # pipeline A, pipeline B
    patch_size: tuple[int, int, int] = (128, 128, 128)  # random training crop (z, y, x)
    pad_multiple: int = 8  # whole-volume validation/inference pads each axis to a multiple of this (the paper: 8)
    folds: int = 5
    seed: int = 16111990  # of the fold split only, so training seeds can vary over the same folds
    # "brats-lab": a numpy Generator permutation; "authors": the authors' folds exactly (their
    # sorted case folders through scikit-learn's KFold, reimplemented in brats_lab.data.splits).
    split: Literal["brats-lab", "authors"] = "brats-lab"
    num_workers: int = 2  # data-loader processes
    # Cases left out of training (the patient-removal ablation); they stay in validation, so arms
    # with and without them are compared on the same held-out cases.
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _require(
            all(p > 0 and p % MODEL_STRIDE == 0 for p in self.patch_size),
            "patch_size",
            f"every size must be a positive multiple of {MODEL_STRIDE} (the networks pool three "
            f"times), got {list(self.patch_size)}",
        )
        # A patch of 8^3 is one voxel at the bottom of the network, where a normalisation layer
        # (InstanceNorm, GroupNorm of one channel per group) has nothing to normalise over.
        _require(
            any(p > MODEL_STRIDE for p in self.patch_size),
            "patch_size",
            f"must be larger than {MODEL_STRIDE} on at least one axis (the networks pool three times, "
            f"leaving one voxel to normalise), got {list(self.patch_size)}",
        )
        _require(
            self.pad_multiple > 0 and self.pad_multiple % MODEL_STRIDE == 0,
            "pad_multiple",
            f"must be a positive multiple of {MODEL_STRIDE}, got {self.pad_multiple}",
        )
        _require(self.folds >= 2, "folds", f"cross-validation needs at least 2 folds, got {self.folds}")
        _require(0 <= self.seed < SEED_LIMIT, "seed", f"must be between 0 and 2**32 - 1, got {self.seed}")
        _require(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")


@dataclass(frozen=True)
class ModelConfig:
    """The network, built by name by `brats_lab.models.build_model`.

    A `*_tiny` name pins the width to `TINY_WIDTH` (4): a width left at the default 48 becomes 4,
    any other width is rejected, so the logged params always say the width that was built.
    """

    name: Literal[MODEL_NAMES] = "equiunet"  # type: ignore[valid-type]
    width: int = DEFAULT_WIDTH  # channels of the first stage; stages have [w, 2w, 4w, 8w]
    norm: Literal["group", "instance"] = "group"  # pipeline A, pipeline B
    deep_supervision: bool = True
    dropout: float = 0.0  # after every ReLU of the 3x3x3 convs
    in_channels: int = 4  # T1, T1ce, T2, FLAIR
    out_channels: int = 3  # ET, TC, WT

    def __post_init__(self) -> None:
        if self.name.endswith(TINY_SUFFIX):
            _require(
                self.width in (TINY_WIDTH, DEFAULT_WIDTH),
                "width",
                f"model {self.name!r} has width {TINY_WIDTH}, got width={self.width}; "
                f"use model.name={self.name.removesuffix(TINY_SUFFIX)!r} for another width",
            )
            object.__setattr__(self, "width", TINY_WIDTH)
        _require(self.width >= 1, "width", f"must be >= 1, got {self.width}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _require(self.in_channels == IN_CHANNELS, "in_channels",
                 f"must be {IN_CHANNELS} (one per modality: T1, T1ce, T2, FLAIR), got {self.in_channels}")
        _require(self.out_channels == OUT_CHANNELS, "out_channels",
                 f"must be {OUT_CHANNELS} (one per region: ET, TC, WT), got {self.out_channels}")


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer of the main training phase (the SWA phase has its own, see `SwaConfig`)."""

    name: Literal["ranger", "adam"] = "ranger"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.95, 0.999)  # Ranger's; Adam's are (0.9, 0.999)
    eps: float = 1e-5
    weight_decay: float = 0.0
    lookahead_k: int = 6  # Ranger only: Lookahead synchronises every k steps ...
    lookahead_alpha: float = 0.5  # ... moving the slow weights this far towards the fast ones
    grad_centralization: bool = True  # Ranger only

    def __post_init__(self) -> None:
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(all(0.0 <= b < 1.0 for b in self.betas), "betas", f"must be in [0, 1), got {list(self.betas)}")
        _require(self.eps > 0, "eps", f"must be > 0, got {self.eps}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.lookahead_k >= 1, "lookahead_k", f"must be >= 1, got {self.lookahead_k}")
        _require(0.0 < self.lookahead_alpha <= 1.0, "lookahead_alpha", f"must be in (0, 1], got {self.lookahead_alpha}")


@dataclass(frozen=True)
class SwaConfig:
    """Pipeline A's self-ensembling phase after the main schedule (paper section 3.3).

    `cycles` times: a fresh Adam (no weight decay) at `lr`, cosine decay over `cycle_epochs`
    epochs, a snapshot of the weights every `snapshot_every` epochs; all snapshots are averaged.
    """

    enabled: bool = True
    cycles: int = 5
    cycle_epochs: int = 30
    lr: float = 5e-5  # half the main phase's initial lr
    # Period of each cycle's cosine. The authors' code anneals over 40 epochs but stops after 30,
    # so the LR ends near 15% of `lr`; set it to `cycle_epochs` to decay to 0.
    anneal_epochs: int = 40
    snapshot_every: int = 3

    def __post_init__(self) -> None:
        for name in ("cycles", "cycle_epochs", "anneal_epochs", "snapshot_every"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(
            self.snapshot_every <= self.cycle_epochs,
            "snapshot_every",
            f"must be <= cycle_epochs ({self.cycle_epochs}), got {self.snapshot_every}: no snapshot would be taken",
        )


@dataclass(frozen=True)
class TrainConfig:
    """The training loop: length, batch, precision, loss, augmentation, schedule, model selection."""

    epochs: int = 200
    # Patches per epoch, at most the training cases: the first of each epoch's shuffled order, so that
    # the schedule (in epochs) keeps its length on a larger dataset; 0: every case once (the paper).
    epoch_cases: int = 0
    batch_size: int = 1
    seed: int = 16111990  # weights, crops and augmentations, through `run_seed`
    # Which training seed of an ablation this is (seed k, the MLflow tag `seed`). With `seed` and
    # the fold it picks the seed a run trains with (`run_seed`); an ablation sets it, 0 elsewhere.
    seed_index: int = 0
    # "fp16": autocast + loss scaling (the paper); "bf16": autocast, no scaling; "off": float32;
    # "auto": what brats_lab/precision.py's one rule picks on the device (the rule of
    # `predict --precision` too, whose "fp32" is this "off").
    amp: Literal["auto", "fp16", "bf16", "off"] = "auto"
    loss: Literal["dice_squared", "dice"] = "dice_squared"  # A squares the denominator, B does not
    dice_eps: float = 1.0
    # How the main and the auxiliary (deep-supervision) losses combine: the paper sums them, the
    # authors' code averages them (the same gradients up to a factor of 1/(1 + heads)).
    deep_supervision_weighting: Literal["sum", "mean"] = "sum"
    augment: Literal["A", "B", "none"] = "A"  # the augmentation set of pipeline A or B
    schedule: Literal["cosine", "constant"] = "cosine"
    # Fraction of `epochs` at constant LR before the cosine decay (A: 100 of 200; the lr first
    # drops at epoch 102, as in the authors' loop: `training/optim.py`, `main_lr`).
    decay_start: float = 0.5
    warmup_epochs: int = 0  # linear LR warm-up before the schedule (0: none, as in both pipelines)
    min_lr: float = 0.0  # where the cosine ends
    val_every: int = 3  # epochs between validations
    keep: Literal["last", "best"] = "last"  # final (or SWA) weights, or lowest validation loss (B)
    checkpoint_every: int = 1  # epochs between resumable checkpoints
    compile: bool = False  # torch.compile the model
    channels_last: bool = False  # channels_last_3d memory format
    swa: SwaConfig = field(default_factory=SwaConfig)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "val_every", "checkpoint_every"):
            _require(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        _require(self.warmup_epochs >= 0, "warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _require(self.epoch_cases >= 0, "epoch_cases", f"must be >= 0 (0: every training case once), got {self.epoch_cases}")
        _require(0 <= self.seed < SEED_LIMIT, "seed", f"must be between 0 and 2**32 - 1, got {self.seed}")
        _require(0 <= self.seed_index < SEED_LIMIT, "seed_index", f"must be between 0 and 2**32 - 1, got {self.seed_index}")
        _require(0.0 <= self.decay_start <= 1.0, "decay_start", f"must be in [0, 1], got {self.decay_start}")
        _require(self.dice_eps > 0, "dice_eps", f"must be > 0, got {self.dice_eps}")
        _require(self.min_lr >= 0, "min_lr", f"must be >= 0, got {self.min_lr}")

    def run_seed(self, fold: int) -> int:
        """The seed fold `fold` trains with (initial weights, patch order, crops, augmentation):
        drawn from (`seed`, `seed_index`, fold) by sha256, so every fold and every seed index gets
        its own, and two arms with the same `seed` get the same one in each (seed index, fold).

        The folds are the verdict's replicates: a seed shared by every fold would share its luck
        among them (issue 22). A hash, not `seed + k`, so that no arm's seed k is another arm's
        seed 0 (issue 27), nor Python's `hash()`, which differs between processes."""
        text = f"brats-lab run seed {self.seed} {self.seed_index} {fold}"
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")  # in [0, SEED_LIMIT)


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything that defines a training run except the fold.

    The dataclass defaults are pipeline A's published values (except `train.amp`, "auto"); the
    TOML files state every value anyway, so a run never depends on a default silently.
    """

    pipeline: Literal["A", "B"] = "A"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


_LOADER = Loader(ExperimentConfig, ConfigError)


# --- loading -------------------------------------------------------------------------------


def pipeline_path(pipeline: str, experiments: Path = EXPERIMENTS_DIR) -> Path:
    """`A` -> `experiments/pipeline_a.toml`."""
    if pipeline.upper() not in PIPELINES:
        raise ConfigError(f"unknown pipeline {pipeline!r}; expected one of {', '.join(PIPELINES)}")
    return Path(experiments) / f"pipeline_{pipeline.lower()}.toml"


def profile_path(profile: str | Path, experiments: Path = EXPERIMENTS_DIR) -> Path:
    """A profile name (`cpu`) -> `experiments/profiles/cpu.toml`; a path is returned as is."""
    text = str(profile)
    if text.endswith(".toml") or "/" in text or "\\" in text:
        return Path(profile)
    return Path(experiments) / "profiles" / f"{text}.toml"


def load_config(
    path: Path | str,
    profile: str | Path | None = None,
    overrides: Iterable[str] = (),
) -> ExperimentConfig:
    """Read a pipeline TOML, layer a profile over it, then `key=value` overrides.

    `profile` is a name looked up in `profiles/` next to `path` (`cpu`, `paper`) or a path to a
    TOML file. Overrides use dotted keys (`optim.lr=3e-4`, `train.swa.cycles=2`); values are TOML
    literals (`true`, `[64, 64, 64]`, `1e-4`), and text that is not one is taken as a string, so
    `model.name=att_equiunet` needs no quotes. Raises `ConfigError` on any unknown key, wrong
    type or invalid value, naming the key and the layer it came from.
    """
    path = Path(path)
    layers: list[tuple[str, dict]] = [(str(path), _LOADER.read(path))]
    if profile is not None:
        ppath = profile_path(profile, path.parent)
        if not ppath.is_file():
            known = sorted(p.stem for p in (path.parent / "profiles").glob("*.toml"))
            raise ConfigError(
                f"no profile {str(profile)!r}: {ppath} does not exist"
                + (f"; known profiles: {', '.join(known)}" if known else "")
            )
        # A profile's [slurm] table says where `ablate --slurm` runs the workers (ablation/slurm.py
        # reads it), not how a run trains: it is no part of the config or its hash.
        layers.append((str(ppath), {k: v for k, v in _LOADER.read(ppath).items() if k != "slurm"}))
    for item in overrides:
        layers.append((f"--set {item}", _parse_override(item)))
    return _LOADER.build(layers)


def from_dict(data: dict, source: str = "<dict>") -> ExperimentConfig:
    """The inverse of `to_dict`; the same checks as `load_config` (missing keys take defaults)."""
    return _LOADER.build([(source, data)])


def to_dict(cfg: Any) -> dict[str, Any]:
    """A config dataclass -> nested dict of JSON/TOML-ready values (tuples become lists)."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return plain(cfg)


def flatten(cfg: ExperimentConfig) -> dict[str, str]:
    """Dotted key -> text of the value, e.g. `{"optim.lr": "0.0001", "data.patch_size": "[128, 128, 128]"}`.

    For MLflow params. Each text is what `--set key=text` would accept, so `unflatten` is exact.
    """
    out: dict[str, str] = {}

    def walk(value: Any, prefix: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = format_value(value)

    walk(to_dict(cfg), "")
    return out


def unflatten(flat: dict[str, str], source: str = "<flat params>") -> ExperimentConfig:
    """The inverse of `flatten` (e.g. a run's MLflow params back to its config)."""
    layer: dict = {}
    for key, text in flat.items():
        merge(layer, _LOADER.layer(key, text, f"{source} {key}"))
    return _LOADER.build([(source, layer)])


def config_hash(cfg: ExperimentConfig) -> str:
    """sha256 (hex) of the canonical JSON of the resolved config: independent of key order in
    the TOML files and of which layer set a value, stable across runs and machines."""
    text = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _parse_override(item: str) -> dict:
    """`--set key=value` -> the layer it sets (`dataclass_toml.Loader.layer`)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=3e-4")
    return _LOADER.layer(key.strip(), text.strip(), f"--set {item}")
