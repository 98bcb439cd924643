"""Metrics of predictions and their uncertainty: AUC, AP, balanced accuracy, bootstrap CIs, DeLong.

Plain arrays in, numbers out; nothing here imports torch. ``proba`` is always (n, n_classes) with rows
summing to one; binary metrics read its last column.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.preprocessing import label_binarize

from medfm.errors import ConfigError

METRICS = ("roc_auc", "average_precision", "balanced_accuracy", "accuracy")


def check_metric(metric: str) -> str:
    """Return ``metric`` if known, else raise ValueError listing the allowed names."""
    if metric not in METRICS:
        raise ConfigError(f"scoring={metric!r} is not known; allowed {METRICS}")
    return metric


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties as half: scikit-learn's value, faster (probe_real.py)."""
    positive = np.ravel(positive).astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ConfigError("ROC AUC needs both classes in y")
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Average precision, Σ (R_k − R_k−1) P_k over the distinct score thresholds (scikit-learn's definition)."""
    positive = np.ravel(positive).astype(float)
    order = np.argsort(-np.asarray(scores, dtype=float), kind="mergesort")
    ranked, y = np.asarray(scores, dtype=float)[order], positive[order]
    if y.sum() == 0:
        return 0.0
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the end of each group of tied scores
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def score(metric: str, y: np.ndarray, proba: np.ndarray, classes: np.ndarray | None = None) -> float:
    """One metric of class probabilities; multi-class AUC is one-vs-rest macro, AP is macro mAP."""
    y = np.ravel(y)
    proba = np.asarray(proba, dtype=float)
    classes = np.arange(proba.shape[1]) if classes is None else np.asarray(classes)
    if metric in ("balanced_accuracy", "accuracy"):
        predicted = classes[np.argmax(proba, axis=1)]
        if metric == "accuracy":
            return float(np.mean(predicted == y))
        return float(np.mean([np.mean(predicted[y == c] == c) for c in np.unique(y)]))
    if len(classes) == 2:
        positive = (y == classes[1]).astype(int)
        fn = binary_auc if metric == "roc_auc" else binary_average_precision
        return fn(positive, proba[:, 1])
    onehot = label_binarize(y, classes=classes)
    present = onehot.sum(axis=0) > 0
    if metric == "roc_auc":
        return float(np.mean([roc_auc_score(onehot[:, k], proba[:, k]) for k in np.flatnonzero(present)]))
    return float(average_precision_score(onehot[:, present], proba[:, present], average="macro"))


# A CI whose resamples were dropped (a metric undefined there, e.g. one class only) above this share says so.
DROPPED_NOTE_SHARE = 0.05
# Below this many resampled units (rows, or groups when grouped) a bootstrap interval is not reported: it would look
# precise while saying nothing (one test row gives "0.130–0.130").
MIN_CI_N = 10


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap confidence interval (``n_dropped`` resamples had no value).

    ``n``: the units resampled (rows, or groups); ``no_ci``: why no interval is given (then ``low`` and ``high`` are
    NaN, and None in :meth:`to_dict`), e.g. too few units or one class only.
    """

    value: float
    low: float
    high: float
    level: float
    n_resamples: int
    n_dropped: int = 0
    n: int | None = None
    no_ci: str | None = None

    @property
    def dropped_note(self) -> str | None:
        """A warning when more than 5% of the resamples were dropped (the CI then leans on the rest), else None."""
        asked = self.n_resamples + self.n_dropped
        if not asked or self.n_dropped / asked <= DROPPED_NOTE_SHARE:
            return None
        return (
            f"{self.n_dropped} of {asked} resamples ({self.n_dropped / asked:.0%}) dropped: "
            "the metric is undefined there (e.g. one class only)"
        )

    def to_dict(self) -> dict[str, object]:
        """The interval as plain data (with ``dropped_note`` when more than 5% of resamples were dropped)."""
        data: dict[str, object] = {
            "value": self.value,
            "low": None if self.no_ci else self.low,
            "high": None if self.no_ci else self.high,
            "level": self.level,
            "n_resamples": self.n_resamples,
            "n_dropped": self.n_dropped,
        }
        if self.n is not None:
            data["n"] = self.n
        if self.no_ci:
            data["no_ci"] = self.no_ci
        if self.dropped_note:
            data["dropped_note"] = self.dropped_note
        return data

    def __str__(self) -> str:
        return interval_text(self.to_dict())


def interval_text(interval: Mapping[str, object], digits: int = 3, signed: bool = False) -> str:
    """``0.871 (95% CI 0.812–0.922, n = 80)``, or ``0.130 (n = 1: too few for an interval)``, from an interval's
    plain-data form (:meth:`Interval.to_dict`); ``signed`` writes differences as ``+0.051``."""
    fmt = f"{'+' if signed else ''}.{digits}f"
    value = f"{interval['value']:{fmt}}"
    n = interval.get("n")
    if interval.get("no_ci"):
        return f"{value} (no CI: {interval['no_ci']})"
    level = float(interval.get("level", 0.95))  # type: ignore[arg-type]
    sep = " to " if signed else "–"
    text = f"{value} ({level:.0%} CI {interval['low']:{fmt}}{sep}{interval['high']:{fmt}}"
    text += f", n = {n})" if n is not None else ")"
    return f"{text} [{interval['dropped_note']}]" if interval.get("dropped_note") else text


def _resample_indices(n: int, groups: np.ndarray | None, rng: np.random.Generator) -> np.ndarray:
    if groups is None:
        return rng.integers(0, n, size=n)
    unique, inverse = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inverse == g) for g in range(len(unique))]
    chosen = rng.integers(0, len(unique), size=len(unique))
    return np.concatenate([members[g] for g in chosen])


def bootstrap_values(
    fn: Callable[[np.ndarray], float],
    n: int,
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """``fn(indices)`` over seeded resamples of n rows (whole groups when given); NaN results are left out."""
    rng = np.random.default_rng(seed)
    values = (fn(_resample_indices(n, groups, rng)) for _ in range(n_resamples))
    return np.asarray([v for v in values if np.isfinite(v)], dtype=float)


def percentile_interval(
    value: float,
    values: np.ndarray,
    level: float = 0.95,
    n_requested: int | None = None,
    n: int | None = None,
    no_ci: str | None = None,
) -> Interval:
    """The percentile bootstrap interval of ``values`` around ``value``; ``n_requested`` counts the dropped ones.

    ``n``: the units that were resampled; below :data:`MIN_CI_N` (or with a reason ``no_ci``) no interval is given.
    """
    if no_ci is None and n is not None and n < MIN_CI_N:
        no_ci = f"n = {n} is too few for an interval (fewer than {MIN_CI_N})"
    if no_ci:
        return Interval(float(value), float("nan"), float("nan"), level, 0, 0, n, no_ci)
    alpha = (1 - level) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha]) if len(values) else (np.nan, np.nan)
    dropped = max(0, n_requested - len(values)) if n_requested is not None else 0
    return Interval(float(value), float(low), float(high), level, len(values), dropped, n)


def _units(y: np.ndarray, groups: np.ndarray | None) -> tuple[int, str | None]:
    """How many units a bootstrap resamples (groups when given), and why no interval applies, if so."""
    n = len(np.unique(groups)) if groups is not None else len(y)
    if n < MIN_CI_N:
        return n, f"n = {n} is too few for an interval (fewer than {MIN_CI_N})"
    if len(np.unique(y)) < 2:
        return n, f"the {len(y)} rows hold one class only"
    return n, None


def bootstrap_ci(
    metric: str,
    y: np.ndarray,
    proba: np.ndarray,
    classes: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap CI of a metric; resamples whole groups (patients) when ``groups`` is given."""
    y = np.asarray(y)

    def one(idx: np.ndarray) -> float:  # a resample with one class has no AUC: skipped, the usual convention
        return score(metric, y[idx], proba[idx], classes) if len(np.unique(y[idx])) > 1 else np.nan

    value = score(metric, y, proba, classes)
    n, no_ci = _units(y, groups)
    if no_ci or n < MIN_CI_N:
        return percentile_interval(value, np.empty(0), level, n_resamples, n, no_ci)
    values = bootstrap_values(one, len(y), groups, n_resamples, seed)
    return percentile_interval(value, values, level, n_resamples, n)


@dataclass(frozen=True)
class PairedBootstrap:
    """A paired bootstrap of metric(A) − metric(B): the CI of the difference and the two-sided p of no difference.

    When no resample falls on the other side of zero the p-value is only bounded: ``p_below`` is then True and
    ``p_value`` is that bound, 2/B for B kept resamples (the smallest non-zero value the two-sided estimate takes).
    """

    difference: Interval
    p_value: float
    p_below: bool

    @property
    def p_text(self) -> str:
        """``p = 0.034``, or ``p < 0.002`` when no resample fell on the other side."""
        if not np.isfinite(self.p_value):
            return "no p-value (no interval: " + (self.difference.no_ci or "no resample had a value") + ")"
        return f"p < {self.p_value:.2g}" if self.p_below else f"p = {self.p_value:.3g}"


def paired_bootstrap(
    metric: str,
    y: np.ndarray,
    proba_a: np.ndarray,
    proba_b: np.ndarray,
    classes: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> PairedBootstrap:
    """CI of metric(A) − metric(B) on the same resamples (whole groups when given), and its bootstrap p-value."""
    y = np.asarray(y)

    def diff(idx: np.ndarray) -> float:
        if len(np.unique(y[idx])) < 2:
            return np.nan
        return score(metric, y[idx], proba_a[idx], classes) - score(metric, y[idx], proba_b[idx], classes)

    point = score(metric, y, proba_a, classes) - score(metric, y, proba_b, classes)
    n, no_ci = _units(y, groups)
    if no_ci or n < MIN_CI_N:
        return PairedBootstrap(
            percentile_interval(point, np.empty(0), level, n_resamples, n, no_ci), float("nan"), False
        )
    diffs = bootstrap_values(diff, len(y), groups, n_resamples, seed)
    interval = percentile_interval(point, diffs, level, n_resamples, n)
    if not len(diffs):
        return PairedBootstrap(interval, float("nan"), False)
    p = min(1.0, 2 * min(np.mean(diffs <= 0), np.mean(diffs >= 0)))
    if p == 0:  # no resample on the other side of zero: the estimate is below its resolution, not zero
        return PairedBootstrap(interval, 2 / len(diffs), True)
    return PairedBootstrap(interval, float(p), False)


@dataclass(frozen=True)
class DeLong:
    """DeLong's test of two correlated ROC AUCs on the same cases."""

    auc_a: float
    auc_b: float
    z: float
    p_value: float
    ci_low: float
    ci_high: float

    def to_dict(self) -> dict[str, float]:
        """The test as plain data."""
        return dict(self.__dict__)


def _structural_components(positive: np.ndarray, negative: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    m, n = len(positive), len(negative)
    tx = stats.rankdata(positive)
    ty = stats.rankdata(negative)
    tz = stats.rankdata(np.concatenate([positive, negative]))
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v01 = (tz[:m] - tx) / n
    v10 = 1.0 - (tz[m:] - ty) / m
    return auc, v01, v10


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, level: float = 0.95) -> DeLong:
    """DeLong et al. (1988) test of AUC(A) = AUC(B) for binary labels (fast midrank form of Sun & Xu 2014)."""
    y = np.asarray(y).astype(bool)
    comps = [_structural_components(np.asarray(s)[y], np.asarray(s)[~y]) for s in (score_a, score_b)]
    aucs = np.array([c[0] for c in comps])
    v01 = np.stack([c[1] for c in comps])
    v10 = np.stack([c[2] for c in comps])
    cov = np.cov(v01) / y.sum() + np.cov(v10) / (~y).sum()
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    diff = aucs[0] - aucs[1]
    if var <= 0:
        return DeLong(float(aucs[0]), float(aucs[1]), 0.0, 1.0, float(diff), float(diff))
    z = diff / np.sqrt(var)
    half = stats.norm.ppf(0.5 + level / 2) * np.sqrt(var)
    return DeLong(
        float(aucs[0]),
        float(aucs[1]),
        float(z),
        float(2 * stats.norm.sf(abs(z))),
        float(diff - half),
        float(diff + half),
    )


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's C: among comparable pairs, the share where the earlier event has the higher risk (ties count ½).

    A pair is comparable when the shorter time is an event, and also when an event and a censoring fall at the
    same time (the censored subject outlived the event): the convention of lifelines and scikit-survival.
    Two events at the same time are not comparable. NaN when no pair is.
    """
    time, event, risk = (np.asarray(a, dtype=float) for a in (time, event, risk))
    concordant = comparable = 0.0
    for i in np.flatnonzero(event > 0):
        later = (time > time[i]) | ((time == time[i]) & (event <= 0))
        comparable += later.sum()
        concordant += (risk[i] > risk[later]).sum() + 0.5 * (risk[i] == risk[later]).sum()
    return float(concordant / comparable) if comparable else float("nan")
