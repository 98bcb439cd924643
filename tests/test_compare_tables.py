"""Comparing two feature tables of the same rows: the same probe on each, then a paired comparison."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from medfm.cli import main


def _tables(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 240)
    good = rng.normal(size=(240, 8)) + 1.5 * y[:, None]
    weak = rng.normal(size=(240, 8)) + 0.2 * y[:, None]
    paths = []
    for name, x in (("good", good), ("weak", weak)):
        table = pd.DataFrame(x, columns=[f"feat_{i}" for i in range(8)])
        table["y"] = y
        table["patient"] = [f"p{i // 3}" for i in range(240)]
        paths.append(tmp_path / f"{name}.parquet")
        table.to_parquet(paths[-1])
    return paths


def test_compare_two_feature_tables(tmp_path, capsys):
    a, b = _tables(tmp_path)
    out = tmp_path / "cmp.json"
    code = main(
        [
            "compare",
            str(a),
            str(b),
            "--label",
            "y",
            "--group",
            "patient",
            "--trials",
            "3",
            "--bootstrap",
            "200",
            "--probe-out",
            str(tmp_path / "probes"),
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "roc_auc A − B = +" in printed and "DeLong (assumes independent rows)" in printed
    assert "use the grouped bootstrap" in printed
    report = json.loads(out.read_text())
    # no resample falls on the other side here: the p-value is a bound, printed as one, never as 0
    assert report["bootstrap_p_below"] is True and report["bootstrap_p"] == 2 / report["difference"]["n_resamples"]
    assert f"bootstrap {report['bootstrap_p_text']} (paired, resampling whole patient groups)" in printed
    assert "p = 0," not in printed and report["bootstrap_p_text"].startswith("p < ")
    assert report["difference"]["low"] > 0  # the informative features win, and the CI says so
    assert report["delong"]["p_value"] < 0.01
    assert (tmp_path / "probes" / "a" / "results.json").exists()
    for kind in ("roc", "pr"):  # both models' curves on one figure beside the two probes' folders
        assert (tmp_path / "probes" / f"{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_tables_needs_a_label(tmp_path, capsys):
    a, b = _tables(tmp_path)
    assert main(["compare", str(a), str(b)]) == 2
    assert "needs --label" in capsys.readouterr().err


def _results(folder, y, p):
    folder.mkdir()
    pd.DataFrame({"row": range(len(y)), "y": y, "proba_0": 1 - p, "proba_1": p}).to_csv(
        folder / "predictions.csv", index=False
    )
    summary = {"label": "y", "scoring": "roc_auc", "predictions": "predictions.csv", "grouped_by": None}
    (folder / "results.json").write_text(json.dumps(summary))
    return str(folder / "results.json")


def test_compare_says_when_resamples_are_dropped(tmp_path, capsys):
    # one positive among 12 test rows: about a third of the resamples lack it and have no AUC
    y = np.zeros(12, dtype=int)
    y[4] = 1
    a = _results(tmp_path / "a", y, np.linspace(0.1, 0.9, 12))
    b = _results(tmp_path / "b", y, np.linspace(0.9, 0.1, 12))
    assert main(["compare", a, b, "--bootstrap", "300", "--out", str(tmp_path / "cmp.json")]) == 0
    printed = capsys.readouterr().out
    d = json.loads((tmp_path / "cmp.json").read_text())["difference"]
    assert d["n_dropped"] + d["n_resamples"] == 300 and d["n_dropped"] > 0.05 * 300
    note = f"{d['n_dropped']} of 300 resamples ({d['n_dropped'] / 300:.0%}) dropped"
    assert note in d["dropped_note"] and f"[{d['dropped_note']}]" in printed.splitlines()[0]
    assert printed.splitlines()[1].startswith("DeLong: ")  # rows not grouped: plain DeLong
