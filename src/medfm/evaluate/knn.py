"""Weighted k-nearest-neighbour evaluation of frozen features, as SSL libraries report it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from medfm.data.outputs import write_json, write_table
from medfm.data.splits import holdout
from medfm.errors import ConfigError
from medfm.evaluate.features import Labelled, read_labelled
from medfm.evaluate.figures import Scores, describe_features, roc_pr_figures
from medfm.evaluate.metrics import bootstrap_ci


class KNNProbe(ClassifierMixin, BaseEstimator):
    """Cosine similarity, the k nearest training rows vote with weight exp(similarity / temperature).

    A scikit-learn estimator: parameters are stored as given and checked in :meth:`fit`.
    """

    def __init__(self, k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> None:
        self.k = k
        self.temperature = temperature
        self.chunk = chunk

    def fit(self, x: np.ndarray, y: np.ndarray) -> KNNProbe:
        """Remember the L2-normalised training features and their labels."""
        if self.k < 1 or self.temperature <= 0 or self.chunk < 1:
            raise ConfigError(
                f"need k ≥ 1, temperature > 0 and chunk ≥ 1; got k={self.k}, temperature={self.temperature}, "
                f"chunk={self.chunk}"
            )
        x, y = validate_data(self, x, y, dtype=np.float64)
        check_classification_targets(y)
        self.x_ = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        self.classes_, self.y_ = np.unique(y, return_inverse=True)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Normalised class votes (n, n_classes)."""
        check_is_fitted(self, "x_")
        x = validate_data(self, x, dtype=np.float64, reset=False)
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        k = min(self.k, len(self.x_))
        out = np.zeros((len(x), len(self.classes_)))
        for start in range(0, len(x), self.chunk):
            sims = x[start : start + self.chunk] @ self.x_.T
            nearest = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            weights = np.exp(np.take_along_axis(sims, nearest, axis=1) / self.temperature)
            votes = out[start : start + self.chunk]
            np.add.at(votes, (np.arange(len(votes))[:, None], self.y_[nearest]), weights)
        return out / out.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The class with the largest weighted vote."""
        check_is_fitted(self, "x_")
        return self.classes_[np.argmax(self.predict_proba(x), axis=1)]


def run_knn(
    features: str | os.PathLike[str] | pd.DataFrame,
    label: str,
    k: int = 20,
    temperature: float = 0.07,
    split_column: str | None = "split",
    group: str | None = None,
    test_size: float = 0.2,
    n_bootstrap: int = 1000,
    seed: int = 0,
    label_missing: Sequence[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    figure_format: str = "png",
) -> dict[str, object]:
    """kNN accuracy, balanced accuracy and AUC on the test rows (train = all other rows), with bootstrap CIs.
    Rows whose label is one of ``label_missing`` (default: 'NA', 'unknown', …) are left out and counted.
    With ``out_dir``: ``knn.json`` (this report), ``predictions.csv`` (the test rows' columns and class
    probabilities) and ROC/PR figures."""
    data = read_labelled(features, label, group, missing=label_missing)
    development, test = holdout(data.table, data.y, split_column, data.groups, test_size, seed)
    knn = KNNProbe(k, temperature).fit(data.x[development], data.y[development])
    proba = knn.predict_proba(data.x[test])
    groups = None if data.groups is None else data.groups[test]
    metrics = {
        m: bootstrap_ci(m, data.y[test], proba, knn.classes_, groups, n_bootstrap, seed=seed).to_dict()
        for m in ("accuracy", "balanced_accuracy", "roc_auc")
    }
    report: dict[str, object] = {
        "label": label,
        "k": k,
        "temperature": temperature,
        "n_train": len(development),
        "n_test": len(test),
        "n_missing_labels": data.n_missing,
        "test": metrics,
    }
    if out_dir is not None:
        _write_outputs(report, features, data, test, proba, knn.classes_, Path(out_dir), figure_format)
    return report


def _write_outputs(
    report: dict[str, object],
    features: str | os.PathLike[str] | pd.DataFrame,
    data: Labelled,
    test: np.ndarray,
    proba: np.ndarray,
    classes: np.ndarray,
    out: Path,
    figure_format: str,
) -> None:
    """knn.json, predictions.csv and the ROC/PR figures of one kNN evaluation."""
    out.mkdir(parents=True, exist_ok=True)
    label = str(report["label"])
    kept = [c for c in data.table.columns if c not in set(data.columns) | {label}]
    predictions = pd.DataFrame({"row": data.rows[test], label: data.y[test]})
    predictions = pd.concat([predictions, data.table.iloc[test][kept].reset_index(drop=True)], axis=1)
    for k, c in enumerate(classes):
        predictions[f"proba_{c}"] = proba[:, k]
    predictions["predicted"] = classes[np.argmax(proba, axis=1)]
    write_table(predictions, out / "predictions.csv")
    model, dataset = describe_features(features)
    positives = classes[1:] if len(classes) == 2 else classes
    curves = [
        Scores(str(c) if len(positives) > 1 else f"{model}, kNN k={report['k']}", (data.y[test] == c).astype(int),
               proba[:, list(classes).index(c)])
        for c in positives
    ]  # fmt: skip
    what = f"{label} = {positives[0]}" if len(positives) == 1 else f"{label}, one class against the rest"
    roc_pr_figures(curves, f"{model} on {dataset}: {what}; test split, n = {len(test)}", out, figure_format)
    write_json(report, out / "knn.json")
