"""The ``medfm`` command line: exit codes, one-line errors, outputs of extract, models and demo."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from medfm.cli import main
from medfm.data.synthetic import make_demo_dataset

FEATS = [f"feat_{i}" for i in range(512)]


@pytest.fixture(scope="module")
def one_patient(tmp_path_factory) -> Path:
    """A one-phantom demo set (4 rows); returns its manifest path."""
    return make_demo_dataset(tmp_path_factory.mktemp("cli_demo"), n_patients=1)


@pytest.fixture(scope="module")
def missing_file_manifest(one_patient) -> Path:
    """The one-patient manifest with row 2 pointing at an image that does not exist."""
    table = pd.read_csv(one_patient)
    table.loc[2, "image_path"] = "images/not_there.nii.gz"
    path = one_patient.with_name("missing.csv")
    table.to_csv(path, index=False)
    return path


def extract_args(manifest: Path, out: Path, *extra: str) -> list[str]:
    base = ["extract", str(manifest), "--model", "resnet10-3d", "--random-init", "--out", str(out)]
    return [*base, "--workers", "0", "--quiet", *extra]


def test_extract(one_patient, tmp_path, capsys):
    out = tmp_path / "features.parquet"
    assert main(extract_args(one_patient, out)) == 0
    table = pd.read_parquet(out)
    assert len(table) == 4
    assert list(table.columns) == [*pd.read_csv(one_patient).columns, *FEATS]
    assert set(table.columns) >= {"image_path", "coordX", "coordY", "coordZ", "lesion_type", "patient_id"}
    assert table["lesion_type"].tolist() == ["solid", "part-solid", "cystic", "calcified"]
    side = json.loads((tmp_path / "features.json").read_text())
    assert side["model"] == "resnet10-3d" and side["random_init"] is True and side["n_rows"] == 4
    captured = capsys.readouterr()
    assert f"wrote features of 4 rows to {out}" in captured.out
    assert captured.err == ""


def test_extract_bad_row_is_one_line_error(missing_file_manifest, tmp_path, capsys):
    out = tmp_path / "features.parquet"
    assert main(extract_args(missing_file_manifest, out)) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert line.startswith("medfm: error: row 2 ")
    assert str(missing_file_manifest.parent / "images" / "not_there.nii.gz") in line
    assert line.endswith("file not found")
    assert "Traceback" not in err
    assert not out.exists()


def test_extract_skip_writes_errors_csv(missing_file_manifest, tmp_path, capsys):
    out = tmp_path / "features.parquet"
    assert main(extract_args(missing_file_manifest, out, "--on-error", "skip")) == 0
    table = pd.read_parquet(out)
    assert table["lesion_type"].tolist() == ["solid", "part-solid", "calcified"]
    errors = pd.read_csv(tmp_path / "features.errors.csv")
    assert errors["row"].tolist() == [2]
    assert errors["image_path"].tolist() == ["images/not_there.nii.gz"]
    assert errors["reason"].tolist() == ["file not found"]
    out_text = capsys.readouterr().out
    assert "wrote features of 3 rows" in out_text
    assert f"1 bad rows in {tmp_path / 'features.errors.csv'}" in out_text


def test_extract_weights_and_random_init_conflict(one_patient, tmp_path, capsys):
    args = extract_args(one_patient, tmp_path / "f.parquet", "--weights", str(tmp_path / "w.pt"))
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "medfm: error: give either --weights or --random-init, not both"


def test_extract_unknown_model(one_patient, tmp_path, capsys):
    args = ["extract", str(one_patient), "--model", "nope", "--out", str(tmp_path / "f.parquet"), "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("medfm: error: unknown model 'nope'") and "resnet10-3d" in err


def test_models(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "fmcib-resnet50: 4096-d, profile fmcib" in out
    assert "resnet10-3d: 512-d, profile fmcib" in out
    assert "profile fmcib v1:" in out


def test_demo_without_published_weights(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path / "empty_home"))
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--model", "resnet10-3d", "--patients", "1", "--workers", "0", "--quiet"]
    assert main(args) == 0
    table = pd.read_parquet(out / "features.parquet")
    assert len(table) == 4
    assert table["lesion_type"].tolist() == ["solid", "part-solid", "cystic", "calcified"]
    assert table[FEATS].notna().all().all()
    side = json.loads((out / "features.json").read_text())
    assert side["random_init"] is True and side["weights"] is None
    stdout = capsys.readouterr().out
    assert "published weights for resnet10-3d are not in the cache" in stdout
    assert "random-initialised trunk" in stdout
    assert (out / "patches" / "patches.npy").is_file()


def test_extract_grey_images_with_a_one_channel_variant(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray((rng.random((40, 48)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    pd.DataFrame({"image_path": ["0.png", "1.png"]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "f.parquet"
    args = ["extract", str(tmp_path / "m.csv"), "--model", "resnet18", "--random-init", "--out", str(out), "--quiet"]
    assert main([*args, "--profile", "gray-224", "--in-channels", "1"]) == 0
    table = pd.read_parquet(out)
    assert sum(c.startswith("feat_") for c in table.columns) == 512 and len(table) == 2
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["profile"]["name"] == "gray-224" and sidecar["profile"]["channels"] == 1
    assert main([*args, "--profile", "fmcib"]) == 2  # a 3D profile for a 2D model
    assert "does not fit the 2D model resnet18" in capsys.readouterr().err


def test_png_manifest_without_model_says_the_default_is_3d_and_how_to_choose_2d(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "a.png")
    pd.DataFrame({"image_path": ["a.png"], "label": [1]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "f.parquet"
    assert main(["extract", str(tmp_path / "m.csv"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing column(s) ['coordX', 'coordY', 'coordZ']" in err
    assert "the default model, fmcib-resnet50 is a 3D CT model" in err
    assert "For 2D images (PNG, JPEG, 2D DICOM) choose a 2D model, e.g. --model resnet50" in err
    assert main(["extract", str(tmp_path / "m.csv"), "--model", "resnet10-3d", "--out", str(out)]) == 2
    assert "--model resnet10-3d is a 3D CT model" in capsys.readouterr().err
    assert not out.exists()


def _options_without_help(parser, path):  # noqa: ANN001, ANN202
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options_without_help(sub, [*path, name])
        elif not isinstance(action, argparse._HelpAction) and not action.help:
            yield " ".join(path), action.option_strings or [action.dest]


def test_every_cli_option_has_help():
    from medfm.analyze.cli import build_parser as analyze_parser
    from medfm.cli import _pretrain_export_parser, _probe_import_parser, build_parser
    from medfm.detect.launch import predict_parser as detect_predict_parser
    from medfm.segment.launch import _predict_parser as segment_predict_parser
    from medfm.train.sweep import sweep_parser

    parsers = {
        "medfm": build_parser(),
        "medfm analyze": analyze_parser(),
        "medfm detect predict": detect_predict_parser(),
        "medfm segment predict": segment_predict_parser(),
        "medfm pretrain export": _pretrain_export_parser(),
        "medfm probe import": _probe_import_parser(),
        "medfm finetune sweep": sweep_parser("finetune"),
    }
    counted = 0
    for name, parser in parsers.items():
        counted += sum(1 for a in parser._actions if a.option_strings)
        assert list(_options_without_help(parser, [name])) == []
    assert counted > 20  # the walk saw the parsers' options
