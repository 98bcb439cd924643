"""``LinearProbe``: search, the exact row-span shortcut, multi-class, saving without pickle, argument checks."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import optuna
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from medfm.errors import CheckpointError
from medfm.evaluate.linear import GRID_C, LinearProbe

ONE_FOLD = [(np.arange(0, 40), np.arange(40, 60))]


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small matrices: one BLAS thread is faster, and far faster when the CPUs are shared with other work."""
    with threadpool_limits(limits=1):
        yield


def _noisy_binary(n: int = 60, d: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Wide (n < d), not separable by the signal alone: a linear signal plus label noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3.0, size=d) + rng.normal(size=d)
    w = rng.normal(size=d)
    y = (((x - x.mean(axis=0)) / x.std(axis=0)) @ w / np.sqrt(d) + rng.normal(size=n) > 0).astype(int)
    return x, y


def _separable(n: int = 80, d: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(size=(n, d))
    x[:, 0] += np.where(y == 1, 6.0, -6.0)
    return x, y


def _standardised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    return mean, scale


def test_separable_binary_auc_one():
    x, y = _separable()
    train, test = np.arange(60), np.arange(60, 80)
    folds = [(np.arange(40), np.arange(40, 60))]
    probe = LinearProbe(trials=5, seed=0).fit(x[train], y[train], folds)
    assert probe.score(x[test], y[test]) == 1.0
    assert roc_auc_score(y[test], probe.predict_proba(x[test])[:, 1]) == 1.0
    assert np.array_equal(probe.predict(x[test]), y[test])
    assert list(probe.classes_) == [0, 1]
    scores = probe.decision_function(x[test])  # (n,) for binary, as scikit-learn gives it: classes_[1]'s logit
    assert scores.shape == (20,)
    np.testing.assert_allclose(probe.predict_proba(x[test])[:, 1], 1 / (1 + np.exp(-scores)))
    proba = probe.predict_proba(x[test])
    assert proba.shape == (20, 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)


def test_row_span_is_exact_for_wide_features():
    x, y = _noisy_binary()
    probe = LinearProbe(trials=8, seed=0).fit(x, y, ONE_FOLD)
    mean, scale = _standardised(x)
    np.testing.assert_allclose(probe.mean_, mean)
    np.testing.assert_allclose(probe.scale_, scale)
    reference = LogisticRegression(C=probe.best_c_, tol=1e-10, max_iter=100_000).fit((x - mean) / scale, y)
    rng = np.random.default_rng(5)
    new = rng.normal(size=(30, x.shape[1])) * x.std(axis=0) + x.mean(axis=0)
    for rows in (x, new):
        ours, theirs = probe.predict_proba(rows), reference.predict_proba((rows - mean) / scale)
        assert np.abs(ours - theirs).max() < 1e-4
    # the probabilities are not trivially constant, so the comparison means something
    assert probe.predict_proba(new)[:, 1].std() > 0.01
    assert probe.coef_.shape == (1, x.shape[1])


def test_multiclass_wide_matches_sklearn_and_rows_sum_to_one():
    rng = np.random.default_rng(1)
    n, d, k = 80, 150, 4
    centers = rng.normal(size=(k, d)) * 0.3
    y = np.repeat(np.arange(k), n // k)
    x = centers[y] + rng.normal(size=(n, d))
    folds = [(np.arange(0, n, 2), np.arange(1, n, 2))]
    probe = LinearProbe(trials=5, seed=0).fit(x, y, folds)
    y_test = np.arange(40) % k
    x_test = centers[y_test] + rng.normal(size=(40, d))
    proba = probe.predict_proba(x_test)
    assert proba.shape == (40, k)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert probe.coef_.shape == (k, d) and probe.intercept_.shape == (k,)
    assert list(probe.classes_) == [0, 1, 2, 3]
    assert probe.score(x_test, y_test) > 0.9  # one-vs-rest macro AUC
    assert np.mean(probe.predict(x_test) == y_test) > 0.7
    mean, scale = _standardised(x)
    reference = LogisticRegression(C=probe.best_c_, tol=1e-10, max_iter=100_000).fit((x - mean) / scale, y)
    assert np.abs(proba - reference.predict_proba((x_test - mean) / scale)).max() < 1e-4


def test_string_labels():
    x, y = _separable(seed=2)
    labels = np.array(["benign", "malignant"])[y]
    probe = LinearProbe(trials=5, seed=0).fit(x[:60], labels[:60], [(np.arange(40), np.arange(40, 60))])
    assert list(probe.classes_) == ["benign", "malignant"]
    assert np.array_equal(probe.predict(x[60:]), labels[60:])


def test_grid_search_tries_the_45_values():
    assert len(GRID_C) == 45
    np.testing.assert_allclose(GRID_C, np.logspace(-6, 5, 45), rtol=1e-15)
    x, y = _noisy_binary(n=60, d=20, seed=3)
    calls = []
    probe = LinearProbe(search="grid").fit(x, y, ONE_FOLD, progress=lambda: calls.append(1))
    assert [c for c, _ in probe.trials_] == list(GRID_C)
    assert len(calls) == 45
    best_value = max(v for _, v in probe.trials_)
    assert probe.best_c_ in GRID_C
    assert dict(probe.trials_)[probe.best_c_] == best_value


def test_optuna_search_is_seeded():
    x, y = _noisy_binary(seed=4)
    a = LinearProbe(trials=6, seed=3).fit(x, y, ONE_FOLD)
    b = LinearProbe(trials=6, seed=3).fit(x, y, ONE_FOLD)
    c = LinearProbe(trials=6, seed=4).fit(x, y, ONE_FOLD)
    assert a.best_c_ == b.best_c_
    assert a.trials_ == b.trials_
    assert len(a.trials_) == 6
    np.testing.assert_array_equal(a.predict_proba(x), b.predict_proba(x))
    assert [t[0] for t in a.trials_] != [t[0] for t in c.trials_]  # another seed samples other C
    for c_value, _ in a.trials_:
        assert 1e-6 <= c_value <= 1e3  # the default c_range
    assert a.best_c_ == max(a.trials_, key=lambda t: t[1])[0]


def test_optuna_c_range_is_respected():
    x, y = _noisy_binary(seed=5)
    probe = LinearProbe(trials=5, seed=0, c_range=(0.01, 0.1)).fit(x, y, ONE_FOLD)
    assert all(0.01 <= c <= 0.1 for c, _ in probe.trials_)


def test_objective_averages_the_folds():
    x, y = _noisy_binary(n=60, d=20, seed=6)
    folds = [(np.arange(0, 30), np.arange(30, 60)), (np.arange(30, 60), np.arange(0, 30))]
    probe = LinearProbe(trials=3, seed=0, c_range=(0.01, 1.0)).fit(x, y, folds)
    assert len(probe.trials_) == 3
    for c, value in probe.trials_:
        per_fold = []
        for train, val in folds:
            mean, scale = _standardised(x[train])
            model = LogisticRegression(C=c, tol=1e-10, max_iter=100_000).fit((x[train] - mean) / scale, y[train])
            per_fold.append(roc_auc_score(y[val], model.predict_proba((x[val] - mean) / scale)[:, 1]))
        assert value == pytest.approx(np.mean(per_fold), abs=1e-3)
        assert per_fold[0] != per_fold[1]  # the mean of two different numbers, not one fold's


def test_optuna_storage_accumulates_trials(tmp_path):
    x, y = _noisy_binary(seed=7)
    storage = f"sqlite:///{tmp_path}/s.db"
    for _ in range(2):
        probe = LinearProbe(trials=5, seed=0, storage=storage, study_name="shared").fit(x, y, ONE_FOLD)
        assert len(probe.trials_) == 5  # this process's trials
    study = optuna.load_study(study_name="shared", storage=storage)
    assert len(study.trials) == 10
    assert probe.best_c_ == pytest.approx(study.best_params["C"])


def test_save_load_round_trip(tmp_path):
    x, y = _noisy_binary(seed=8)
    probe = LinearProbe(trials=5, seed=0).fit(x, y, ONE_FOLD)
    columns = [f"feat_{i}" for i in range(x.shape[1])]
    written = probe.save(tmp_path / "sub" / "probe", feature_columns=columns)
    assert written == tmp_path / "sub" / "probe.json"
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["probe.json", "probe.npz"]
    with np.load(tmp_path / "sub" / "probe.npz", allow_pickle=False) as arrays:
        assert set(arrays.files) == {"mean", "scale", "coef", "intercept"}
        np.testing.assert_array_equal(arrays["coef"], probe.coef_)
    meta = json.loads(written.read_text())
    assert meta["kind"] == "medfm.LinearProbe"
    assert meta["classes"] == [0, 1]
    assert meta["best_c"] == probe.best_c_
    loaded, loaded_columns = LinearProbe.load(tmp_path / "sub" / "probe")
    assert loaded_columns == columns
    assert loaded.best_c_ == probe.best_c_
    assert list(loaded.classes_) == [0, 1]
    np.testing.assert_array_equal(loaded.predict_proba(x), probe.predict_proba(x))
    np.testing.assert_array_equal(loaded.predict(x), probe.predict(x))
    # loading by the .json name works too
    again, _ = LinearProbe.load(written)
    np.testing.assert_array_equal(again.predict_proba(x), probe.predict_proba(x))


def test_save_load_string_classes(tmp_path):
    x, y = _separable(seed=9)
    labels = np.array(["no", "yes"])[y]
    probe = LinearProbe(trials=5, seed=0).fit(x[:60], labels[:60], [(np.arange(40), np.arange(40, 60))])
    probe.save(tmp_path / "probe")
    loaded, columns = LinearProbe.load(tmp_path / "probe")
    assert columns is None
    assert np.array_equal(loaded.predict(x[60:]), labels[60:])


def test_load_rejects_other_json(tmp_path):
    (tmp_path / "probe.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ValueError, match="not a saved medfm probe"):
        LinearProbe.load(tmp_path / "probe")


@pytest.fixture
def saved_probe(tmp_path):
    """A probe saved as tmp_path/probe.json + probe.npz, with a feature table it applies to."""
    x, y = _separable(seed=10)
    probe = LinearProbe(trials=3, seed=0).fit(x[:60], y[:60], [(np.arange(40), np.arange(40, 60))])
    columns = [f"feat_{i}" for i in range(x.shape[1])]
    probe.save(tmp_path / "probe", feature_columns=columns)
    table = tmp_path / "features.csv"
    pd.DataFrame(x[60:], columns=columns).to_csv(table, index=False)
    return tmp_path / "probe", table


def test_truncated_probe_npz_is_named_as_damaged(saved_probe):
    probe, _ = saved_probe
    npz = probe.with_suffix(".npz")
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"^the probe file {re.escape(str(npz))} is damaged \("):
        LinearProbe.load(probe)


def test_probe_npz_holding_a_pickle_is_refused_without_running_it(saved_probe):
    probe, _ = saved_probe
    marker = probe.parent / "ran.txt"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch '{marker}'",))

    arrays = {"mean": np.zeros(10), "scale": np.ones(10), "intercept": np.zeros(1)}
    np.savez(probe.with_suffix(".npz"), coef=np.array([Payload()], dtype=object), **arrays)
    with pytest.raises(CheckpointError) as info:
        LinearProbe.load(probe)
    assert str(info.value) == (
        f"the probe file {probe.with_suffix('.npz')} is damaged: it holds Python objects (a pickle) where a medfm "
        "probe holds plain numbers; refused without loading them"
    )
    assert not marker.exists()
    with np.load(probe.with_suffix(".npz"), allow_pickle=True) as arrays:  # control: the payload is live
        arrays["coef"]
    assert marker.exists()


def test_damaged_probe_json(saved_probe):
    probe, _ = saved_probe
    card = probe.with_suffix(".json")
    card.write_text(card.read_text()[:40])
    with pytest.raises(CheckpointError, match=rf"^the probe file {re.escape(str(card))} is damaged or unreadable"):
        LinearProbe.load(probe)
    card.write_text(json.dumps({"kind": "medfm.LinearProbe", "scoring": "roc_auc"}))
    with pytest.raises(CheckpointError, match=r"is damaged: it lacks 'search'"):
        LinearProbe.load(probe)


def test_predict_with_a_damaged_probe_is_one_line(saved_probe, tmp_path, capsys):
    from medfm.cli import main

    probe, table = saved_probe
    npz = probe.with_suffix(".npz")
    npz.write_bytes(b"PK\x03\x04" + bytes(100))
    assert main(["predict", str(probe.with_suffix(".json")), str(table), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medfm: error: the probe file {npz} is damaged (")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.parametrize(
    ("kwargs", "allowed"),
    [
        ({"scoring": "f1"}, ["roc_auc", "average_precision", "balanced_accuracy", "accuracy"]),
        ({"search": "random"}, ["optuna", "grid"]),
        ({"trials": 0}, ["at least 1"]),
        ({"c_range": (1.0, 0.1)}, ["0 < low < high"]),
        ({"c_range": (0.0, 1.0)}, ["0 < low < high"]),
    ],
)
def test_invalid_arguments(kwargs, allowed):
    probe = LinearProbe(**kwargs)  # stored as given (scikit-learn's rule); refused when fitting
    assert probe.get_params()[next(iter(kwargs))] == next(iter(kwargs.values()))
    x, y = _separable(20, 3)
    with pytest.raises(ValueError) as info:
        probe.fit(x, y)
    for word in allowed:
        assert word in str(info.value)


def test_one_class_label_raises():
    x = np.random.default_rng(0).normal(size=(20, 5))
    with pytest.raises(ValueError, match="one class"):
        LinearProbe(trials=1).fit(x, np.ones(20, dtype=int), [(np.arange(10), np.arange(10, 20))])


def test_a_storage_optuna_cannot_open_is_a_user_error():
    from medfm.errors import ConfigError

    x, y = _separable(seed=3)
    probe = LinearProbe(search="optuna", trials=2, storage="bogus://nowhere")
    with pytest.raises(ConfigError, match=r"^--storage bogus://nowhere: cannot be opened \("):
        probe.fit(x[:60], y[:60], [(np.arange(40), np.arange(40, 60))])
