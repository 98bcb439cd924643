"""FMCIB's own files: its run.py folder of split CSVs (written by extract, read by probe) and ``medfm.get_features``."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import medfm
from medfm.cli import main
from medfm.data.synthetic import make_demo_dataset
from medfm.errors import ManifestError
from medfm.evaluate.features import read_fmcib_layout, write_fmcib_layout
from medfm.evaluate.probe import run_probe

MODEL = "resnet10-3d"  # small, random init: the extraction tests' model
DIM = 512
PRED = [f"pred_{i}" for i in range(DIM)]
SPLITS = ["train", "train", "val", "test", "train", "Train ", "validation", "test"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The 8-row synthetic demo manifest with a split column, and its features from `medfm extract`."""
    folder = tmp_path_factory.mktemp("fmcib_files")
    path = make_demo_dataset(folder, n_patients=2)
    table = pd.read_csv(path)
    table["split"] = SPLITS
    table.to_csv(path, index=False)
    layout = folder / "layout"
    args = ["extract", str(path), "--model", MODEL, "--random-init", "--device", "cpu", "--quiet", "--workers", "0"]
    code = main([*args, "--column-prefix", "pred_", "--split-column", "split", "--fmcib-layout", str(layout)])
    assert code == 0
    return path, table, layout


def test_extract_writes_fmcib_layout(demo):
    path, table, layout = demo
    full = pd.read_parquet(layout / "features.parquet")  # the usual table and sidecar, beside the three files
    assert (layout / "features.json").is_file()
    assert list(full.columns) == list(table.columns) + PRED
    for split, rows in (("train", [0, 1, 4, 5]), ("val", [2, 6]), ("test", [3, 7])):
        part = pd.read_csv(layout / f"{split}_features.csv")
        assert list(part.columns) == list(full.columns)
        assert list(part["coordX"]) == pytest.approx(list(full["coordX"].iloc[rows]), abs=1e-9)
        np.testing.assert_allclose(part[PRED].to_numpy(), full[PRED].iloc[rows].to_numpy(), rtol=1e-6, atol=1e-7)
    # read back: the split is the file, rows in train, val, test order
    back = read_fmcib_layout(layout)
    assert list(back["split"]) == ["train"] * 4 + ["val"] * 2 + ["test"] * 2
    np.testing.assert_allclose(back[PRED].to_numpy(), full[PRED].iloc[[0, 1, 4, 5, 2, 6, 3, 7]].to_numpy(), rtol=1e-6)


def test_extract_layout_refuses_before_running(demo, tmp_path, capsys):
    path, table, _ = demo
    args = ["extract", str(path), "--model", MODEL, "--random-init", "--quiet", "--fmcib-layout", str(tmp_path / "L")]
    assert main(args) == 2  # default feat_ columns are not FMCIB's
    assert "--column-prefix pred_" in capsys.readouterr().err
    assert main([*args, "--column-prefix", "pred_", "--split-column", "fold"]) == 2
    assert "column 'fold' not found" in capsys.readouterr().err
    bad = table.assign(split=["train"] * 7 + ["holdout"])
    bad.to_csv(path.with_name("bad.csv"), index=False)
    argv = [*args[:1], str(path.with_name("bad.csv")), *args[2:], "--column-prefix", "pred_"]
    assert main(argv) == 2
    assert "row 7: column split has value 'holdout'" in capsys.readouterr().err
    assert not (tmp_path / "L").exists()


def _synthetic_layout(folder, prefix="pred_", n=(60, 20, 40), seed=0):
    rng = np.random.default_rng(seed)
    parts = {}
    for split, count in zip(("train", "val", "test"), n):
        y = rng.integers(0, 2, count)
        x = rng.normal(size=(count, 6)) + 1.2 * y[:, None]
        part = pd.DataFrame(x, columns=[f"{prefix}{i}" for i in range(6)])
        part.insert(0, "case", [f"{split}{i}" for i in range(count)])
        part["malignant"] = y
        parts[split] = part
    folder.mkdir()
    for split, part in parts.items():
        part.to_csv(folder / f"{split}_features.csv", index=False)
    return parts


@pytest.mark.parametrize("prefix", ["pred_", "feature_"])
def test_probe_reads_fmcib_layout(tmp_path, prefix):
    parts = _synthetic_layout(tmp_path / "L", prefix)
    fast = dict(trials=3, n_bootstrap=50, progress=False)
    result = run_probe(tmp_path / "L", "malignant", tmp_path / "out", **fast)
    summary = json.loads(result.results.read_text())
    for part, name in (("development", ("train", "val")), ("test", ("test",))):
        expected = pd.concat([parts[s] for s in name])["malignant"].value_counts()
        assert summary["class_balance"][part] == {str(k): int(v) for k, v in expected.items()}
    assert summary["n_features"] == 6 and summary["search"]["folds"] == 1  # train → val, as the files say
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(predictions["row"]) == list(range(80, 120))  # rows numbered train, val, test: the test file's rows
    # the same as probing one table whose split column says what the files said
    one = pd.concat([p.assign(split=s) for s, p in parts.items()], ignore_index=True)
    same = run_probe(one, "malignant", tmp_path / "out1", **fast)
    assert same.test_metric == result.test_metric and same.best_c == result.best_c
    assert result.test_metric.value > 0.8


def test_cli_probe_on_layout_and_a_disagreeing_split_column(tmp_path, capsys):
    parts = _synthetic_layout(tmp_path / "L")
    out = tmp_path / "out"
    argv = ["probe", str(tmp_path / "L"), "--label", "malignant", "--out", str(out), "--trials", "2", "--quiet"]
    assert main([*argv, "--bootstrap", "20"]) == 0
    assert capsys.readouterr().out.startswith("test roc_auc: ")
    parts["val"].assign(split="test").to_csv(tmp_path / "L" / "val_features.csv", index=False)
    assert main([*argv, "--bootstrap", "20"]) == 2
    assert "val_features.csv row 0: column split says 'test', the file says val" in capsys.readouterr().err
    (tmp_path / "L" / "test_features.csv").unlink()
    with pytest.raises(ManifestError, match="needs test_features.csv"):
        read_fmcib_layout(tmp_path / "L")


def test_write_layout_from_a_table(tmp_path):
    table = pd.DataFrame({"split": ["test", "train", "TRAIN"], "pred_0": [1.0, 2.0, 3.0], "pred_1": [4.0, 5.0, 6.0]})
    written = write_fmcib_layout(table, tmp_path / "L")
    assert [p.name for p in written] == ["train_features.csv", "val_features.csv", "test_features.csv"]
    assert list(pd.read_csv(written[0])["pred_0"]) == [2.0, 3.0]
    assert len(pd.read_csv(written[1])) == 0 and list(pd.read_csv(written[2])["pred_1"]) == [4.0]
    with pytest.raises(ManifestError, match="feature columns named pred_ or feature_"):
        write_fmcib_layout(table.rename(columns={"pred_0": "feat_0", "pred_1": "feat_1"}), tmp_path / "M")


# -- medfm.get_features ---------------------------------------------------------------------------------------------
def test_get_features_equals_extract(demo):
    path, table, layout = demo
    frame = medfm.get_features(str(path), MODEL, random_init=True, device="cpu", num_workers=0, progress=False)
    extracted = pd.read_parquet(layout / "features.parquet")
    assert list(frame.columns) == list(table.columns) + PRED
    pd.testing.assert_frame_equal(frame, extracted)
    assert frame.attrs["errors"] == {}
    assert np.abs(frame[PRED].to_numpy()).max() > 1e-3


def test_get_features_defaults_are_fmcibs():
    parameters = inspect.signature(medfm.get_features).parameters
    assert parameters["model"].default == "fmcib-resnet50"
    assert parameters["weights"].default == "published"
    assert parameters["column_prefix"].default == "pred_"


def test_import_medfm_does_not_import_torch():
    code = "import sys, medfm; assert 'torch' not in sys.modules; f = medfm.get_features; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
