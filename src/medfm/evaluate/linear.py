"""``LinearProbe``: standardise → logistic regression, its regularisation searched on validation folds.

Fast on wide features: with fewer samples than features, an L2-penalised linear model's weights lie in the
span of the training rows, so each fold is fitted on its rows' coordinates in that span (an n×n problem
instead of n×4096) with identical predictions; and every fit starts from the solution of the nearest
regularisation already fitted (warm start), so a 100-trial search costs little more than a few cold fits.
Saved probes are plain arrays (``.npz``) and JSON: no pickle.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from medfm.errors import CheckpointError, ConfigError
from medfm.evaluate.metrics import check_metric, score

SEARCHES = ("optuna", "grid")
# The SSL-transfer benchmark's grid: 45 log-spaced L2 strengths for L-BFGS logistic regression.
GRID_C = tuple(float(c) for c in np.logspace(-6, 5, 45))


@dataclass
class _Fold:
    """One search fold, standardised and projected onto the span of its training rows."""

    z_train: np.ndarray
    y_train: np.ndarray
    z_val: np.ndarray
    y_val: np.ndarray
    fitted: dict[float, tuple[np.ndarray, np.ndarray]]


def _standardise(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    return mean, scale


def _row_span(xs: np.ndarray) -> np.ndarray | None:
    """Orthonormal basis (d, r) of the rows' span, or None when there are more rows than features."""
    n, d = xs.shape
    if n >= d:
        return None
    _, s, vt = np.linalg.svd(xs, full_matrices=False)
    keep = s > s[0] * 1e-10 if len(s) else s > 0
    return vt[keep].T


class LinearProbe(ClassifierMixin, BaseEstimator):
    """Logistic-regression probe with standardisation and a searched L2 strength: a scikit-learn estimator.

    Parameters are stored as given and checked in :meth:`fit` (so ``clone``, ``cross_val_score`` and pipelines
    work); ``fit(x, y)`` without folds searches on ``cv`` stratified folds of its rows; methods that need a fitted
    probe raise ``NotFittedError`` before it. ``score`` is the probe's ``scoring`` metric (AUC by default), not
    accuracy.
    """

    def __init__(
        self,
        scoring: str = "roc_auc",
        search: str = "optuna",
        trials: int = 100,
        c_range: tuple[float, float] = (1e-6, 1e3),
        seed: int = 0,
        storage: str | None = None,
        study_name: str | None = None,
        max_iter: int = 2000,
        cv: int = 5,
    ) -> None:
        self.scoring = scoring
        self.search = search
        self.trials = trials
        self.c_range = c_range
        self.seed = seed
        self.storage = storage
        self.study_name = study_name
        self.max_iter = max_iter
        self.cv = cv

    def _check_params(self) -> None:
        """Refuse parameters outside what the probe allows (called by :meth:`fit`, as scikit-learn does)."""
        check_metric(self.scoring)
        if self.search not in SEARCHES:
            raise ConfigError(f"search={self.search!r}; allowed {SEARCHES}")
        if self.trials < 1:
            raise ConfigError(f"trials={self.trials}; give at least 1")
        if not 0 < self.c_range[0] < self.c_range[1]:
            raise ConfigError(f"c_range={self.c_range}; needs 0 < low < high")
        if self.cv < 2:
            raise ConfigError(f"cv={self.cv}; give at least 2 folds")

    def _default_folds(self, y: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """``cv`` stratified, seeded folds (fewer when the smallest class has fewer rows than ``cv``)."""
        smallest = int(np.min(np.unique(y, return_counts=True)[1]))
        if smallest < 2:
            raise ConfigError(f"a class has {smallest} row; the C search needs at least 2 rows of every class")
        splitter = StratifiedKFold(n_splits=min(self.cv, smallest), shuffle=True, random_state=self.seed)
        return list(splitter.split(np.zeros((len(y), 1)), y))

    # -- fitting ----------------------------------------------------------------------------------------------
    def _fit_one(self, z: np.ndarray, y: np.ndarray, c: float, start: tuple[np.ndarray, np.ndarray] | None):
        """Fit at strength ``c``, warm-started from ``start``; returns (coef, intercept)."""
        model = LogisticRegression(C=c, max_iter=self.max_iter, warm_start=start is not None, tol=1e-6)
        if start is not None:
            model.coef_, model.intercept_ = start[0].copy(), start[1].copy()
            model.classes_ = np.unique(y)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(z, y)
        self.n_iter_ = int(np.max(model.n_iter_))  # of the last fit: the refit on every row, once fitted
        return model.coef_.copy(), model.intercept_.copy()

    def _fold_score(self, fold: _Fold, c: float) -> float:
        nearest = min(fold.fitted, key=lambda k: abs(np.log(k) - np.log(c))) if fold.fitted else None
        coef, intercept = self._fit_one(fold.z_train, fold.y_train, c, fold.fitted.get(nearest))
        fold.fitted[c] = (coef, intercept)
        return score(self.scoring, fold.y_val, _probabilities(fold.z_val @ coef.T + intercept), self.classes_)

    def _objective(self, folds: list[_Fold], c: float) -> float:
        return float(np.mean([self._fold_score(f, c) for f in folds]))

    def fit(
        self,
        x: np.ndarray,
        y: np.ndarray,
        folds: list[tuple[np.ndarray, np.ndarray]] | None = None,
        progress: Callable[[], object] | None = None,
    ) -> LinearProbe:
        """Search C on ``folds`` (index pairs into ``x``; default ``cv`` stratified folds), then refit on every row
        of ``x`` with the best C."""
        self._check_params()
        x, y = validate_data(self, x, y, dtype=np.float64)
        check_classification_targets(y)
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ConfigError(f"the label has one class only ({self.classes_[0]!r}); a probe needs two or more")
        if folds is None:
            folds = self._default_folds(y)
        prepared = []
        for train, val in folds:
            mean, scale = _standardise(x[train])
            xs_train, xs_val = (x[train] - mean) / scale, (x[val] - mean) / scale
            basis = _row_span(xs_train)
            if basis is not None:
                xs_train, xs_val = xs_train @ basis, xs_val @ basis
            prepared.append(_Fold(xs_train, y[train], xs_val, y[val], {}))
        self.trials_: list[tuple[float, float]] = []
        if self.search == "grid":
            for c in GRID_C:
                self.trials_.append((c, self._objective(prepared, c)))
                if progress:
                    progress()
            self.best_c_ = max(self.trials_, key=lambda t: (t[1], -abs(np.log10(t[0]))))[0]
        else:
            self.best_c_ = self._optuna_search(prepared, progress)
        self._refit(x, y, self.best_c_)
        return self

    def _optuna_search(self, folds: list[_Fold], progress) -> float:  # noqa: ANN001
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        # Processes sharing a storage must not all propose the same first trials: each gets its own seed
        # (interleaved trials make such searches non-reproducible anyway).
        seed = self.seed if self.storage is None else self.seed + os.getpid()
        try:
            study = optuna.create_study(
                direction="maximize",
                sampler=optuna.samplers.TPESampler(seed=seed),
                storage=self.storage,
                study_name=self.study_name,
                load_if_exists=self.storage is not None,
            )
        except Exception as err:  # optuna and SQLAlchemy raise many kinds for a storage URL they cannot open
            if self.storage is None:
                raise
            raise ConfigError(
                f"--storage {self.storage}: cannot be opened ({_first_line(err)}); give an Optuna storage such as "
                "sqlite:///search.db or a journal file path"
            ) from None

        def objective(trial: optuna.Trial) -> float:
            c = trial.suggest_float("C", *self.c_range, log=True)
            value = self._objective(folds, c)
            self.trials_.append((c, value))
            return value

        callbacks = [lambda study, trial: progress()] if progress else None
        study.optimize(objective, n_trials=self.trials, callbacks=callbacks)
        return float(study.best_params["C"])

    def _refit(self, x: np.ndarray, y: np.ndarray, c: float) -> None:
        self.mean_, self.scale_ = _standardise(x)
        xs = (x - self.mean_) / self.scale_
        basis = _row_span(xs)
        coef, self.intercept_ = self._fit_one(xs if basis is None else xs @ basis, y, c, None)
        self.coef_ = coef if basis is None else coef @ basis.T  # back to the standardised feature space

    # -- predicting -------------------------------------------------------------------------------------------
    def _logits(self, x: np.ndarray) -> np.ndarray:
        check_is_fitted(self, "coef_")
        x = validate_data(self, x, dtype=np.float64, reset=False)
        return ((x - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_

    def decision_function(self, x: np.ndarray) -> np.ndarray:
        """Linear scores: (n,) for binary (of ``classes_[1]``), (n, K) for multi-class, as scikit-learn gives them."""
        logits = self._logits(x)
        return logits[:, 0] if logits.shape[1] == 1 else logits

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (n, n_classes), columns in the order of ``classes_``."""
        return _probabilities(self._logits(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The most probable class of each row."""
        check_is_fitted(self, "coef_")
        return self.classes_[np.argmax(self.predict_proba(x), axis=1)]

    def score(self, x: np.ndarray, y: np.ndarray) -> float:
        """The probe's ``scoring`` metric on (x, y)."""
        return score(self.scoring, np.asarray(y), self.predict_proba(x), self.classes_)

    # -- saving -------------------------------------------------------------------------------------------
    def save(
        self,
        path: str | os.PathLike[str],
        feature_columns: list[str] | None = None,
        imported_from: dict[str, object] | None = None,
        provenance: dict | None = None,
    ) -> Path:
        """Write ``path.npz`` (arrays) and ``path.json`` (everything else, with the feature columns and the
        ``provenance`` of the table it was fitted on: model, weight SHA-256, profile); no pickle anywhere.

        ``imported_from`` describes the file a probe was converted from (``medfm probe import``): it had no search.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path.with_suffix(".npz"), mean=self.mean_, scale=self.scale_, coef=self.coef_, intercept=self.intercept_
        )
        meta = {
            "kind": "medfm.LinearProbe",
            "classes": self.classes_.tolist(),
            "best_c": self.best_c_,
            "scoring": self.scoring,
            "search": None if imported_from else self.search,
            "feature_columns": feature_columns,
            "provenance": provenance,
        }
        if imported_from:
            meta["imported_from"] = imported_from
        path.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        return path.with_suffix(".json")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> tuple[LinearProbe, list[str] | None]:
        """Read a probe written by :meth:`save` (arrays loaded with ``allow_pickle=False``)."""
        path = Path(path)
        card, weights = path.with_suffix(".json"), path.with_suffix(".npz")
        try:
            meta = json.loads(card.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as err:
            raise CheckpointError(f"the probe file {card} is damaged or unreadable ({_first_line(err)})") from None
        if not isinstance(meta, dict) or meta.get("kind") != "medfm.LinearProbe":
            raise ConfigError(f"{card} is not a saved medfm probe")
        try:
            scoring, search, classes, best_c = meta["scoring"], meta["search"], meta["classes"], meta["best_c"]
        except KeyError as err:
            raise CheckpointError(f"the probe file {card} is damaged: it lacks {err}") from None
        try:
            # allow_pickle=False: an object array (a pickle, which could run code) is refused, never loaded
            with np.load(weights, allow_pickle=False) as arrays:
                probe = cls.from_arrays(
                    arrays["mean"], arrays["scale"], arrays["coef"], arrays["intercept"], classes, best_c
                )
        except ValueError as err:
            if "allow_pickle" in str(err):
                raise CheckpointError(
                    f"the probe file {weights} is damaged: it holds Python objects (a pickle) where a medfm probe "
                    "holds plain numbers; refused without loading them"
                ) from None
            raise CheckpointError(f"the probe file {weights} is damaged ({_first_line(err)})") from None
        except (OSError, EOFError, KeyError, zipfile.BadZipFile) as err:
            raise CheckpointError(f"the probe file {weights} is damaged ({_first_line(err)})") from None
        probe.scoring = scoring
        probe.search = search  # None for an imported probe
        probe.provenance_ = meta.get("provenance")
        return probe, meta.get("feature_columns")

    @classmethod
    def from_arrays(
        cls,
        mean: np.ndarray,
        scale: np.ndarray,
        coef: np.ndarray,
        intercept: np.ndarray,
        classes: object,
        best_c: float | None,
    ) -> LinearProbe:
        """A fitted probe from its arrays (a saved or an imported one): standardisation, weights, classes."""
        probe = cls()
        probe.mean_, probe.scale_ = np.asarray(mean, dtype=np.float64), np.asarray(scale, dtype=np.float64)
        probe.coef_, probe.intercept_ = np.asarray(coef, dtype=np.float64), np.asarray(intercept, dtype=np.float64)
        probe.classes_ = np.asarray(classes)
        probe.best_c_ = best_c
        probe.n_features_in_ = int(probe.coef_.shape[1])
        return probe


def _first_line(err: BaseException) -> str:
    """An exception's first line, or its type's name when it has no message."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _probabilities(logits: np.ndarray) -> np.ndarray:
    """Binary (n, 1) logits → (n, 2) probabilities; (n, K) → softmax."""
    if logits.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-logits[:, 0]))
        return np.c_[1.0 - p, p]
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)
