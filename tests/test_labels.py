"""Labels that mean "missing" are left out and counted (probe, knn, fewshot); implausible class columns refused."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from threadpoolctl import threadpool_limits

from medfm.cli import main
from medfm.data.labels import missing_labels
from medfm.errors import ConfigError
from medfm.evaluate.features import read_labelled
from medfm.evaluate.fewshot import run_fewshot
from medfm.evaluate.knn import run_knn
from medfm.evaluate.probe import run_probe

MARKED = ["NA", "unknown", "", "nan", "N/A", "none", "?", "-", " na "]


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    with threadpool_limits(limits=1):
        yield


def _csv(tmp_path, labels: list[str], n_features: int = 4, seed: int = 0):
    """A feature CSV whose label column is written as given (so 'NA' is text, as a spreadsheet writes it)."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    x = rng.normal(size=(n, n_features))
    signs = np.array([1.0 if v == "1" else -1.0 for v in labels])
    x[:, 0] += 4 * signs
    table = pd.DataFrame(x, columns=[f"feat_{i}" for i in range(n_features)])
    table.insert(0, "y", labels)
    table.insert(1, "split", np.array(["train", "val", "train", "test"])[np.arange(n) % 4])
    path = tmp_path / "f.csv"
    table.to_csv(path, index=False)
    return path


def _labels() -> list[str]:
    good = ["0", "1"] * 20
    return good[:10] + MARKED + good[10:]


def test_missing_markers():
    values = pd.Series(["NA", "na", "Unknown", "", None, np.nan, "N/A", "none", "?", "-", "0", "1", 1.0, "NULL"])
    assert missing_labels(values).tolist() == [True] * 10 + [False, False, False, True]
    assert missing_labels(pd.Series([-1.0, -1, "-1", 0]), markers=["-1"]).tolist() == [True, True, True, False]
    assert missing_labels(pd.Series(["NA", ""]), markers=[]).tolist() == [False, False]


def test_read_labelled_leaves_missing_rows_out_and_counts_them(tmp_path):
    path = _csv(tmp_path, _labels())
    data = read_labelled(path, "y")
    assert data.n_missing == len(MARKED)
    assert data.y.dtype == np.int64 and sorted(set(data.y.tolist())) == [0, 1]
    assert data.rows.tolist() == list(range(10)) + list(range(10 + len(MARKED), 40 + len(MARKED)))
    kept_as_text = read_labelled(path, "y", missing=["NA"])  # the markers replaced: 'unknown' is a class then
    assert kept_as_text.n_missing == 3  # 'NA', '' (read as empty) and ' na '
    assert "unknown" in set(kept_as_text.y.tolist())


def test_probe_knn_fewshot_count_the_left_out_rows(tmp_path):
    path = _csv(tmp_path, _labels())
    result = run_probe(path, "y", tmp_path / "probe", trials=3, n_bootstrap=50, progress=False)
    summary = json.loads(result.results.read_text())
    assert summary["n_missing_labels"] == len(MARKED)
    assert set(summary["class_balance"]["test"]) == {"0", "1"}
    report = run_knn(path, "y", k=3, n_bootstrap=50)
    assert report["n_missing_labels"] == len(MARKED)
    assert report["n_train"] + report["n_test"] == 40
    shots = run_fewshot(path, "y", ways=2, shots=2, episodes=5, heads=("prototype",))
    assert shots[0].n_missing_labels == len(MARKED)


def test_a_continuous_label_is_refused_showing_the_classes(tmp_path):
    values = [f"{v:.3f}" for v in np.linspace(0.1, 0.9, 30)]
    path = _csv(tmp_path, values)
    with pytest.raises(ConfigError) as info:
        read_labelled(path, "y")
    assert str(info.value).startswith("label column 'y' has 30 classes in 30 rows (non-integer numbers), e.g. 0.1 (1)")
    many = _csv(tmp_path, [str(i) for i in range(60)])
    with pytest.raises(ConfigError, match=r"has 60 classes in 60 rows \(fewer than 5 rows per class on average\)"):
        read_labelled(many, "y")


def test_cli_label_missing(tmp_path, capsys):
    path = _csv(tmp_path, _labels())
    assert main(["knn", str(path), "--label", "y", "--k", "3", "--bootstrap", "20"]) == 0
    assert f"{len(MARKED)} rows left out: their y is missing (see --label-missing)" in capsys.readouterr().out
    code = main(["knn", str(path), "--label", "y", "--k", "3", "--bootstrap", "20", "--label-missing", "NA", "?"])
    assert code == 0
    assert "4 rows left out" in capsys.readouterr().out  # 'NA', ' na ', '?' and the empty cell
