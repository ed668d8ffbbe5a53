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


def test_the_generic_modules_import_nothing_of_the_package():
    # The TOML loader knows no schema (config gives it its dataclasses), and the file helpers no
    # image library: both sit under everything else.
    for name in ("dataclass_toml.py", "files.py"):
        for module, _ in imports(PACKAGE / name):
            assert not module.startswith("brats_lab"), f"{name} imports {module}"


def test_data_imports_nothing_above_it():
    allowed = ("brats_lab.data", "brats_lab.config", "brats_lab.dataclass_toml", "brats_lab.labels", "brats_lab.io", "brats_lab.files")
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


def test_every_file_a_run_keeps_is_named_in_run_files_only():
    # Changing what a fold or study run writes touches one module (issue 24): no other module of
    # the package or the dashboard spells one of its names, or a folder of them with a file in it.
    from brats_lab import run_files

    names = {value for key, value in vars(run_files).items() if key.isupper() and isinstance(value, str)}
    folders = {name.split("/")[0] + "/" for name in names if "/" in name} | {f"{run_files.PREDICTIONS}/", f"{run_files.OVERLAYS}/"}
    for path in sorted([*PACKAGE.rglob("*.py"), *(PACKAGE.parent / "dashboard").rglob("*.py")]):
        if path.name == "run_files.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and not isinstance(node.value, bytes):
                text = node.value
                assert text not in names, f"{path.relative_to(PACKAGE.parent)} spells {text!r}: use brats_lab.run_files"
                assert not any(text.startswith(folder) for folder in folders), (
                    f"{path.relative_to(PACKAGE.parent)} spells {text!r}: use brats_lab.run_files")
