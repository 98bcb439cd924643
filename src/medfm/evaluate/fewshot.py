"""Few-shot evaluation: N-way K-shot episodes drawn from train, queried on test, mean ± 95% CI."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression

from medfm.data.splits import holdout
from medfm.errors import ConfigError
from medfm.evaluate.features import read_labelled

HEADS = ("prototype", "logistic")


@dataclass(frozen=True)
class EpisodeSummary:
    """Mean episode accuracy with its 95% confidence interval (1.96 standard errors)."""

    head: str
    ways: int
    shots: int
    episodes: int
    mean: float
    ci95: float

    def to_dict(self) -> dict[str, object]:
        """The summary as plain data."""
        return dict(self.__dict__)

    def __str__(self) -> str:
        return f"{self.ways}-way {self.shots}-shot {self.head}: {self.mean:.3f} ± {self.ci95:.3f} ({self.episodes} episodes)"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class FewShot:
    """Episodes of ``ways`` classes × ``shots`` support examples; prototype (nearest class mean) or logistic head."""

    def __init__(
        self,
        ways: int = 2,
        shots: int = 5,
        episodes: int = 600,
        head: str = "prototype",
        queries: int | None = None,
        seed: int = 0,
    ) -> None:
        if head not in HEADS:
            raise ConfigError(f"head={head!r}; allowed {HEADS}")
        if ways < 2 or shots < 1 or episodes < 1:
            raise ConfigError(f"need ways ≥ 2, shots ≥ 1, episodes ≥ 1; got {ways}, {shots}, {episodes}")
        self.ways, self.shots, self.episodes, self.head, self.queries, self.seed = (
            ways,
            shots,
            episodes,
            head,
            queries,
            seed,
        )

    def evaluate(
        self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray
    ) -> EpisodeSummary:
        """Run the episodes; features are L2-normalised, as is usual for few-shot heads on frozen features."""
        x_train, x_test = _unit(np.asarray(x_train, float)), _unit(np.asarray(x_test, float))
        y_train, y_test = np.asarray(y_train), np.asarray(y_test)
        eligible = [c for c in np.unique(y_train) if np.sum(y_train == c) >= self.shots and np.any(y_test == c)]
        if len(eligible) < self.ways:
            raise ConfigError(
                f"only {len(eligible)} classes have ≥ {self.shots} train and ≥ 1 test examples; {self.ways}-way needs {self.ways}"
            )
        rng = np.random.default_rng(self.seed)
        accuracies = []
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
            accuracies.append(self._episode(x_train[support], y_train[support], x_test[query], y_test[query], classes))
        acc = np.asarray(accuracies)
        ci = 1.96 * acc.std(ddof=1) / np.sqrt(len(acc)) if len(acc) > 1 else 0.0
        return EpisodeSummary(self.head, self.ways, self.shots, self.episodes, float(acc.mean()), float(ci))

    def _episode(self, xs: np.ndarray, ys: np.ndarray, xq: np.ndarray, yq: np.ndarray, classes: np.ndarray) -> float:
        if self.head == "prototype":
            prototypes = _unit(np.stack([xs[ys == c].mean(axis=0) for c in classes]))
            predicted = classes[np.argmax(xq @ prototypes.T, axis=1)]
        else:
            predicted = LogisticRegression(C=1.0, max_iter=1000).fit(xs, ys).predict(xq)
        return float(np.mean(predicted == yq))


def run_fewshot(
    features: str | os.PathLike[str] | pd.DataFrame,
    label: str,
    ways: int = 2,
    shots: int = 5,
    episodes: int = 600,
    heads: tuple[str, ...] = HEADS,
    split_column: str | None = "split",
    group: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
) -> list[EpisodeSummary]:
    """Few-shot accuracy of each head; support drawn from the non-test rows, queries from the test rows."""
    data = read_labelled(features, label, group)
    development, test = holdout(data.table, data.y, split_column, data.groups, test_size, seed)
    return [
        FewShot(ways, shots, episodes, head, seed=seed).evaluate(
            data.x[development], data.y[development], data.x[test], data.y[test]
        )
        for head in heads
    ]
