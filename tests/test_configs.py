"""Every example config under configs/ parses through its command line and says what it means.

``medfm pretrain|finetune fit --config FILE --print_config`` resolves a config without building any data (the manifest
is a dummy path), so a typo in a key, a wrong type or a value the CLI would not accept fails here; the printed config
must carry the file's own values. Fine-tuning configs are checked further without data or weights: the model builds
(on the meta device, trunk randomly initialised) with a head that fits its task and trunk, the data module accepts
its arguments with the same task, and the views are valid augmentation specs for the profile's dimension.
"""

from __future__ import annotations

import json
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


# ------------------------------------------------------------------------------- FMCIB's comparison, runnable

COMPARISON = CONFIGS / "fmcib-comparison.yaml"


def comparison_commands(task: str, **values: object) -> dict[str, list[list[str]]]:
    """The arms of configs/fmcib-comparison.yaml for one task, filled in, as argument lists after ``medfm``."""
    import shlex

    spec = yaml.safe_load(COMPARISON.read_text())
    fill = {**spec["tasks"][task], **values}
    fill["config"] = str(CONFIGS.parent / fill["config"])
    commands = {}
    for arm, lines in spec["arms"].items():
        commands[arm] = []
        for line in lines:
            words = shlex.split(line.format(**fill))
            assert words[0] == "medfm"
            commands[arm].append(words[1:])
    return commands


def test_fmcib_comparison_covers_the_three_tasks_three_arms_and_four_fractions(need_shared):
    import pandas as pd

    spec = yaml.safe_load(COMPARISON.read_text())
    assert spec["fractions"] == [1.0, 0.5, 0.2, 0.1]
    assert set(spec["arms"]) == {"features", "fine-tuned", "supervised"}
    assert {p.name for p in (CONFIGS / "finetune").glob("*.yaml")} >= {
        Path(t["config"]).name for t in spec["tasks"].values()
    }
    folder = need_shared("fmcib_task_annotations")
    csvs = {
        "task1-lesion-type": "deeplesion_task1_train.csv",
        "task2-malignancy": "luna16_task2_train.csv",
        "task3-survival": "lung1_annotations.csv",
    }
    assert set(spec["tasks"]) == set(csvs)
    for task, csv in csvs.items():
        columns = set(pd.read_csv(folder / csv, nrows=5).columns)
        label = spec["tasks"][task]["probe"].split("--label ")[1].split()[0]
        assert label in columns, f"{task}: probe label {label!r} is not a column of {csv}"


@pytest.mark.parametrize("task", ["task1-lesion-type", "task3-survival"])
def test_fmcib_comparison_fine_tune_arms_resolve_for_another_trunk(task, capsys):
    # The fine-tune arms' overrides parse and fit a 512-d trunk (what `finetune sweep` passes on to `fit`).
    commands = comparison_commands(
        task, trunk="resnet10-3d", init="random", manifest=DUMMY_MANIFEST, out="cmp", fractions="1", repeats=1
    )
    sweep_args = commands["supervised"][0]
    overrides = sweep_args[sweep_args.index("--") + 1 :]
    config = sweep_args[sweep_args.index("--config") + 1]
    with pytest.raises(SystemExit) as exit_info:
        main(["finetune", "fit", "--config", config, *overrides, "--print_config"])
    out, err = capsys.readouterr()
    assert exit_info.value.code in (0, None), err[-2000:]
    printed = yaml.safe_load(out)
    assert printed["model"]["trunk"] == "resnet10-3d" and printed["model"]["init"] == "random"
    from medfm.finetune.module import FinetuneModule

    module = FinetuneModule(**{**printed["model"], "init": "random"})
    linears = [m for m in module.head if isinstance(m, torch.nn.Linear)]
    assert linears[0].in_features == 512 and linears[0].out_features == 2048
    if task == "task3-survival":  # FMCIB's 2-year survival, binary, on the `survival` column
        assert printed["model"]["task"] == printed["data"]["task"] == "binary"
        assert printed["data"]["label_column"] == "survival" and printed["data"]["time_column"] is None
        assert linears[-1].out_features == 1
    else:
        assert linears[-1].out_features == 8


def test_fmcib_comparison_runs_every_arm_on_synthetic_volumes(tmp_path, monkeypatch, capsys):
    """Task 2's three arms on phantoms with FMCIB's task-2 columns, a 512-d trunk, fractions 1 and 0.5."""
    import numpy as np
    import pandas as pd

    from medfm.data.synthetic import make_demo_dataset
    from medfm.models import load_model

    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "home"))
    demo = make_demo_dataset(tmp_path / "demo", n_patients=6)
    table = pd.read_csv(demo)
    task2 = pd.DataFrame(  # luna16_task2_*.csv: malignancy, coordX/Y/Z (LPS mm), image_path; plus a split
        {
            "malignancy": table["lesion_type"].isin(["solid", "part-solid"]).astype(int),
            "coordX": table["coordX"],
            "coordY": table["coordY"],
            "coordZ": table["coordZ"],
            "image_path": [str(demo.parent / p) for p in table["image_path"]],
            "split": table["patient_id"].map(
                {"P000": "train", "P001": "train", "P002": "train", "P003": "val", "P004": "test", "P005": "test"}
            ),
        }
    )
    manifest = tmp_path / "task2.csv"
    task2.to_csv(manifest, index=False)
    weights = tmp_path / "resnet10.pt"
    torch.save(load_model("resnet10-3d", None, seed=3).model.state_dict(), weights)
    out = tmp_path / "cmp"
    commands = comparison_commands(
        "task2-malignancy",
        trunk="resnet10-3d",
        init=str(weights),
        manifest=str(manifest),
        out=str(out),
        fractions="1 0.5",
        repeats=1,
    )
    small = ["--trainer.max_epochs=1", "--trainer.accelerator=cpu", "--trainer.devices=1", "--data.num_workers=0"]
    small += ["--data.batch_size=4", f"--data.cache_dir={tmp_path / 'stores'}", "--model.n_bootstrap=50"]
    small += ["--trainer.enable_progress_bar=false"]
    extract, probe = commands["features"]
    assert main([*extract, "--batch-size", "4", "--device", "cpu"]) in (0, None)
    assert main([*probe, "--trials", "3", "--bootstrap", "50", "--quiet"]) in (0, None)
    for arm in ("fine-tuned", "supervised"):
        assert main([*commands[arm][0], *small]) in (0, None)
    capsys.readouterr()

    features = pd.read_parquet(out / "features.parquet")
    assert len(features) == 24 and features.filter(like="feat_").shape[1] == 512
    fractions = pd.read_csv(out / "features" / "fractions.csv")
    assert sorted(fractions["fraction"].unique()) == [0.5, 1.0]
    for arm in ("fine-tuned", "supervised"):
        sweep = pd.read_csv(out / arm / "sweep.csv")
        auroc = sweep[sweep["metric"] == "auroc"]
        assert sorted(auroc["fraction"]) == [0.5, 1.0]
        assert np.all((auroc["value"] >= 0) & (auroc["value"] <= 1))
    # the two fine-tune arms differ only in the trunk's start: the fine-tuned one took the given weights
    results = [json.loads(p.read_text()) for p in sorted((out / "fine-tuned").rglob("results.json"))]
    scratch = [json.loads(p.read_text()) for p in sorted((out / "supervised").rglob("results.json"))]
    assert len(results) == len(scratch) == 2
    assert str(weights) in json.dumps(results[0]) and str(weights) not in json.dumps(scratch[0])
