"""Few-shot evaluation: N-way K-shot episodes drawn from train, queried on test, mean ± 95% CI, per shot count.

Two heads, both reported:

- ``prototype``: nearest class mean by cosine on L2-normalised features (prototypical networks on frozen features);
- ``logistic``: the SSL-transfer benchmark's linear head — features standardised with the support set's mean and
  standard deviation (``StandardScaler`` fit on the support set), then L2-penalised logistic regression whose
  ``C`` is given, or chosen inside the support set by stratified K-fold cross-validation (K = min(5, shots)) over
  :data:`C_GRID`, the most regularised of equally accurate values winning. At 1 shot there is nothing to
  cross-validate and C is 1 unless given. Fitting happens in the span of the support rows (an n×n problem instead
  of n×4096; an L2-penalised linear model's weights lie in that span), which changes no prediction.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from medfm.data.splits import holdout
from medfm.errors import ConfigError
from medfm.evaluate.features import read_labelled

HEADS = ("prototype", "logistic")
C_GRID = tuple(float(c) for c in np.logspace(-3, 3, 7))
MAX_FOLDS = 5


@dataclass(frozen=True)
class EpisodeSummary:
    """Mean episode accuracy with its 95% confidence interval (1.96 standard errors over ``episodes``)."""

    head: str
    ways: int
    shots: int
    episodes: int
    mean: float
    ci95: float
    c: str = ""
    n_missing_labels: int = 0  # rows left out: their label was missing

    def to_dict(self) -> dict[str, object]:
        """The summary as plain data."""
        return dict(self.__dict__)

    def __str__(self) -> str:
        how = f"; C {self.c}" if self.c else ""
        return (
            f"{self.ways}-way {self.shots}-shot {self.head}: {self.mean:.3f} ± {self.ci95:.3f} "
            f"(n = {self.episodes} episodes{how})"
        )


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _coordinates(xs: np.ndarray, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Standardise both with the support rows' mean and standard deviation (``StandardScaler`` fit on ``xs``), then
    give both in an orthonormal basis of the span of the scaled support rows (from their n×n Gram matrix): an
    L2-penalised linear model's weights lie in that span, so fitting there changes no prediction."""
    scaler = StandardScaler().fit(xs)
    zs, zq = scaler.transform(xs), scaler.transform(xq)
    if len(zs) >= zs.shape[1]:
        return zs, zq
    eigenvalues, vectors = np.linalg.eigh(zs @ zs.T)
    keep = eigenvalues > max(eigenvalues.max(), 0.0) * 1e-12
    s, u = np.sqrt(eigenvalues[keep]), vectors[:, keep]
    return u * s, (zq @ zs.T) @ u / s


def _fit_path(z: np.ndarray, y: np.ndarray, grid: Sequence[float]) -> list[LogisticRegression]:
    """Logistic regressions at each C of ``grid`` (ascending), each warm-started from the one before."""
    fitted = []
    model = LogisticRegression(max_iter=1000, tol=1e-6, warm_start=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in grid:
            model.set_params(C=c).fit(z, y)
            fitted.append(copy.deepcopy(model))
    return fitted


def choose_c(xs: np.ndarray, ys: np.ndarray) -> float | None:
    """The C of :data:`C_GRID` with the best mean accuracy over stratified folds of the support set (scaler fit
    in each fold's training part; ties go to the smallest C), or None when a class has fewer than 2 examples."""
    folds = min(MAX_FOLDS, int(np.unique(ys, return_counts=True)[1].min()))
    if folds < 2:
        return None
    accuracy = np.zeros(len(C_GRID))
    for train, val in StratifiedKFold(n_splits=folds).split(xs, ys):
        z_train, z_val = _coordinates(xs[train], xs[val])
        for i, model in enumerate(_fit_path(z_train, ys[train], C_GRID)):
            accuracy[i] += np.mean(model.predict(z_val) == ys[val]) / folds
    return C_GRID[int(np.argmax(accuracy))]


def logistic_predict(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, c: float | None = None) -> np.ndarray:
    """The logistic head's predictions for ``xq``: standardised on the support set, C given or chosen by
    :func:`choose_c` (1 when the support set is too small to cross-validate)."""
    if c is None:
        c = choose_c(xs, ys) or 1.0
    z_support, z_query = _coordinates(xs, xq)
    return _fit_path(z_support, ys, [c])[0].predict(z_query)


def prototype_predict(xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The prototype head's predictions: the class whose L2-normalised mean is nearest by cosine."""
    xs, xq = _unit(xs), _unit(xq)
    prototypes = _unit(np.stack([xs[ys == c].mean(axis=0) for c in classes]))
    return classes[np.argmax(xq @ prototypes.T, axis=1)]


class FewShot(BaseEstimator):
    """Episodes of ``ways`` classes × ``shots`` support examples; prototype or logistic head (``c``: its C).

    A scikit-learn estimator in its parameters (``get_params``, ``clone``): they are stored as given and checked
    when the episodes are drawn. It evaluates rather than predicts, so it has no ``fit``/``predict``.
    """

    def __init__(
        self,
        ways: int = 2,
        shots: int = 5,
        episodes: int = 600,
        head: str = "prototype",
        queries: int | None = None,
        seed: int = 0,
        c: float | None = None,
    ) -> None:
        self.ways = ways
        self.shots = shots
        self.episodes = episodes
        self.head = head
        self.queries = queries
        self.seed = seed
        self.c = c

    def _check_params(self) -> None:
        """Refuse parameters outside what the episodes allow."""
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r}; allowed {HEADS}")
        if self.ways < 2 or self.shots < 1 or self.episodes < 1:
            raise ConfigError(f"need ways ≥ 2, shots ≥ 1, episodes ≥ 1; got {self.ways}, {self.shots}, {self.episodes}")
        if self.c is not None and not self.c > 0:
            raise ConfigError(f"C={self.c}; give a positive number")

    def draw(self, y_train: np.ndarray, y_test: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """The episodes: (classes, support rows of train, query rows of test), the same for a seed whatever the head."""
        self._check_params()
        y_train, y_test = np.asarray(y_train), np.asarray(y_test)
        eligible = [c for c in np.unique(y_train) if np.sum(y_train == c) >= self.shots and np.any(y_test == c)]
        if len(eligible) < self.ways:
            raise ConfigError(
                f"only {len(eligible)} classes have ≥ {self.shots} train and ≥ 1 test examples; {self.ways}-way needs {self.ways}"
            )
        rng = np.random.default_rng(self.seed)
        episodes = []
        for _ in range(self.episodes):
            classes = rng.choice(eligible, size=self.ways, replace=False)
            support = np.concatenate(
                [rng.choice(np.flatnonzero(y_train == c), self.shots, replace=False) for c in classes]
            )
            query = np.concatenate(
                [
                    q if self.queries is None or len(q) <= self.queries else rng.choice(q, self.queries, replace=False)
                    for q in (np.flatnonzero(y_test == c) for c in classes)
                ]
            )
            episodes.append((classes, support, query))
        return episodes

    def evaluate(
        self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
    ) -> EpisodeSummary:
        """Run the episodes; ``accuracies_`` keeps each episode's accuracy."""
        x_train, x_test = np.asarray(x_train, float), np.asarray(x_test, float)
        y_train, y_test = np.asarray(y_train), np.asarray(y_test)
        accuracies = []
        for classes, support, query in self.draw(y_train, y_test):
            xs, ys, xq = x_train[support], y_train[support], x_test[query]
            if self.head == "prototype":
                predicted = prototype_predict(xs, ys, xq, classes)
            else:
                predicted = logistic_predict(xs, ys, xq, self.c)
            accuracies.append(float(np.mean(predicted == y_test[query])))
        self.accuracies_ = acc = np.asarray(accuracies)
        ci = 1.96 * acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else 0.0
        how = ""
        if self.head == "logistic":
            if self.c is not None:
                how = f"{self.c:g} (given)"
            elif min(self.shots, MAX_FOLDS) >= 2:
                how = f"by {min(self.shots, MAX_FOLDS)}-fold CV in the support set"
            else:
                how = "1 (1 shot: too few to cross-validate)"
        return EpisodeSummary(self.head, self.ways, self.shots, self.episodes, float(acc.mean()), float(ci), how)


def run_fewshot(
    features: str | os.PathLike[str] | pd.DataFrame,
    label: str,
    ways: int = 2,
    shots: int | Sequence[int] = 5,
    episodes: int = 600,
    heads: tuple[str, ...] = HEADS,
    split_column: str | None = "split",
    group: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    c: float | None = None,
    out: str | os.PathLike[str] | None = None,
    label_missing: Sequence[str] | None = None,
) -> list[EpisodeSummary]:
    """Few-shot accuracy of each head at each shot count; support drawn from the non-test rows, queries from the
    test rows. ``out``: a folder for ``fewshot.json``, ``fewshot.csv`` (a row per shot count and head) and
    ``fewshot.png`` (accuracy against shots). Rows whose label is one of ``label_missing`` (default: 'NA',
    'unknown', …) are left out and counted."""
    counts = [shots] if isinstance(shots, int) else list(shots)
    if not counts:
        raise ConfigError("give at least one shot count")
    data = read_labelled(features, label, group, missing=label_missing)
    development, test = holdout(data.table, data.y, split_column, data.groups, test_size, seed)
    summaries = [
        replace(
            FewShot(ways, k, episodes, head, seed=seed, c=c).evaluate(
                data.x[development], data.y[development], data.x[test], data.y[test]
            ),
            n_missing_labels=data.n_missing,
        )
        for k in counts
        for head in heads
    ]
    if out is not None:
        write_fewshot(summaries, out, label, n_support_pool=int(len(development)), n_query_pool=int(len(test)))
    return summaries


def write_fewshot(
    summaries: list[EpisodeSummary], out: str | os.PathLike[str], label: str, n_support_pool: int, n_query_pool: int
) -> list[Path]:
    """Write the shots curve: JSON, CSV (a row per shot count and head) and a PNG of accuracy against shots."""
    from medfm.data.outputs import atomic_path, write_json, write_table

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    rows = pd.DataFrame([s.to_dict() for s in summaries])
    written = [
        write_json(
            {
                "label": label,
                "n_support_pool": n_support_pool,
                "n_query_pool": n_query_pool,
                "results": rows.to_dict(orient="records"),
            },
            folder / "fewshot.json",
        ),
        write_table(rows, folder / "fewshot.csv"),
    ]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for head, part in rows.groupby("head", sort=False):
        ax.errorbar(part["shots"], part["mean"], yerr=part["ci95"], marker="o", capsize=3, label=head)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("accuracy (mean ± 95% CI over episodes)")
    ax.set_ylim(0, 1)
    ax.set_xticks(sorted(rows["shots"].unique()))
    ways, episodes = int(rows["ways"].iloc[0]), int(rows["episodes"].iloc[0])
    ax.set_title(f"{label}: {ways}-way few-shot, {episodes} episodes per point")
    ax.legend()
    fig.tight_layout()
    with atomic_path(folder / "fewshot.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    written.append(folder / "fewshot.png")
    return written
