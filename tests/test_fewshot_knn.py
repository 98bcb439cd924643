"""Few-shot episodes (prototype and logistic heads) and the cosine-weighted kNN probe."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits

from medfm.evaluate.fewshot import FewShot, run_fewshot
from medfm.evaluate.knn import KNNProbe, run_knn
from medfm.evaluate.metrics import score


def _clusters(
    n_per_class: int = 30, k: int = 3, d: int = 16, spread: float = 0.1, seed: int = 0, lengths: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Classes pointing in orthogonal directions (cosine-separable), each row with a random length unless told.

    Without random lengths and with few features the classes are also separable after standardising on a tiny
    support set, as the logistic head does (with many pure-noise features standardising 2 shots amplifies noise).
    """
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per_class)
    x = np.eye(k, d)[y] + spread * rng.normal(size=(len(y), d))
    if lengths:
        x *= rng.uniform(0.5, 5.0, size=(len(y), 1))
    return x, y


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small matrices: one BLAS thread is faster, and far faster when the CPUs are shared with other work."""
    with threadpool_limits(limits=1):
        yield


def _split(x: np.ndarray, y: np.ndarray, seed: int = 0):  # noqa: ANN202
    rng = np.random.default_rng(seed)
    test = rng.random(len(y)) < 0.3
    return x[~test], y[~test], x[test], y[test]


def _table(x: np.ndarray, y: np.ndarray, seed: int = 0) -> pd.DataFrame:
    table = pd.DataFrame(x, columns=[f"feat_{i}" for i in range(x.shape[1])])
    table["label"] = np.array(["a", "b", "c", "d", "e"])[y]
    test = np.random.default_rng(seed).random(len(y)) < 0.3
    table["split"] = np.where(test, "test", "train")
    return table


# -- few-shot ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["prototype", "logistic"])
def test_separated_clusters_give_accuracy_one(head):
    x, y = _clusters() if head == "prototype" else _clusters(d=3, lengths=False)
    summary = FewShot(ways=3, shots=2, episodes=20, head=head, seed=0).evaluate(*_split(x, y))
    assert summary.mean == 1.0
    assert summary.ci95 == 0.0
    assert (summary.head, summary.ways, summary.shots, summary.episodes) == (head, 3, 2, 20)
    assert str(summary).startswith(f"3-way 2-shot {head}: 1.000 ± 0.000 (n = 20 episodes")
    assert summary.to_dict()["mean"] == 1.0


def test_fewshot_is_seeded():
    x, y = _clusters(spread=0.6, seed=1)  # overlapping: accuracies vary between episodes
    data = _split(x, y)
    a = FewShot(ways=2, shots=1, episodes=40, seed=5).evaluate(*data)
    b = FewShot(ways=2, shots=1, episodes=40, seed=5).evaluate(*data)
    c = FewShot(ways=2, shots=1, episodes=40, seed=6).evaluate(*data)
    assert a == b
    assert a.mean != c.mean
    assert 0.5 < a.mean < 1.0
    assert a.ci95 > 0


def test_fewshot_episodes_and_ci_by_hand():
    x, y = _clusters(spread=0.6, seed=2)
    x_train, y_train, x_test, y_test = _split(x, y, seed=2)
    fewshot = FewShot(ways=2, shots=3, episodes=30, head="prototype", queries=4, seed=0)
    summary = fewshot.evaluate(x_train, y_train, x_test, y_test)
    episodes = fewshot.draw(y_train, y_test)
    assert len(episodes) == 30
    accuracies = []
    for classes, support, query in episodes:
        xs, ys, xq, yq = x_train[support], y_train[support], x_test[query], y_test[query]
        assert len(set(classes)) == 2 and len(set(support)) == len(support)
        assert sorted(np.unique(ys)) == sorted(classes)
        assert all(np.sum(ys == c) == 3 for c in classes)
        assert all(np.sum(yq == c) == 4 for c in classes)  # queries per class
        # prototype head by hand: nearest (cosine) normalised class mean of L2-normalised rows
        unit = xs / np.linalg.norm(xs, axis=1, keepdims=True)
        prototypes = np.stack([unit[ys == c].mean(axis=0) for c in classes])
        prototypes /= np.linalg.norm(prototypes, axis=1, keepdims=True)
        predicted = classes[np.argmax(xq @ prototypes.T, axis=1)]
        accuracies.append(np.mean(predicted == yq))
    accuracies = np.array(accuracies)
    np.testing.assert_array_equal(fewshot.accuracies_, accuracies)
    assert accuracies.std() > 0
    assert summary.mean == pytest.approx(accuracies.mean(), abs=1e-15)
    expected_ci = 1.96 * np.sqrt(np.sum((accuracies - accuracies.mean()) ** 2) / 29) / np.sqrt(30)
    assert summary.ci95 == pytest.approx(expected_ci, rel=1e-12)


def _anisotropic(n_per_class: int = 40, d: int = 30, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two classes told apart by one low-variance feature; the other features are loud noise. The nearest class
    mean (cosine or not) drowns in the noise; a standardised logistic regression finds the feature."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n_per_class)
    x = rng.normal(scale=10.0, size=(len(y), d)) + 30.0
    x[:, 0] = y + rng.normal(scale=0.15, size=len(y))
    return x, y


def _sklearn_logistic(xs, ys, xq, c):  # noqa: ANN001, ANN202
    """The reference: scikit-learn's StandardScaler + LogisticRegression, fit on the support set."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000, tol=1e-8))
    return model.fit(xs, ys).predict(xq)


def test_logistic_head_is_a_standardised_logistic_regression_with_given_c():
    x, y = _anisotropic(d=60, seed=1)  # 20 support rows, 60 features: fitted in the rows' span
    data = _split(x, y, seed=1)
    for c in (0.01, 1.0):
        fewshot = FewShot(ways=2, shots=10, episodes=15, head="logistic", seed=3, c=c)
        summary = fewshot.evaluate(*data)
        expected = [
            np.mean(_sklearn_logistic(data[0][s], data[1][s], data[2][q], c) == data[3][q])
            for _, s, q in fewshot.draw(data[1], data[3])
        ]
        np.testing.assert_array_equal(fewshot.accuracies_, expected)
        assert summary.c == f"{c:g} (given)"


def test_logistic_head_chooses_c_by_cv_inside_the_support_set():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medfm.evaluate.fewshot import C_GRID

    x, y = _anisotropic(d=12, seed=2)
    x_train, y_train, x_test, y_test = _split(x, y, seed=2)
    fewshot = FewShot(ways=2, shots=5, episodes=12, head="logistic", seed=4)
    summary = fewshot.evaluate(x_train, y_train, x_test, y_test)
    assert summary.c == "by 5-fold CV in the support set"
    expected, chosen = [], set()
    for _, s, q in fewshot.draw(y_train, y_test):
        search = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, tol=1e-8)),
            {"logisticregression__C": list(C_GRID)},
            cv=StratifiedKFold(n_splits=5),
            scoring="accuracy",
        ).fit(x_train[s], y_train[s])
        chosen.add(search.best_params_["logisticregression__C"])
        expected.append(np.mean(search.predict(x_test[q]) == y_test[q]))
    np.testing.assert_array_equal(fewshot.accuracies_, expected)
    assert len(chosen) > 1  # C is chosen per episode, not fixed


def test_the_two_heads_differ_where_they_should():
    x, y = _anisotropic(d=10, seed=3)
    data = _split(x, y, seed=3)
    prototype = FewShot(ways=2, shots=10, episodes=30, head="prototype", seed=0).evaluate(*data)
    logistic = FewShot(ways=2, shots=10, episodes=30, head="logistic", seed=0).evaluate(*data)
    assert prototype.mean < 0.6  # about chance: the class means differ mostly by noise
    assert logistic.mean > 0.9


def test_shots_curve_is_written(tmp_path, capsys):
    import json

    from medfm.cli import main

    x, y = _anisotropic(d=10, seed=4)
    table = _table(x, y, seed=4)
    summaries = run_fewshot(table, "label", shots=[1, 2, 5], episodes=8, out=tmp_path / "fs")
    assert [(s.shots, s.head) for s in summaries] == [(k, h) for k in (1, 2, 5) for h in ("prototype", "logistic")]
    rows = pd.read_csv(tmp_path / "fs" / "fewshot.csv")
    assert rows[["shots", "head"]].values.tolist() == [[s.shots, s.head] for s in summaries]
    np.testing.assert_allclose(rows["mean"], [s.mean for s in summaries])
    logistic = rows[rows["head"] == "logistic"]
    assert logistic["c"].tolist() == ["1 (1 shot: too few to cross-validate)"] + [
        f"by {k}-fold CV in the support set" for k in (2, 5)
    ]
    assert logistic["mean"].iloc[-1] > rows[rows["head"] == "prototype"]["mean"].iloc[-1] + 0.2
    report = json.loads((tmp_path / "fs" / "fewshot.json").read_text())
    assert report["n_query_pool"] == int((table["split"] == "test").sum())
    assert len(report["results"]) == 6
    assert (tmp_path / "fs" / "fewshot.png").stat().st_size > 1000
    path = tmp_path / "table.csv"
    table.to_csv(path, index=False)
    assert main(["fewshot", str(path), "--label", "label", "--shots", "2", "5", "--episodes", "4", "--C", "0.5"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and printed[3].startswith("2-way 5-shot logistic:") and "C 0.5 (given)" in printed[3]


def test_fewshot_one_episode_has_zero_ci():
    x, y = _clusters(spread=0.6, seed=3)
    summary = FewShot(ways=2, shots=2, episodes=1, seed=0).evaluate(*_split(x, y))
    assert summary.ci95 == 0.0


def test_fewshot_more_ways_than_classes_raises():
    x, y = _clusters(k=3)
    with pytest.raises(ValueError, match="only 3 classes.*4-way needs 4"):
        FewShot(ways=4, shots=2, episodes=5).evaluate(*_split(x, y))


def test_fewshot_classes_without_enough_shots_are_not_eligible():
    x, y = _clusters(n_per_class=30, k=3, seed=4)
    x_train, y_train, x_test, y_test = _split(x, y, seed=4)
    keep = (y_train != 2) | (np.cumsum(y_train == 2) <= 2)  # class 2 keeps 2 train rows
    with pytest.raises(ValueError, match="only 2 classes have ≥ 5 train"):
        FewShot(ways=3, shots=5, episodes=5).evaluate(x_train[keep], y_train[keep], x_test, y_test)
    # 2-way episodes still run, on the two eligible classes
    summary = FewShot(ways=2, shots=5, episodes=5).evaluate(x_train[keep], y_train[keep], x_test, y_test)
    assert summary.mean == 1.0


@pytest.mark.parametrize(
    "kwargs", [{"head": "svm"}, {"ways": 1}, {"shots": 0}, {"episodes": 0}], ids=["head", "ways", "shots", "episodes"]
)
def test_fewshot_invalid_arguments(kwargs):
    fewshot = FewShot(**kwargs)  # stored as given (scikit-learn's rule); refused when the episodes are drawn
    y = np.repeat([0, 1, 2], 6)
    with pytest.raises(ValueError, match="head=|need ways"):
        fewshot.evaluate(np.eye(18), y, np.eye(18), y)


def test_run_fewshot_on_a_table():
    x, y = _clusters(k=4, d=4, seed=5, lengths=False)
    summaries = run_fewshot(_table(x, y, seed=5), "label", ways=4, shots=3, episodes=10)
    assert [s.head for s in summaries] == ["prototype", "logistic"]
    assert [s.mean for s in summaries] == [1.0, 1.0]
    assert all(s.ways == 4 and s.shots == 3 and s.episodes == 10 for s in summaries)


# -- kNN -----------------------------------------------------------------------------------------------------
def test_knn_separated_clusters_accuracy_and_auc_one():
    x, y = _clusters(seed=6)
    x_train, y_train, x_test, y_test = _split(x, y, seed=6)
    knn = KNNProbe(k=5).fit(x_train, y_train)
    proba = knn.predict_proba(x_test)
    assert np.array_equal(knn.predict(x_test), y_test)
    assert score("roc_auc", y_test, proba, knn.classes_) == 1.0
    assert roc_auc_score(y_test, proba, multi_class="ovr") == 1.0


def test_run_knn_on_a_table():
    x, y = _clusters(k=2, seed=7)
    table = _table(x, y, seed=7)
    report = run_knn(table, "label", k=5, n_bootstrap=200)
    n_test = int((table["split"] == "test").sum())
    assert report["n_test"] == n_test
    assert report["n_train"] == len(table) - n_test
    assert report["k"] == 5 and report["temperature"] == 0.07 and report["label"] == "label"
    for name in ("accuracy", "balanced_accuracy", "roc_auc"):
        assert report["test"][name]["value"] == 1.0
        assert report["test"][name]["low"] == 1.0


def test_knn_proba_rows_sum_to_one_and_match_votes_by_hand():
    rng = np.random.default_rng(8)
    x_train, y_train = rng.normal(size=(40, 6)), rng.integers(0, 3, 40)
    x_test = rng.normal(size=(15, 6))
    knn = KNNProbe(k=4, temperature=0.5).fit(x_train, y_train)
    proba = knn.predict_proba(x_test)
    assert proba.shape == (15, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)  # noqa: E731
    sims = unit(x_test) @ unit(x_train).T
    expected = np.zeros((15, 3))
    for i in range(15):
        nearest = np.argsort(-sims[i])[:4]
        for j in nearest:
            expected[i, y_train[j]] += np.exp(sims[i, j] / 0.5)
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(proba, expected, rtol=1e-12)
    # chunking does not change anything
    np.testing.assert_allclose(
        KNNProbe(k=4, temperature=0.5, chunk=4).fit(x_train, y_train).predict_proba(x_test), proba
    )


def test_knn_k1_predicts_label_of_nearest_by_cosine():
    rng = np.random.default_rng(9)
    x_train = rng.normal(size=(50, 4)) * rng.uniform(0.1, 10.0, size=(50, 1))
    y_train = np.array([f"c{i}" for i in range(50)])  # every row its own class
    x_test = rng.normal(size=(40, 4)) * rng.uniform(0.1, 10.0, size=(40, 1))
    cosine = (x_test / np.linalg.norm(x_test, axis=1, keepdims=True)) @ (
        x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    ).T
    by_cosine = y_train[np.argmax(cosine, axis=1)]
    by_euclid = y_train[np.argmin(((x_test[:, None] - x_train[None]) ** 2).sum(axis=2), axis=1)]
    assert np.any(by_cosine != by_euclid)  # the test tells cosine from Euclidean
    knn = KNNProbe(k=1).fit(x_train, y_train)
    np.testing.assert_array_equal(knn.predict(x_test), by_cosine)
    proba = knn.predict_proba(x_test)
    assert set(np.unique(proba)) == {0.0, 1.0}  # one neighbour: all the vote on one class


def test_knn_k_larger_than_training_set():
    x, y = _clusters(n_per_class=3, k=2, seed=10)
    knn = KNNProbe(k=100).fit(x, y)
    proba = knn.predict_proba(x)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, atol=1e-12)
    assert np.array_equal(knn.predict(x), y)


@pytest.mark.parametrize("kwargs", [{"k": 0}, {"temperature": 0.0}, {"temperature": -1.0}])
def test_knn_invalid_arguments(kwargs):
    knn = KNNProbe(**kwargs)  # stored as given; refused when fitting
    with pytest.raises(ValueError, match="need k ≥ 1, temperature > 0"):
        knn.fit(np.eye(4), [0, 1, 0, 1])
