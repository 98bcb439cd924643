"""Weighted k-nearest-neighbour evaluation of frozen features, as SSL libraries report it."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from medfm.data.splits import holdout
from medfm.errors import ConfigError
from medfm.evaluate.features import read_labelled
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
) -> dict[str, object]:
    """kNN accuracy, balanced accuracy and AUC on the test rows (train = all other rows), with bootstrap CIs.
    Rows whose label is one of ``label_missing`` (default: 'NA', 'unknown', …) are left out and counted."""
    data = read_labelled(features, label, group, missing=label_missing)
    development, test = holdout(data.table, data.y, split_column, data.groups, test_size, seed)
    knn = KNNProbe(k, temperature).fit(data.x[development], data.y[development])
    proba = knn.predict_proba(data.x[test])
    groups = None if data.groups is None else data.groups[test]
    metrics = {
        m: bootstrap_ci(m, data.y[test], proba, knn.classes_, groups, n_bootstrap, seed=seed).to_dict()
        for m in ("accuracy", "balanced_accuracy", "roc_auc")
    }
    return {
        "label": label,
        "k": k,
        "temperature": temperature,
        "n_train": len(development),
        "n_test": len(test),
        "n_missing_labels": data.n_missing,
        "test": metrics,
    }
