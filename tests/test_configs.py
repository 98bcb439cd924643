"""Every example config under configs/ parses through its command line and says what it means.

``medfm pretrain|finetune fit --config FILE --print_config`` resolves a config without building any data (the manifest
is a dummy path), so a typo in a key, a wrong type or a value the CLI would not accept fails here; the printed config
must carry the file's own values. Fine-tuning configs are checked further without data or weights: the model builds
(on the meta device, trunk randomly initialised) with a head that fits its task and trunk, the data module accepts
its arguments with the same task, and the views are valid augmentation specs for the profile's dimension.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from medfm.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRETRAIN = sorted((CONFIGS / "pretrain").glob("*.yaml"))
FINETUNE = sorted((CONFIGS / "finetune").glob("*.yaml"))
DUMMY_MANIFEST = "dummy-manifest.csv"  # never read: --print_config builds no data


def test_the_example_configs_are_there():
    assert len(PRETRAIN) >= 7
    names = {p.stem for p in FINETUNE}
    assert {
        "fmcib-task1-lesion-type",
        "fmcib-task2-malignancy",
        "fmcib-task3-survival",
        "random-init-3d",
        "pneumonia-2d",
    } <= names


def printed_config(command: str, path: Path, capsys) -> dict:
    """The config ``medfm COMMAND fit --config PATH --print_config`` prints (it exits 0 after printing)."""
    with pytest.raises(SystemExit) as exit_info:
        main([command, "fit", "--config", str(path), "--data.manifest", DUMMY_MANIFEST, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), f"{path.name}: exit {exit_info.value.code}\n{err[-2000:]}"
    return yaml.safe_load(out)


def assert_contains(printed: object, chosen: object, where: str) -> None:
    """Every value the file sets is in the printed config (the CLI adds its defaults around them)."""
    if isinstance(chosen, dict):
        assert isinstance(printed, dict), where
        for key, value in chosen.items():
            assert key in printed, f"{where}.{key} is missing from the printed config"
            assert_contains(printed[key], value, f"{where}.{key}")
    else:
        assert printed == chosen, f"{where}: printed {printed!r}, the file says {chosen!r}"


@pytest.mark.parametrize(
    ("command", "path"),
    [("pretrain", p) for p in PRETRAIN] + [("finetune", p) for p in FINETUNE],
    ids=lambda v: v.name if isinstance(v, Path) else v,
)
def test_config_parses_with_print_config(command, path, capsys):
    chosen = yaml.safe_load(path.read_text())
    printed = printed_config(command, path, capsys)
    assert printed["data"]["manifest"] == DUMMY_MANIFEST
    chosen["data"].pop("manifest", None)
    for section in ("seed_everything", "trainer", "model", "data"):
        if section in chosen:
            assert_contains(printed[section], chosen[section], section)
    assert printed["trainer"]["default_root_dir"] == f"outputs/{command}/{path.stem}"  # each run its own folder
    if command == "finetune":
        assert printed["model"]["task"] == printed["data"]["task"]
        assert printed["model"]["lr_trunk"] > 0 and printed["model"]["lr_head"] > 0


def _finetune_case(path: Path) -> tuple[dict, dict]:
    config = yaml.safe_load(path.read_text())
    return config["model"], config["data"]


@pytest.mark.parametrize("path", FINETUNE, ids=lambda p: p.name)
def test_finetune_config_builds_its_model_data_module_and_views(path):
    from medfm.data.augment import build_view
    from medfm.data.profiles import Profile2D, get_profile
    from medfm.finetune.data import FinetuneData
    from medfm.finetune.module import FinetuneModule

    model, data = _finetune_case(path)
    with torch.device("meta"):  # the architecture only: no weights to download, no memory for 200M parameters
        module = FinetuneModule(**{**model, "init": "random"})
    linears = [m for m in module.head if isinstance(m, torch.nn.Linear)]
    assert linears[0].in_features == module.feature_dim
    assert linears[-1].out_features == (model.get("num_classes", 2) if model["task"] == "multiclass" else 1)
    if model.get("head"):
        widths = [module.feature_dim] + [m.out_features for m in linears]
        assert widths[-len(model["head"]) :] == model["head"]
    FinetuneData(**{**data, "manifest": DUMMY_MANIFEST})  # checks the task and its columns; builds nothing yet
    assert data["task"] == model["task"]
    if model["task"] == "survival":
        assert data["time_column"] and data["event_column"]
    else:
        assert data["label_column"]
    dims = 2 if isinstance(get_profile(data["profile"]), Profile2D) else 3
    for key in ("view", "eval_view"):
        if data.get(key):
            build_view(data[key], dims)


def test_fmcib_task_configs_name_real_annotation_columns(need_shared):
    """The label, time, event and group columns are those of FMCIB's published task CSVs."""
    import pandas as pd

    folder = need_shared("fmcib_task_annotations")
    cases = {
        "fmcib-task1-lesion-type": "deeplesion_task1_train.csv",
        "fmcib-task2-malignancy": "luna16_task2_train.csv",
        "random-init-3d": "luna16_task2_train.csv",
        "fmcib-task3-survival": "lung1_annotations.csv",
    }
    for name, csv in cases.items():
        _, data = _finetune_case(CONFIGS / "finetune" / f"{name}.yaml")
        columns = set(pd.read_csv(folder / csv, nrows=5).columns)
        for key in ("label_column", "time_column", "event_column", "group_column"):
            if data.get(key):
                assert data[key] in columns, f"{name}: {key} {data[key]!r} is not a column of {csv}"
        assert {"image_path", "coordX", "coordY", "coordZ"} <= columns
    task1 = pd.read_csv(folder / "deeplesion_task1_train.csv")
    assert task1["Coarse_lesion_type"].nunique() == 8  # num_classes 8
