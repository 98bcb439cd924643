"""``medfm probe import``: scikit-learn pickles become medfm probes; anything else in a pickle is refused unrun."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from medfm.cli import main
from medfm.errors import CheckpointError
from medfm.evaluate.linear import LinearProbe
from medfm.evaluate.probe import predict
from medfm.evaluate.sklearn_pickle import import_sklearn_probe, load_sklearn_pickle


def _data(n: int = 80, d: int = 12, classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(loc=3.0, scale=[0.5 + i for i in range(d)], size=(n, d)) + y[:, None] * 0.8
    return x, y


def _pickle(obj, path, protocol=pickle.DEFAULT_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("kind", ["logistic", "pipeline", "two_scalers"])
def test_imported_probe_predicts_what_sklearn_predicts(tmp_path, kind, protocol):
    x, y = _data()
    if kind == "logistic":
        model = LogisticRegression(C=0.3, max_iter=1000)
    elif kind == "pipeline":
        model = make_pipeline(StandardScaler(), LogisticRegression(C=0.3, max_iter=1000))
    else:
        model = make_pipeline(StandardScaler(with_mean=False), StandardScaler(), LogisticRegression(max_iter=1000))
    model.fit(x, y)
    out = import_sklearn_probe(_pickle(model, tmp_path / "model.pkl", protocol), tmp_path / "probe.json")
    probe, columns = LinearProbe.load(out)
    x_new, _ = _data(n=30, seed=1)
    np.testing.assert_allclose(probe.predict_proba(x_new), model.predict_proba(x_new), rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(probe.predict(x_new), model.predict(x_new))
    assert columns == [f"pred_{i}" for i in range(12)]
    meta = json.loads(out.read_text())
    assert meta["search"] is None and meta["imported_from"]["estimator"].endswith("LogisticRegression")
    assert len(meta["imported_from"]["sha256"]) == 64


def test_multinomial_and_named_features_through_predict(tmp_path):
    x, y = _data(classes=3, seed=2)
    names = [f"pred_{i}" for i in range(12)]
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(pd.DataFrame(x, columns=names), y)
    import_sklearn_probe(_pickle(model, tmp_path / "model.pkl"), tmp_path / "probe.json", feature_prefix="feat_")
    x_new, _ = _data(n=25, seed=3)
    table = pd.DataFrame(x_new, columns=names)
    table.insert(0, "case", [f"c{i}" for i in range(25)])
    applied = pd.read_csv(predict(tmp_path / "probe.json", table, tmp_path / "p.csv"))
    expected = model.predict_proba(pd.DataFrame(x_new, columns=names))
    np.testing.assert_allclose(applied[["proba_0", "proba_1", "proba_2"]].to_numpy(), expected, rtol=1e-9)
    assert list(applied["case"]) == list(table["case"])  # the model's own names were used, not feat_


def test_cli_import_then_predict(tmp_path, capsys):
    x, y = _data()
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(x, y)
    pkl = _pickle(model, tmp_path / "model.pkl")
    assert main(["probe", "import", str(pkl), "--out", str(tmp_path / "probe.json")]) == 0
    assert f"wrote probe {tmp_path / 'probe.json'}" in capsys.readouterr().out
    table = pd.DataFrame(x, columns=[f"pred_{i}" for i in range(12)])
    assert main(["predict", str(tmp_path / "probe.json"), _csv(table, tmp_path), "--out", str(tmp_path / "p.csv")]) == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "p.csv")["proba_1"], model.predict_proba(x)[:, 1], rtol=1e-9)


def _csv(table, tmp_path):
    path = tmp_path / "features.csv"
    table.to_csv(path, index=False)
    return str(path)


class _Malicious:
    """Runs os.system when unpickled, as a hostile model.pkl would."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, 5])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, capsys, protocol):
    marker = tmp_path / "pwned"
    pkl = _pickle(_Malicious(marker), tmp_path / "model.pkl", protocol)
    assert b"system" in pkl.read_bytes()
    assert main(["probe", "import", str(pkl), "--out", str(tmp_path / "probe.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert (
        f"refused to unpickle global {os.system.__module__}.system" in err[0]
        and "nothing of the file was run" in err[0]
    )
    assert not marker.exists()
    assert not (tmp_path / "probe.json").exists()


def test_global_after_allowed_objects_is_refused_before_any_of_them_is_built(tmp_path, monkeypatch):
    # a genuine model first, a hostile global after it: the checking pass refuses before the model is even built
    x, y = _data()
    built = []
    original = LogisticRegression.__setstate__

    def spy(self, state):
        built.append(True)
        return original(self, state)

    marker = tmp_path / "pwned"
    pkl = _pickle([LogisticRegression(max_iter=2000).fit(x, y), _Malicious(marker)], tmp_path / "model.pkl")
    monkeypatch.setattr(LogisticRegression, "__setstate__", spy)
    with pytest.raises(CheckpointError, match=r"refused to unpickle global .*\.system"):
        load_sklearn_pickle(pkl)
    assert built == [] and not marker.exists()


def test_unsupported_estimator_is_refused_by_name(tmp_path):
    x, y = _data()
    pkl = _pickle(RandomForestClassifier(n_estimators=3, random_state=0).fit(x, y), tmp_path / "model.pkl")
    with pytest.raises(
        CheckpointError, match=r"refused to unpickle global sklearn\.ensemble\._forest\.RandomForestClassifier"
    ):
        import_sklearn_probe(pkl, tmp_path / "probe.json")
    # an allowed class, but no classifier in it
    scaler = _pickle(StandardScaler().fit(x), tmp_path / "scaler.pkl")
    with pytest.raises(CheckpointError, match="holds StandardScaler; medfm imports a LogisticRegression"):
        import_sklearn_probe(scaler, tmp_path / "probe.json")
    # one-vs-rest multi-class (older scikit-learn's multi_class="ovr", as its pickles carry it) is not a softmax probe
    x3, y3 = _data(classes=3)
    older = LogisticRegression(max_iter=2000).fit(x3, y3)
    older.multi_class = "ovr"
    ovr = _pickle(older, tmp_path / "ovr.pkl")
    with pytest.raises(CheckpointError, match="one-vs-rest"):
        import_sklearn_probe(ovr, tmp_path / "probe.json")
    # not a pickle at all
    (tmp_path / "junk.pkl").write_bytes(b"\x00\x01not a pickle")
    with pytest.raises(CheckpointError, match="not a readable pickle"):
        import_sklearn_probe(tmp_path / "junk.pkl", tmp_path / "probe.json")
