"""The import arrows the design promises (DESIGN.md, README "Layout of the code"), read from the
source with `ast`: every import, at module level or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "brats_lab"


def imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) of every import statement in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def test_data_imports_nothing_above_it():
    allowed = ("brats_lab.data", "brats_lab.config", "brats_lab.labels", "brats_lab.io")
    for path in sorted((PACKAGE / "data").glob("*.py")):
        for module, names in imports(path):
            if module == "brats_lab":
                assert set(names) <= {"DataError", "__version__"}, (path.name, names)
            elif module.startswith("brats_lab."):
                assert module.startswith(allowed), f"{path.name} imports {module}"


def test_the_trainer_imports_neither_pictures_nor_files():
    modules = {module for module, _ in imports(PACKAGE / "training" / "trainer.py")}
    assert not {"brats_lab.viz", "brats_lab.io"} & modules


def test_outside_training_the_trainer_is_imported_only_to_train():
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "training":
            continue
        for module, names in imports(path):
            if module == "brats_lab.training.trainer":
                assert names == ["train_fold"], f"{path.relative_to(PACKAGE)} imports {names} from the trainer"


def test_training_imports_nothing_from_inference():
    # inference/ reads training's checkpoint format; the arrow must not also run the other way.
    for path in sorted((PACKAGE / "training").glob("*.py")):
        for module, _ in imports(path):
            assert not module.startswith("brats_lab.inference"), f"training/{path.name} imports {module}"
