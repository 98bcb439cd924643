"""The package layout: the training rooms (pretrain, finetune, detect, segment) never import each other, and moved
names keep working for one release with a deprecation warning."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import medfm

ROOMS = ("pretrain", "finetune", "detect", "segment")
SOURCE = Path(medfm.__file__).parent


def imported_modules(path: Path, root: Path) -> list[str]:
    """Every module a file under ``root`` (medfm's folder) imports, top level or inside functions; relative
    imports made absolute."""
    package = ".".join(("medfm", *path.relative_to(root).parts[:-1]))
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names)
    return names


def sideways_imports(root: Path) -> list[str]:
    """``file: module`` for each import from one training room into another under ``root``."""
    found = []
    for room in ROOMS:
        for path in sorted((root / room).rglob("*.py")):
            for name in imported_modules(path, root):
                parts = name.split(".")
                if len(parts) > 1 and parts[0] == "medfm" and parts[1] in ROOMS and parts[1] != room:
                    found.append(f"{path.relative_to(root)}: {name}")
    return found


def test_training_rooms_do_not_import_each_other() -> None:
    """Shared training pieces live in train/ (or data/): no room reaches into another."""
    assert sideways_imports(SOURCE) == []


def test_sideways_import_is_found(tmp_path: Path) -> None:
    """The check sees a sideways import, absolute or relative, top level or inside a function."""
    for room in ROOMS:
        (tmp_path / room).mkdir()
    (tmp_path / "detect" / "a.py").write_text("from medfm.finetune.module import mlp_head\n")
    (tmp_path / "segment" / "b.py").write_text(
        "def f():\n    import medfm.detect.boxes\n    from ..pretrain import losses\n"
    )
    (tmp_path / "finetune" / "c.py").write_text(
        "from medfm.train.sweep import sweep\nfrom medfm.finetune import data\n"
    )
    found = sideways_imports(tmp_path)
    assert found == [
        "detect/a.py: medfm.finetune.module",
        "detect/a.py: medfm.finetune.module.mlp_head",
        "segment/b.py: medfm.detect.boxes",
        "segment/b.py: medfm.pretrain",
        "segment/b.py: medfm.pretrain.losses",
    ]


def test_evaluate_extract_is_a_deprecated_alias_of_features_extract():
    import medfm.features.extract as moved

    sys.modules.pop("medfm.evaluate.extract", None)
    with pytest.warns(DeprecationWarning, match="medfm.features.extract"):
        alias = importlib.import_module("medfm.evaluate.extract")
    assert alias.extract_features is moved.extract_features
    assert alias.FeatureRunner is moved.FeatureRunner


@pytest.mark.parametrize("name", ["world", "EpochSampler"])
def test_data_training_names_moved_to_train_sampler_warn(name):
    import medfm.data.training as training
    import medfm.train.sampler as sampler

    with pytest.warns(DeprecationWarning, match=f"medfm.train.sampler.{name}"):
        assert getattr(training, name) is getattr(sampler, name)
    with pytest.raises(AttributeError):
        training.no_such_name  # noqa: B018 - an unknown name is still an AttributeError
