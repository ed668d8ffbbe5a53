"""One definition for each concept (issue 24, item 2; timm's one registry, not MONAI's several names):
the regions, the model names, which way a metric is better, the metrics that rank the data, the
precision rule and the user's error type are each defined in one module, read from the source with
`ast` over the package and the dashboard; everything else imports them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "brats_lab").rglob("*.py"), *(ROOT / "dashboard").rglob("*.py")])

# name -> the one module that defines it (None: no module may, it was a second name for a concept)
HOMES = {
    "REGIONS": "brats_lab/labels.py",
    "METRIC_REGIONS": "brats_lab/evaluation/metrics.py",
    "MODEL_NAMES": "brats_lab/config.py",
    "NETWORKS": "brats_lab/config.py",
    "MODELS": "brats_lab/models/__init__.py",
    "DIRECTIONS": "brats_lab/evaluation/metrics.py",
    "metric_direction": "brats_lab/evaluation/metrics.py",
    "lower_is_better": "brats_lab/evaluation/metrics.py",
    "ranking_metrics": "brats_lab/evaluation/metrics.py",
    "PRECISIONS": "brats_lab/precision.py",
    "autocast_dtype": "brats_lab/precision.py",
    "UserError": "brats_lab/__init__.py",
    "DataError": "brats_lab/__init__.py",
    "ConfigError": "brats_lab/config.py",
    "LOWER_IS_BETTER": None,
    "HIGHER_IS_BETTER": None,
    "_amp_dtype": None,
}


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _defined(tree: ast.Module) -> set[str]:
    """Every name a module binds by assignment, def or class, at any depth."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def _strings(node: ast.AST, keys: bool = False) -> list[str]:
    """The strings a tuple, list or set literal lists (with `keys`, a dict literal's keys too)."""
    elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else node.keys if keys and isinstance(node, ast.Dict) else []
    return [e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]


@pytest.mark.parametrize("name", sorted(HOMES))
def test_each_concept_is_defined_in_one_module(name):
    where = [str(p.relative_to(ROOT)) for p in SOURCES if name in _defined(_tree(p))]
    assert where == ([HOMES[name]] if HOMES[name] else []), f"{name} is defined in {where}; its one home is {HOMES[name]}"


def test_no_module_spells_the_regions_or_the_model_names_again():
    from brats_lab.config import MODEL_NAMES
    from brats_lab.labels import REGIONS

    for path in SOURCES:
        for node in ast.walk(_tree(path)):
            if path != ROOT / "brats_lab/labels.py":  # (a dict of each region's labels is a convention: data)
                assert _strings(node) != list(REGIONS), f"{path.relative_to(ROOT)} lists the regions: use brats_lab.labels.REGIONS"
            if path != ROOT / "brats_lab/config.py":
                assert len(set(_strings(node, keys=True)) & set(MODEL_NAMES)) < 2, (
                    f"{path.relative_to(ROOT)} lists model names: use brats_lab.config.MODEL_NAMES (the registry)")


def test_the_precision_rule_is_decided_in_precision_only():
    # "auto" means one thing: only brats_lab/precision.py compares a setting with it or asks the
    # device what it executes; train.amp's words are its words ("off" its alias of "fp32").
    import typing

    from brats_lab import precision
    from brats_lab.config import TrainConfig

    for path in SOURCES:
        if path == ROOT / "brats_lab/precision.py":
            continue
        for node in ast.walk(_tree(path)):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                assert not any(isinstance(o, ast.Constant) and o.value == "auto" for o in operands), (
                    f"{path.relative_to(ROOT)} decides what 'auto' means: use brats_lab.precision")
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("is_bf16_supported", "get_capabilities"), (
                    f"{path.relative_to(ROOT)} asks the device itself: use brats_lab.precision")
    amp = typing.get_args(typing.get_type_hints(TrainConfig)["amp"])
    assert {precision._ALIASES.get(a, a) for a in amp} <= set(precision.PRECISIONS)


def test_the_user_errors_are_one_type():
    from brats_lab import DataError, UserError
    from brats_lab.config import ConfigError
    from brats_lab.training.trainer import TrainingDiverged

    for error in (DataError, ConfigError, TrainingDiverged):
        assert issubclass(error, UserError)
    assert issubclass(ConfigError, ValueError)  # as it always was
    cli = _tree(ROOT / "brats_lab/cli.py")
    rewrapped = [n.lineno for n in ast.walk(cli) if isinstance(n, ast.ExceptHandler) and isinstance(n.type, ast.Name)
                 and n.type.id in ("ConfigError", "DataError", "TrainingDiverged")]
    assert rewrapped == [], f"cli.py catches a user error at lines {rewrapped}: main catches UserError once"
