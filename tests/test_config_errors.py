"""Config and checkpoint errors of the training commands (`fit --config`, `--ckpt_path`, `detect predict`): one line,
status 2, no usage and no traceback; a mistyped key is answered with the closest valid one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

from medfm.cli import main
from medfm.train.cli import closest_key, config_error_line

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FINETUNE = CONFIGS / "finetune" / "fmcib-task1-lesion-type.yaml"
PRETRAIN = CONFIGS / "pretrain" / "simclr-3d.yaml"


def edited(tmp_path: Path, source: Path, edit) -> Path:
    """A copy of a shipped config with ``edit`` applied to its parsed YAML."""
    config = yaml.safe_load(source.read_text())
    edit(config)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "usage:" not in err and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def rename(section: str, old: str, new: str):
    def edit(config: dict) -> None:
        config[section][new] = config[section].pop(old)

    return edit


HELP = " (all options: `medfm finetune fit --help`)"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (rename("model", "lr_trunk", "lr_trunc"), "`model.lr_trunc` is not an option; did you mean `model.lr_trunk`?"),
        (
            rename("model", "class_weights", "class_weight"),
            "`model.class_weight` is not an option; did you mean `model.class_weights`?",
        ),
        (
            lambda c: c.update(trainr=c.pop("trainer")),
            "`trainr.default_root_dir` is not an option; did you mean `trainer.default_root_dir`?",
        ),
        (lambda c: c["model"].update(colour="red"), "`model.colour` is not an option"),
        (lambda c: c["model"].update(num_classes="eight"), "`model.num_classes`: expected int, got 'eight'"),
        (
            lambda c: c["trainer"].update(max_epochs="many"),
            "`trainer.max_epochs`: expected one of int, None, got 'many'",
        ),
    ],
    ids=["typo", "typo-plural", "section-typo", "unknown", "wrong-type", "wrong-type-optional"],
)
def test_a_config_mistake_is_one_line_naming_the_key(tmp_path, capsys, edit, expected):
    config = edited(tmp_path, FINETUNE, edit)
    assert main(["finetune", "fit", "--config", str(config), "--data.manifest", "x.csv"]) == 2
    assert one_error_line(capsys) == f"medfm: error: {expected}{HELP}"
    assert not (tmp_path / "outputs").exists()


def test_a_mistyped_option_on_the_command_line(capsys):
    assert main(["pretrain", "fit", "--config", str(PRETRAIN), "--modl.lr", "0.1"]) == 2
    assert one_error_line(capsys) == (
        "medfm: error: `modl.lr` is not an option; did you mean `model.lr`? (all options: `medfm pretrain fit --help`)"
    )


def test_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    config = tmp_path / "broken.yaml"
    config.write_text(FINETUNE.read_text().replace("  max_epochs: 100", "  max_epochs: [100", 1))
    line = next(i for i, t in enumerate(config.read_text().splitlines(), 1) if "max_epochs: [100" in t)
    assert main(["finetune", "fit", "--config", str(config)]) == 2
    assert one_error_line(capsys) == (
        f"medfm: error: --config {config}: not valid YAML at line {line + 1}, column 14: expected ',' or ']', but got ':'"
    )


def test_missing_config_file(tmp_path, capsys):
    assert main(["finetune", "fit", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert one_error_line(capsys) == f"medfm: error: --config {tmp_path / 'nope.yaml'}: file not found"


@pytest.mark.parametrize(
    ("command", "source", "key"),
    [("finetune", FINETUNE, "lr_trunk"), ("finetune", FINETUNE, "weight_decay"), ("pretrain", PRETRAIN, "lr")],
)
def test_a_negative_rate_names_its_key(tmp_path, capsys, command, source, key):
    config = edited(tmp_path, source, lambda c: c["model"].update({key: -0.1}))
    assert main([command, "fit", "--config", str(config), "--data.manifest", "x.csv"]) == 2
    what = "a learning rate" if key.startswith("lr") else "weight decay"
    assert one_error_line(capsys) == f"medfm: error: `model.{key}` is -0.1: {what} cannot be negative"


def test_help_still_shows_the_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["finetune", "fit", "--help"])
    assert stop.value.code == 0
    assert "--model.lr_trunk" in capsys.readouterr().out


def test_closest_key_prefers_the_section_then_the_name():
    keys = ["model.lr_trunk", "model.lr_head", "model.trunk", "trainer.max_epochs", "seed_everything"]
    assert closest_key("model.lr_trunc", keys) == "model.lr_trunk"
    assert closest_key("trainr.max_epoch", keys) == "trainer.max_epochs"
    assert closest_key("model.foo", keys) is None  # sharing `model.` is not a match
    assert closest_key("seed_everythin", keys) == "seed_everything"
    message = "Subcommand 'fit' does not accept option 'model.lr_trunc'"
    assert config_error_line(message, keys) == "`model.lr_trunc` is not an option; did you mean `model.lr_trunk`?"


class Payload:
    """Unpickling this would create ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@pytest.fixture
def hostile_ckpt(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "ran.txt"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": Payload(marker)}, path)
    return path, marker


def test_hostile_ckpt_path_is_one_line(tmp_path, capsys, hostile_ckpt):
    path, marker = hostile_ckpt
    args = ["finetune", "fit", "--config", str(FINETUNE), "--data.manifest", "x.csv", "--ckpt_path", str(path)]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"medfm: error: --ckpt_path {path}: refused — the file holds Python objects")
    assert not marker.exists()


def test_nan_ckpt_path_names_the_tensor(tmp_path, capsys):
    path = tmp_path / "nan.ckpt"
    torch.save({"state_dict": {"model.trunk.conv1.weight": torch.tensor([1.0, float("nan")])}}, path)
    args = ["pretrain", "fit", "--config", str(PRETRAIN), "--ckpt_path", str(path)]
    assert main(args) == 2
    assert one_error_line(capsys) == (
        f"medfm: error: --ckpt_path {path}: tensor 'state_dict.model.trunk.conv1.weight' holds 1 of 2 values that are "
        "not finite (NaN); the weights are damaged and are refused"
    )


def test_missing_ckpt_path(tmp_path, capsys):
    args = ["pretrain", "fit", "--config", str(PRETRAIN), "--ckpt_path", str(tmp_path / "gone.ckpt")]
    assert main(args) == 2
    assert one_error_line(capsys) == f"medfm: error: --ckpt_path {tmp_path / 'gone.ckpt'}: file not found"


def test_hostile_checkpoint_to_detect_predict_is_one_line(tmp_path, capsys, hostile_ckpt):
    path, marker = hostile_ckpt
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_path\nx.png\n")
    assert main(["detect", "predict", str(path), str(manifest), "--out", str(tmp_path / "boxes.csv")]) == 2
    assert one_error_line(capsys).startswith(f"medfm: error: {path}: refused — the file holds Python objects")
    assert not marker.exists() and not (tmp_path / "boxes.csv").exists()
