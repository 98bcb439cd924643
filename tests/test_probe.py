"""``run_probe`` / ``predict`` / ``compare`` and their CLI, on synthetic feature tables and on BreastMNIST."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from medfm.cli import main
from medfm.data.outputs import write_feature_table
from medfm.errors import ManifestError, MedfmError
from medfm.evaluate.features import feature_columns, read_labelled
from medfm.evaluate.fewshot import run_fewshot
from medfm.evaluate.probe import compare, predict, run_fractions, run_probe

N_FEATURES = 12
FAST = {"trials": 5, "n_bootstrap": 200, "progress": False}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small matrices: one BLAS thread is faster, and far faster when the CPUs are shared with other work."""
    with threadpool_limits(limits=1):
        yield


def make_table(
    n_patients: int = 40,
    rows_per_patient: int = 3,
    signal: float = 6.0,
    seed: int = 0,
    split: bool = True,
    prefix: str = "feat_",
) -> pd.DataFrame:
    """Patients with several rows, one label each; ``signal`` moves feat_0 by ±signal (0: features are noise).

    With ``split`` every patient's rows share one split: patients 0, 5, 10, … test, 1, 6, … val, others train.
    """
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(n_patients), rows_per_patient)
    label = np.repeat(np.arange(n_patients) % 2, rows_per_patient)
    x = rng.normal(size=(len(patient), N_FEATURES))
    x[:, 0] += np.where(label == 1, signal, -signal)
    table = pd.DataFrame(x, columns=[f"{prefix}{i}" for i in range(N_FEATURES)])
    table.insert(0, "patient", [f"P{p:03d}" for p in patient])
    table.insert(1, "y", label)
    if split:
        table.insert(2, "split", np.array(["test", "val", "train", "train", "train"])[patient % 5])
    return table


def _write(table: pd.DataFrame, path: Path) -> Path:
    table.to_parquet(path, index=False)
    return path


@pytest.fixture(scope="module")
def separable_run(tmp_path_factory):
    """One probe on a separable, split-column table; returns (table path, table, result)."""
    root = tmp_path_factory.mktemp("probe_sep")
    table = make_table(n_patients=60)  # 12 test patients: enough for a grouped CI (at least 10)
    path = _write(table, root / "features.parquet")
    result = run_probe(path, "y", root / "out", group="patient", **FAST)
    return path, table, result


def test_evaluate_modules_do_not_import_torch():
    code = (
        "import medfm.evaluate.probe, medfm.evaluate.knn, medfm.evaluate.fewshot, sys; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_run_probe_writes_its_files(separable_run):
    _, table, result = separable_run
    out = result.out_dir
    for name in ("results.json", "results.md", "predictions.csv", "roc.png", "pr.png", "probe.json", "probe.npz"):
        assert (out / name).is_file(), name
    for name in ("roc.png", "pr.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert result.results == out / "results.json"
    assert result.probe == out / "probe.json"
    summary = json.loads(result.results.read_text())
    assert summary["label"] == "y"
    assert summary["scoring"] == "roc_auc"
    assert set(summary["test"]) == {"roc_auc", "average_precision", "balanced_accuracy", "accuracy"}
    assert summary["search"]["kind"] == "optuna"
    assert summary["search"]["trials"] == 5
    assert summary["search"]["folds"] == 1
    assert "train→val" in summary["search"]["how"]
    assert summary["n_features"] == N_FEATURES
    assert summary["n_bootstrap"] == 200
    assert summary["grouped_by"] == "patient"
    assert summary["best_c"] == result.best_c
    n_test = int((table["split"] == "test").sum())
    assert summary["class_balance"]["test"] == {"0": n_test // 2, "1": n_test // 2}
    n_dev = len(table) - n_test
    assert sum(summary["class_balance"]["development"].values()) == n_dev
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("# Linear probe: y")
    assert "| roc_auc (searched) | 1.000 |" in markdown
    predictions = pd.read_csv(out / "predictions.csv")
    assert list(predictions.columns) == ["row", "y", "patient", "split", "proba_0", "proba_1", "predicted"]
    np.testing.assert_array_equal(predictions["row"], np.flatnonzero(table["split"] == "test"))
    assert predictions["patient"].tolist() == table["patient"][predictions["row"]].tolist()  # the table's IDs
    np.testing.assert_allclose(predictions[["proba_0", "proba_1"]].sum(axis=1), 1.0, atol=1e-12)


def test_separable_features_give_auc_one(separable_run):
    _, _, result = separable_run
    assert result.scoring == "roc_auc"
    assert result.test_metric.value == 1.0
    assert result.metrics["accuracy"].value == 1.0
    assert result.metrics["average_precision"].value == 1.0
    predictions = pd.read_csv(result.out_dir / "predictions.csv")
    assert (predictions["predicted"] == predictions["y"]).all()
    assert roc_auc_score(predictions["y"], predictions["proba_1"]) == 1.0


def test_shuffled_labels_ci_contains_half(tmp_path):
    table = make_table(n_patients=120, rows_per_patient=1, signal=0.0, seed=3, split=False)
    table["y"] = np.random.default_rng(7).permutation(table["y"].to_numpy())
    result = run_probe(table, "y", tmp_path, **FAST)
    ci = result.test_metric
    assert ci.low < 0.5 < ci.high
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["search"]["folds"] == 5  # no split column: 5-fold search over the non-test rows
    assert summary["features"] == "<DataFrame>"


def test_grouped_probe_keeps_patients_apart(tmp_path):
    # no split column: a grouped hold-out; 4 rows per patient make leaks likely if grouping were ignored
    table = make_table(n_patients=50, rows_per_patient=4, signal=1.0, seed=4, split=False)
    run_probe(table, "y", tmp_path, group="patient", **FAST)
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    test_patients = set(predictions["patient"])
    dev_patients = set(table.loc[~table.index.isin(predictions["row"]), "patient"])
    assert test_patients and dev_patients
    assert test_patients.isdisjoint(dev_patients)
    assert (table.loc[predictions["row"], "patient"].to_numpy() == predictions["patient"].to_numpy()).all()
    assert 0.1 < len(predictions) / len(table) < 0.3


def test_same_seed_same_results(tmp_path):
    table = make_table(signal=0.8, seed=5, split=False)
    a = run_probe(table, "y", tmp_path / "a", group="patient", seed=2, **FAST)
    b = run_probe(table, "y", tmp_path / "b", group="patient", seed=2, **FAST)
    ja, jb = (json.loads(r.results.read_text()) for r in (a, b))
    assert ja["test"] == jb["test"]
    assert ja["best_c"] == jb["best_c"]
    assert 0.5 < ja["test"]["roc_auc"]["value"] < 1.0  # a non-trivial value that would reveal any change
    pd.testing.assert_frame_equal(
        pd.read_csv(a.out_dir / "predictions.csv"), pd.read_csv(b.out_dir / "predictions.csv")
    )


def test_predict_reproduces_test_predictions(tmp_path, separable_run):
    path, table, result = separable_run
    written = predict(result.probe, path, tmp_path / "p.csv")
    assert written == tmp_path / "p.csv"
    applied = pd.read_csv(written)
    assert len(applied) == len(table)
    assert not any(c.startswith("feat_") for c in applied.columns)
    assert {"patient", "y", "split", "proba_0", "proba_1", "predicted"} <= set(applied.columns)
    predictions = pd.read_csv(result.out_dir / "predictions.csv")
    rows = predictions["row"].to_numpy()
    for column in ("proba_0", "proba_1"):
        np.testing.assert_allclose(applied[column].to_numpy()[rows], predictions[column], rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(applied["predicted"].to_numpy()[rows], predictions["predicted"])
    # a DataFrame works as input too
    in_memory = pd.read_parquet(predict(result.probe, table, tmp_path / "p.parquet"))
    np.testing.assert_allclose(in_memory["proba_1"], applied["proba_1"], rtol=1e-12, atol=1e-15)


def test_predict_rows_are_source_rows_with_unlabelled(tmp_path):
    table = make_table(seed=6, signal=1.0)
    table["y"] = table["y"].astype(float)
    table.loc[[0, 7, 33], "y"] = np.nan  # unlabelled rows are left out of the probe but keep their numbers
    result = run_probe(table, "y", tmp_path / "out", **FAST)
    predictions = pd.read_csv(result.out_dir / "predictions.csv")
    expected_rows = np.flatnonzero((table["split"] == "test") & table["y"].notna())
    np.testing.assert_array_equal(predictions["row"], expected_rows)
    applied = pd.read_csv(predict(result.probe, table, tmp_path / "p.csv"))
    proba = [c for c in predictions.columns if c.startswith("proba_")]
    assert len(proba) == 2
    np.testing.assert_allclose(applied[proba].to_numpy()[expected_rows], predictions[proba], rtol=1e-12, atol=1e-15)


def test_predict_missing_feature_columns(tmp_path, separable_run):
    _, table, result = separable_run
    with pytest.raises(
        ManifestError, match=r"12 feature columns \(feat_0 … feat_11\); the table lacks 1 of them, e.g. \['feat_3'\]"
    ):
        predict(result.probe, table.drop(columns=["feat_3"]), tmp_path / "p.csv")


def _wider(table: pd.DataFrame) -> pd.DataFrame:
    """The table with twice the feature columns (another model's, wider features)."""
    extra = pd.DataFrame(
        np.zeros((len(table), N_FEATURES)), columns=[f"feat_{N_FEATURES + i}" for i in range(N_FEATURES)]
    )
    return pd.concat([table, extra], axis=1)


def test_predict_refuses_a_table_with_more_feature_columns(tmp_path, separable_run):
    _, table, result = separable_run
    with pytest.raises(
        ManifestError, match=r"fitted on 12 feature columns \(feat_0 … feat_11\); the table has 24 \(feat_0 … feat_23\)"
    ):
        predict(result.probe, _wider(table), tmp_path / "p.csv")
    assert not (tmp_path / "p.csv").exists()


def test_predict_with_an_old_probe_refuses_on_the_number_of_columns(tmp_path, separable_run):
    _, table, result = separable_run
    old = tmp_path / "old"
    old.mkdir()
    meta = json.loads(result.probe.read_text())
    del meta["feature_columns"], meta["provenance"]  # saved before medfm recorded them
    (old / "probe.json").write_text(json.dumps(meta))
    (old / "probe.npz").write_bytes(result.probe.with_suffix(".npz").read_bytes())
    with pytest.raises(ManifestError, match=r"fitted on 12 features; the table has 24 \(feat_0 … feat_23\)"):
        predict(old / "probe.json", _wider(table), tmp_path / "p.csv")
    assert len(pd.read_csv(predict(old / "probe.json", table, tmp_path / "p.csv"))) == len(table)


def _extracted(table: pd.DataFrame, path: Path, model: str, sha: str | None) -> Path:
    """``table`` written as ``medfm extract`` writes it: with a sidecar naming the model, weights and profile."""
    columns = feature_columns(table)
    profile = {"name": "fmcib", "version": "1", "description": "prose", "size": [50, 50, 50]}
    sidecar = {"model": model, "weights_sha256": sha, "random_init_seed": None if sha else 0, "profile": profile}
    return write_feature_table(table.drop(columns=columns), table[columns].to_numpy(), columns, path, sidecar)


def test_probe_records_provenance_and_predict_refuses_another_models_table(tmp_path):
    table = make_table(seed=3)
    fitted_on = _extracted(table, tmp_path / "a.parquet", "fmcib-resnet50", "ab" * 32)
    result = run_probe(fitted_on, "y", tmp_path / "out", **FAST)
    meta = json.loads(result.probe.read_text())
    assert meta["feature_columns"] == [f"feat_{i}" for i in range(N_FEATURES)]
    assert meta["provenance"] == {
        "model": "fmcib-resnet50",
        "weights_sha256": "ab" * 32,
        "random_init_seed": None,
        "profile": {"name": "fmcib", "version": "1", "size": [50, 50, 50]},
    }
    same = _extracted(table, tmp_path / "same.parquet", "fmcib-resnet50", "ab" * 32)
    assert len(pd.read_csv(predict(result.probe, same, tmp_path / "p.csv"))) == len(table)
    other = _extracted(table, tmp_path / "b.parquet", "resnet10-3d", None)
    with pytest.raises(ManifestError) as info:
        predict(result.probe, other, tmp_path / "q.csv")
    assert str(info.value) == (
        f"the probe {result.probe} was fitted on features of fmcib-resnet50 (weights SHA-256 abababababab…, "
        f"profile fmcib v1); the table {other} holds features of resnet10-3d (random weights, seed 0, "
        "profile fmcib v1): extract them the same way"
    )
    assert not (tmp_path / "q.csv").exists()
    with pytest.warns(UserWarning, match="no sidecar"):
        predict(result.probe, table, tmp_path / "r.csv")  # a DataFrame: its provenance cannot be checked


def test_a_stale_sidecar_is_refused(tmp_path):
    table = make_table(seed=4)
    path = _extracted(table, tmp_path / "a.parquet", "fmcib-resnet50", "ab" * 32)
    table.iloc[:5].to_parquet(path, index=False)  # the table replaced, its sidecar left from the earlier one
    with pytest.raises(MedfmError, match=r"a\.json describes another file than .*a\.parquet \(SHA-256 differs\)"):
        run_probe(path, "y", tmp_path / "out", **FAST)


def test_compare_with_itself_is_zero(separable_run):
    _, _, result = separable_run
    report = compare(result.results, result.results, n_bootstrap=200)
    assert report["scoring"] == "roc_auc"
    assert report["n_test"] == len(pd.read_csv(result.out_dir / "predictions.csv"))
    d = report["difference"]
    assert (d["value"], d["low"], d["high"]) == (0.0, 0.0, 0.0)
    assert report["bootstrap_p"] == 1.0 and report["bootstrap_p_text"] == "p = 1"
    assert report["delong"]["p_value"] == pytest.approx(1.0)
    assert report["delong"]["auc_a"] == report["delong"]["auc_b"] == 1.0


@pytest.fixture(scope="module")
def good_and_noisy(tmp_path_factory):
    """Two probes on the same rows and labels: one on informative features, one on noise."""
    root = tmp_path_factory.mktemp("probe_cmp")
    good = make_table(n_patients=60, rows_per_patient=2, signal=1.5, seed=8)
    noisy = make_table(n_patients=60, rows_per_patient=2, signal=0.0, seed=9)
    ra = run_probe(good, "y", root / "good", group="patient", **FAST)
    rb = run_probe(noisy, "y", root / "noisy", group="patient", **FAST)
    return ra, rb


def test_compare_good_vs_noisy(good_and_noisy):
    ra, rb = good_and_noisy
    report = compare(ra.results, rb.results, n_bootstrap=200)
    d = report["difference"]
    assert d["value"] == pytest.approx(ra.test_metric.value - rb.test_metric.value, abs=1e-12)
    assert d["value"] > 0.2
    assert d["low"] > 0
    assert report["bootstrap_p"] < 0.05
    assert report["delong"]["auc_a"] == pytest.approx(ra.test_metric.value, abs=1e-12)
    assert report["delong"]["auc_b"] == pytest.approx(rb.test_metric.value, abs=1e-12)
    assert report["delong"]["z"] > 2
    # rows are grouped by patient (2 per patient): DeLong says it assumes independent rows; the bootstrap is grouped
    assert report["bootstrap"] == "paired, resampling whole patient groups"
    assert report["delong"]["assumes_independent_rows"] is True
    n_patients = len(pd.read_csv(ra.out_dir / "predictions.csv")["patient"].unique())
    assert f"come in {n_patients} patient groups" in report["delong"]["note"]
    if report["difference"]["low"] > 0 and report["bootstrap_p_below"]:
        assert report["bootstrap_p"] == 2 / 200 and report["bootstrap_p_text"] == "p < 0.01"
    reverse = compare(rb.results, ra.results, n_bootstrap=200)
    assert reverse["difference"]["value"] == pytest.approx(-d["value"], abs=1e-12)


def test_shared_storage_keeps_feature_sets_apart(tmp_path):
    import optuna

    storage = f"sqlite:///{tmp_path}/study.db"
    good = make_table(n_patients=60, rows_per_patient=2, signal=1.5, seed=8)
    noisy = make_table(n_patients=60, rows_per_patient=2, signal=0.0, seed=9)
    fast = {"trials": 5, "n_bootstrap": 20, "progress": False}
    run_probe(good, "y", tmp_path / "g1", storage=storage, **fast)
    on_noise = run_probe(noisy, "y", tmp_path / "n", storage=storage, **fast)
    run_probe(good, "y", tmp_path / "g2", storage=storage, **fast)  # same data: continues its study
    studies = {s.study_name: s.n_trials for s in optuna.get_all_study_summaries(storage)}
    assert sorted(studies.values()) == [5, 10]
    assert all(name.startswith("medfm-probe-y-roc_auc-") for name in studies)
    # the noisy probe's C comes from its own study's trials, not from the good features' better scores
    noisy_study = next(name for name, n in studies.items() if n == 5)
    own = {t.params["C"] for t in optuna.load_study(study_name=noisy_study, storage=storage).trials}
    assert on_noise.best_c in own


def test_compare_rejects_other_labels_or_rows(tmp_path, separable_run):
    from medfm.errors import MedfmError

    _, table, result = separable_run
    other = table.rename(columns={"y": "z"})
    rz = run_probe(other, "z", tmp_path / "z", trials=1, n_bootstrap=10, progress=False)
    with pytest.raises(MedfmError, match="different labels"):
        compare(result.results, rz.results, n_bootstrap=10)
    fewer = run_probe(table[table["patient"] != "P000"], "y", tmp_path / "f", trials=1, n_bootstrap=10, progress=False)
    with pytest.raises(MedfmError, match="different rows"):
        compare(result.results, fewer.results, n_bootstrap=10)


def test_pred_prefixed_columns_are_found(tmp_path):
    table = make_table(seed=10, prefix="pred_")
    assert feature_columns(table) == [f"pred_{i}" for i in range(N_FEATURES)]
    result = run_probe(table, "y", tmp_path, **FAST)
    assert result.test_metric.value == 1.0
    meta = json.loads(result.probe.read_text())
    assert meta["feature_columns"] == [f"pred_{i}" for i in range(N_FEATURES)]
    applied = pd.read_csv(predict(result.probe, table, tmp_path / "p.csv"))
    assert not any(c.startswith("pred_") for c in applied.columns)


def test_custom_prefix_probe_can_predict(tmp_path):
    table = make_table(seed=20, prefix="emb_")
    path = _write(table, tmp_path / "features.parquet")
    result = run_probe(path, "y", tmp_path / "out", feature_prefix="emb_", **FAST)
    assert result.test_metric.value == 1.0
    for source in (path, table):
        applied = pd.read_csv(predict(result.probe, source, tmp_path / "p.csv"))
        assert list(applied.columns) == ["patient", "y", "split", "proba_0", "proba_1", "predicted"]
        assert (applied["predicted"] == table["y"]).all()
    broken = table.copy()
    broken.loc[3, "emb_5"] = np.nan
    with pytest.raises(ManifestError, match="row 3 has a missing or infinite feature"):
        predict(result.probe, broken, tmp_path / "p.csv")


def test_feature_columns_sorted_numerically():
    table = pd.DataFrame({"feat_10": [1.0], "feat_2": [2.0], "feat_x": [0.0], "feat_0": [3.0], "label": [1]})
    assert feature_columns(table) == ["feat_0", "feat_2", "feat_10"]
    with pytest.raises(ManifestError, match="no feature columns"):
        feature_columns(pd.DataFrame({"a": [1.0]}))


def test_missing_label_column_raises(tmp_path):
    table = make_table(seed=11)
    with pytest.raises(ManifestError, match="'outcome' not found"):
        run_probe(table, "outcome", tmp_path, **FAST)
    with pytest.raises(ManifestError, match="'hospital' not found"):
        read_labelled(table, "y", group="hospital")


def test_non_finite_feature_raises():
    table = make_table(seed=12)
    table.loc[5, "feat_2"] = np.inf
    with pytest.raises(ManifestError, match="row 5"):
        read_labelled(table, "y")


def test_multiclass_probe(tmp_path):
    rng = np.random.default_rng(13)
    y = np.arange(120) % 3
    x = rng.normal(size=(120, 8))
    x[np.arange(120), y] += 5.0
    table = pd.DataFrame(x, columns=[f"feat_{i}" for i in range(8)])
    table["grade"] = np.array(["low", "mid", "high"])[y]
    result = run_probe(table, "grade", tmp_path, **FAST)
    assert result.test_metric.value > 0.95
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert {"proba_high", "proba_low", "proba_mid"} <= set(predictions.columns)
    assert (tmp_path / "roc.png").read_bytes()[:8] == PNG_MAGIC


def test_grid_search_probe(tmp_path):
    table = make_table(seed=14)
    result = run_probe(table, "y", tmp_path, search="grid", n_bootstrap=50, progress=False)
    summary = json.loads(result.results.read_text())
    assert summary["search"]["kind"] == "grid"
    assert summary["search"]["trials"] == 45


# -- CLI ---------------------------------------------------------------------------------------------------
def test_cli_probe_predict_compare(tmp_path, capsys):
    table = _write(make_table(n_patients=60, seed=15), tmp_path / "features.parquet")  # 12 test patients
    out = tmp_path / "out"
    args = ["probe", str(table), "--label", "y", "--out", str(out), "--trials", "5", "--bootstrap", "100", "--quiet"]
    assert main([*args, "--group", "patient"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("test roc_auc: 1.000 (95% CI 1.000–1.000, n = 12)")  # n: patients resampled
    assert "best C" in lines[0]
    assert lines[1].startswith(f"results in {out / 'results.json'}")
    summary = json.loads((out / "results.json").read_text())
    assert summary["n_bootstrap"] == 100
    assert summary["search"]["trials"] == 5

    assert main(["predict", str(out / "probe.json"), str(table), "--out", str(tmp_path / "p.csv")]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {tmp_path / 'p.csv'}"
    assert len(pd.read_csv(tmp_path / "p.csv")) == 180

    results = str(out / "results.json")
    assert main(["compare", results, results, "--bootstrap", "100"]) == 0
    printed = capsys.readouterr().out
    first, second = printed.splitlines()[:2]
    assert first.startswith("roc_auc A − B = +0.000 (95% CI +0.000 to +0.000, n = 12), bootstrap p = 1")
    assert second.startswith("DeLong (assumes independent rows): AUC 1.000 vs 1.000, z = 0.00, p = 1")  # --group
    report = json.loads(printed[printed.index("{") :])
    assert report["difference"]["value"] == 0.0

    assert main(["compare", results, results, "--bootstrap", "100", "--out", str(tmp_path / "cmp.json")]) == 0
    assert "{" not in capsys.readouterr().out
    assert json.loads((tmp_path / "cmp.json").read_text())["n_test"] == 36


def test_cli_missing_label_is_one_line_error(tmp_path, capsys):
    table = _write(make_table(seed=16), tmp_path / "features.parquet")
    status = main(["probe", str(table), "--label", "nope", "--out", str(tmp_path / "o"), "--trials", "1", "--quiet"])
    assert status == 2
    captured = capsys.readouterr()
    err_lines = captured.err.strip().splitlines()
    assert len(err_lines) == 1
    assert err_lines[0].startswith("medfm: error: ")
    assert "'nope' not found" in err_lines[0]
    assert captured.out == ""
    assert not (tmp_path / "o" / "results.json").exists()


def test_cli_bad_split_value_is_one_line_error(tmp_path, capsys):
    table = make_table(seed=17)
    table.loc[4, "split"] = "dev"
    path = _write(table, tmp_path / "features.parquet")
    status = main(["probe", str(path), "--label", "y", "--out", str(tmp_path / "o"), "--trials", "1", "--quiet"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["medfm: error: row 4: column split has value 'dev'; allowed train, val, test"]


def test_cli_knn_and_fewshot(tmp_path, capsys):
    table = tmp_path / "features.csv"  # CSV input this time
    make_table(seed=18).to_csv(table, index=False)
    assert main(["knn", str(table), "--label", "y", "--k", "5", "--bootstrap", "100"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"kNN (k=5, T=0.07) {name}: 1.000 (95% CI 1.000–1.000, n = 24)"
        for name in ("accuracy", "balanced_accuracy", "roc_auc")
    ]
    assert main(["fewshot", str(table), "--label", "y", "--episodes", "20", "--shots", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    # at 3 shots the standardised logistic head is noisier than the prototype on this one-feature signal
    logistic = run_fewshot(make_table(seed=18), "y", shots=3, episodes=20, heads=("logistic",))[0]
    assert lines == [
        "2-way 3-shot prototype: 1.000 ± 0.000 (n = 20 episodes)",
        f"2-way 3-shot logistic: {logistic.mean:.3f} ± {logistic.ci95:.3f} (n = 20 episodes; C by 3-fold CV in the "
        "support set)",
    ]


def test_cli_fewshot_too_many_ways_is_an_error(tmp_path, capsys):
    table = tmp_path / "features.csv"
    make_table(seed=19).to_csv(table, index=False)
    assert main(["fewshot", str(table), "--label", "y", "--ways", "3", "--episodes", "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("medfm: error: only 2 classes")


# -- real data -----------------------------------------------------------------------------------------------
def test_breastmnist_pixels_probe(need_shared, tmp_path):
    data = np.load(need_shared("breastmnist", "breastmnist.npz"))
    frames = []
    for part in ("train", "val", "test"):
        images = data[f"{part}_images"]
        x = images.reshape(len(images), -1).astype(np.float64) / 255.0
        frame = pd.DataFrame(x, columns=[f"feat_{i}" for i in range(x.shape[1])])
        frame["malignant"] = data[f"{part}_labels"].ravel()
        frame["split"] = part
        frames.append(frame)
    table = pd.concat(frames, ignore_index=True)
    result = run_probe(table, "malignant", tmp_path, trials=10, n_bootstrap=200, progress=False)
    auc = result.test_metric
    assert 0.65 < auc.value < 0.95
    assert auc.low < auc.value < auc.high
    predictions = pd.read_csv(tmp_path / "predictions.csv")
    assert len(predictions) == len(data["test_labels"])
    assert roc_auc_score(predictions["malignant"], predictions["proba_1"]) == pytest.approx(auc.value, abs=1e-12)


def test_roc_and_pr_figures_name_the_model_and_data_and_fix_their_axes(tmp_path):
    import matplotlib

    table = make_table(signal=0.8, seed=5)
    path = _write(table, tmp_path / "features.parquet")
    (tmp_path / "features.json").write_text(json.dumps({"model": "fmcib-resnet50", "manifest": "/data/luna16.csv"}))
    captured = {}
    from medfm.data import outputs

    original = outputs.write_figure

    def keep(fig, dest, dpi=120):
        ax = fig.axes[0]
        captured[Path(dest).name] = (ax.get_title(), ax.get_xlim(), ax.get_ylim(), [ln.get_label() for ln in ax.lines])
        return original(fig, dest, dpi)

    matplotlib.use("Agg")
    import medfm.evaluate.figures as figures

    figures.write_figure = keep
    try:
        run_probe(path, "y", tmp_path / "out", group="patient", figure_format="svg", **FAST)
    finally:
        figures.write_figure = original
    n_test = int((table["split"] == "test").sum())
    title, xlim, ylim, lines = captured["roc.svg"]
    assert title == f"ROC\nfmcib-resnet50 on luna16.csv: y = 1; test split, n = {n_test}"
    assert xlim == (0, 1) and ylim == (0, 1.02)
    assert lines[0].startswith("fmcib-resnet50 (AUC ") and lines[-1] == "chance"
    title, _, _, lines = captured["pr.svg"]
    assert title.startswith("Precision-recall\nfmcib-resnet50 on luna16.csv")
    assert lines[0].startswith("fmcib-resnet50 (AP ") and lines[-1] == "prevalence 0.500"
    assert (tmp_path / "out" / "roc.svg").read_text().lstrip().startswith("<?xml")
    assert not (tmp_path / "out" / "roc.png").exists()


def test_several_models_share_one_roc_figure(tmp_path):
    from medfm.data import outputs
    from medfm.evaluate import figures

    truth = np.array([0, 0, 1, 1, 0, 1])
    curves = [figures.Scores("A: good", truth, truth + 0.1), figures.Scores("B: weak", truth, np.arange(6.0))]
    captured = []
    original = outputs.write_figure
    figures.write_figure = lambda fig, dest, dpi=120: captured.append([ln.get_label() for ln in fig.axes[0].lines]) or original(fig, dest, dpi)
    try:
        written = figures.roc_pr_figures(curves, "t", tmp_path, "pdf")
    finally:
        figures.write_figure = original
    assert [p.name for p in written] == ["roc.pdf", "pr.pdf"]
    assert captured[0] == ["A: good (AUC 1.000)", "B: weak (AUC 0.778)", "chance"]
    assert captured[1][-1] == "prevalence 0.500" and (tmp_path / "pr.pdf").read_bytes()[:4] == b"%PDF"


def test_train_fraction_subsamples_train_and_val_together(tmp_path):
    """A fraction of the labelled rows is that share of train + val (the final probe is refit on both)."""
    rng = np.random.default_rng(11)
    side = np.repeat(["train", "val", "test"], [60, 20, 20])
    y = np.tile([0, 1], 50)
    table = pd.DataFrame(rng.normal(size=(100, 4)) + 3.0 * y[:, None], columns=[f"feat_{i}" for i in range(4)])
    table["y"], table["split"] = y, side
    runs = run_fractions(
        table, "y", tmp_path, [1.0, 0.5, 0.2], repeats=2, search="grid", n_bootstrap=20, progress=False
    )
    expected = {1.0: (60, 20), 0.5: (30, 10), 0.2: (12, 4)}  # stratified by class and side, rounded per stratum
    for _, run in runs.iterrows():
        n_train, n_val = expected[run["fraction"]]
        assert (run["n_train"], run["n_val"], run["n_labelled"]) == (n_train, n_val, n_train + n_val)
        assert run["n_labelled_available"] == 80
        folder = tmp_path / f"fraction_{run['fraction']:g}" / f"repeat_{run['repeat']}"
        summary = json.loads((folder / "results.json").read_text())
        assert (summary["n_train"], summary["n_val"], summary["n_labelled"], summary["n_test"]) == (
            n_train,
            n_val,
            n_train + n_val,
            20,
        )
        assert sum(summary["class_balance"]["development"].values()) == n_train + n_val
    on_disk = pd.read_csv(tmp_path / "fractions.csv")
    assert on_disk["n_labelled"].tolist() == [80, 40, 40, 16, 16]
    assert "| 0.2 | 16 |" in (tmp_path / "fractions.md").read_text()
    draws = [json.loads((tmp_path / "fraction_0.2" / f"repeat_{r}" / "results.json").read_text()) for r in (0, 1)]
    assert draws[0]["fraction_seed"] != draws[1]["fraction_seed"]
    # with folds over the development rows there is no single validation set
    result = run_probe(table, "y", tmp_path / "cv", cv=3, search="grid", n_bootstrap=20, progress=False)
    assert result.counts == {"n_train": 80, "n_val": None, "n_labelled": 80, "n_labelled_available": 80, "n_test": 20}


# -- compare reads every results file medfm writes ----------------------------------------------------------
def _finetune_run(folder: Path, rows: np.ndarray, truth: np.ndarray, p1: np.ndarray) -> Path:
    """A fine-tuned binary classifier's results.json + test_predictions.csv, written by medfm's own writers."""
    from medfm.data.outputs import write_json
    from medfm.train.outputs import write_test_predictions

    classes = ["0", "1"]
    columns = {"truth": [classes[int(t)] for t in truth], "prob_0": 1 - p1, "prob_1": p1}
    columns["predicted"] = [classes[int(p > 0.5)] for p in p1]
    folder.mkdir(parents=True)
    write_test_predictions(folder, rows, columns, pd.DataFrame({"patient_id": [f"P{r}" for r in range(100)]}))
    test = {"roc_auc": {"value": roc_auc_score(truth, p1), "low": 0.0, "high": 1.0}}
    return write_json({"task": "binary", "classes": classes, "test": test, "sizes": {}}, folder / "results.json")


def test_compare_two_fine_tuned_classifiers(tmp_path, capsys):
    rng = np.random.default_rng(21)
    rows = np.sort(rng.choice(100, 40, replace=False))
    truth = rng.integers(0, 2, 40)
    good = np.clip(truth * 0.6 + rng.uniform(0, 0.4, 40), 0, 1)
    noisy = rng.uniform(0, 1, 40)
    a = _finetune_run(tmp_path / "a", rows, truth, good)
    b = _finetune_run(tmp_path / "b", rows[::-1].copy(), truth[::-1].copy(), noisy[::-1].copy())  # any row order
    report = compare(a, b, n_bootstrap=200)
    assert report["a"]["kind"] == report["b"]["kind"] == "finetune"
    assert report["n_test"] == 40 and report["scoring"] == "roc_auc"
    expected = roc_auc_score(truth, good) - roc_auc_score(truth, noisy)
    assert report["difference"]["value"] == pytest.approx(expected)
    assert report["delong"]["auc_a"] == pytest.approx(roc_auc_score(truth, good))
    assert main(["compare", str(a.parent), str(b), "--bootstrap", "50", "--out", str(tmp_path / "c.json")]) == 0
    assert f"roc_auc A − B = {expected:+.3f}" in capsys.readouterr().out


def test_compare_train_fraction_runs_and_refusals(tmp_path, capsys):
    table = make_table(n_patients=30, signal=1.0, seed=22)
    noisy = make_table(n_patients=30, signal=0.0, seed=23)
    noisy["y"], noisy["split"] = table["y"], table["split"]
    for name, t in (("a", table), ("b", noisy)):
        run_fractions(t, "y", tmp_path / name, [1.0, 0.5], repeats=1, search="grid", n_bootstrap=20, progress=False)
    whole = compare(tmp_path / "a", tmp_path / "b", n_bootstrap=50)
    one = compare(tmp_path / "a/fraction_1/repeat_0/results.json", tmp_path / "b/fraction_1/repeat_0/results.json", 50)
    assert whole["difference"] == one["difference"] and whole["a"]["kind"] == "probe"
    half = compare(tmp_path / "a" / "fractions.csv", tmp_path / "b", n_bootstrap=50, fraction=0.5)
    assert half["a"]["results"].endswith("fraction_0.5/repeat_0/results.json")
    with pytest.raises(MedfmError, match=r"no fraction_0.2/repeat_0/results.json; its fractions are \['0.5', '1'\]"):
        compare(tmp_path / "a", tmp_path / "b", fraction=0.2)
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--fraction", "0.5", "--bootstrap", "20"]) == 0
    assert "roc_auc A − B =" in capsys.readouterr().out
    from medfm.data.outputs import write_json

    detect = write_json({"arch": "fasterrcnn", "iou_thresholds": [0.5], "test": {}}, tmp_path / "det" / "results.json")
    with pytest.raises(MedfmError, match="a detection run; compare pairs per-row class probabilities"):
        compare(detect, tmp_path / "a")
    survival = write_json({"task": "survival", "test": {}}, tmp_path / "surv" / "results.json")
    with pytest.raises(MedfmError, match="a fine-tuned survival run"):
        compare(tmp_path / "a", survival)
    assert main(["compare", str(tmp_path / "nothing.json"), str(tmp_path / "a")]) == 2
    assert "no such results file" in capsys.readouterr().err


def test_knn_writes_its_report_predictions_and_figures_with_out(tmp_path, capsys):
    table = make_table(seed=18)
    path = tmp_path / "features.csv"
    table.to_csv(path, index=False)
    out = tmp_path / "knn"
    assert main(["knn", str(path), "--label", "y", "--k", "5", "--bootstrap", "100", "--out", str(out)]) == 0
    assert f"results in {out}/knn.json" in capsys.readouterr().out
    report = json.loads((out / "knn.json").read_text())
    assert report["k"] == 5 and report["test"]["roc_auc"]["value"] == 1.0
    predictions = pd.read_csv(out / "predictions.csv")
    test_rows = np.flatnonzero(table["split"] == "test")
    np.testing.assert_array_equal(predictions["row"], test_rows)
    assert predictions["patient"].tolist() == table["patient"][test_rows].tolist()
    assert (predictions["predicted"] == predictions["y"]).all()
    for kind in ("roc", "pr"):
        assert (out / f"{kind}.png").read_bytes()[:8] == PNG_MAGIC
