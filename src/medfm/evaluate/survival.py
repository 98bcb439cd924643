"""Survival probes: a ridge-penalised Cox model on features, Harrell's C-index and the "alive at T" AUC.

The penalty makes the weights lie in the span of the training rows (as for the linear probe), so the fit
runs on an n×n problem; the partial likelihood uses Breslow's handling of tied times.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.optimize import minimize
from sklearn.base import BaseEstimator
from sklearn.metrics import roc_auc_score
from sklearn.utils import check_consistent_length, column_or_1d
from sklearn.utils.validation import check_is_fitted, validate_data

from medfm.data.manifest import check_number_column
from medfm.data.outputs import write_json, write_table
from medfm.data.splits import make_splits
from medfm.errors import ConfigError, ManifestError
from medfm.evaluate.features import read_labelled, table_source
from medfm.evaluate.linear import _row_span, _standardise
from medfm.evaluate.metrics import bootstrap_values, concordance_index, percentile_interval

ALPHAS = tuple(float(a) for a in np.logspace(-2, 4, 13))


def _neg_log_partial_likelihood(eta: np.ndarray, time: np.ndarray, event: np.ndarray) -> tuple[float, np.ndarray]:
    """Breslow negative log partial likelihood of linear predictors ``eta`` and its gradient."""
    order = np.argsort(-time, kind="stable")
    t, d, e = time[order], event[order], eta[order]
    shift = e.max()
    w = np.exp(e - shift)
    cum = np.cumsum(w)
    # Everyone tied with i is at risk at t_i: take the risk sum at the last member of each tie group.
    last = np.searchsorted(-t, -t, side="right") - 1
    risk_sum = cum[last]
    loss = -np.sum(d * (e - shift - np.log(risk_sum)))
    # d/d eta_k = -d_k + w_k * sum over events i with t_i <= t_k of 1 / risk_sum_i
    inv = d / risk_sum
    first = np.searchsorted(-t, -t, side="left")  # first index of each tie group (times descending)
    tail = np.cumsum(inv[::-1])[::-1]  # sum over positions >= k, i.e. times <= t_k
    grad_sorted = -d + w * tail[first]
    grad = np.empty_like(grad_sorted)
    grad[order] = grad_sorted
    return float(loss), grad


class CoxProbe(BaseEstimator):
    """Standardise → ridge-penalised Cox regression (penalty ``alpha/2·‖w‖²``): a scikit-learn estimator whose
    ``fit`` takes (features, times, events) rather than (X, y); ``alpha`` is checked in :meth:`fit`."""

    def __init__(self, alpha: float = 1.0) -> None:
        self.alpha = alpha

    def fit(self, x: np.ndarray, time: np.ndarray, event: np.ndarray) -> CoxProbe:
        """Fit on features, follow-up times and event indicators (1 = event, 0 = censored)."""
        if not self.alpha > 0:
            raise ConfigError(f"alpha={self.alpha}; the ridge penalty must be positive")
        x = validate_data(self, x, dtype=np.float64)
        time, event = column_or_1d(time, dtype=float), column_or_1d(event, dtype=float)
        check_consistent_length(x, time, event)
        if not (np.all(np.isfinite(time)) and np.all(np.isfinite(event))):
            raise ConfigError("follow-up times and events must be finite numbers")
        if event.sum() == 0:
            raise ConfigError("no events among the training rows: a Cox model cannot be fitted")
        self.mean_, self.scale_ = _standardise(x)
        xs = (x - self.mean_) / self.scale_
        basis = _row_span(xs)
        z = xs if basis is None else xs @ basis

        def objective(beta: np.ndarray) -> tuple[float, np.ndarray]:
            loss, grad_eta = _neg_log_partial_likelihood(z @ beta, time, event)
            return loss + 0.5 * self.alpha * beta @ beta, z.T @ grad_eta + self.alpha * beta

        result = minimize(objective, np.zeros(z.shape[1]), jac=True, method="L-BFGS-B", options={"maxiter": 500})
        self.coef_ = result.x if basis is None else basis @ result.x
        return self

    def risk(self, x: np.ndarray) -> np.ndarray:
        """Linear risk scores (higher = earlier event)."""
        check_is_fitted(self, "coef_")
        return ((validate_data(self, x, dtype=np.float64, reset=False) - self.mean_) / self.scale_) @ self.coef_


def alive_at_labels(time: np.ndarray, event: np.ndarray, horizon: float) -> tuple[np.ndarray, np.ndarray]:
    """(mask, died): rows known to have died by ``horizon`` (1) or lived past it (0); censored earlier are left out."""
    died = (event > 0) & (time <= horizon)
    known = died | (time > horizon)
    return known, died[known].astype(int)


def run_survival(
    features: str | os.PathLike[str] | pd.DataFrame,
    time_column: str,
    event_column: str,
    out_dir: str | os.PathLike[str],
    horizon: float | None = None,
    split_column: str | None = "split",
    cv: int | None = None,
    group: str | None = None,
    test_size: float = 0.2,
    n_bootstrap: int = 1000,
    seed: int = 0,
    feature_prefix: str | None = None,
    label_missing: Sequence[str] | None = None,
) -> dict[str, object]:
    """Search the Cox penalty on validation C-index, refit on train+val, report test C-index (and AUC at T) with CIs."""
    # rows without an event value (empty, or one of label_missing: 'NA', 'unknown', …) are left out
    data = read_labelled(features, event_column, group, feature_prefix, split_column, missing=label_missing)
    if time_column not in data.table.columns:
        raise ManifestError(f"column {time_column!r} not found; columns are {list(data.table.columns)[:20]}")
    timed = data.table[time_column].notna().to_numpy()
    table, x, rows = data.table[timed].reset_index(drop=True), data.x[timed], data.rows[timed]
    source = table_source(features)
    for column in (time_column, event_column):  # name the row of a '0,640' rather than numpy's float error
        check_number_column(pd.Series(table[column].to_numpy(), index=rows), column, source)
    time = table[time_column].to_numpy(dtype=float)
    event = table[event_column].to_numpy(dtype=float)
    groups = None if data.groups is None else data.groups[timed]
    splits = make_splits(table, event.astype(int), split_column, cv, groups, test_size, seed)
    search = []
    for alpha in ALPHAS:
        scores = [
            concordance_index(time[b], event[b], CoxProbe(alpha).fit(x[a], time[a], event[a]).risk(x[b]))
            for a, b in splits.folds
        ]
        search.append((alpha, float(np.nanmean(scores))))
    best = max(search, key=lambda s: s[1])[0]
    dev, test = splits.development, splits.test
    model = CoxProbe(best).fit(x[dev], time[dev], event[dev])
    risk = model.risk(x[test])
    t, e = time[test], event[test]
    g = None if groups is None else groups[test]
    c_values = bootstrap_values(lambda i: concordance_index(t[i], e[i], risk[i]), len(t), g, n_bootstrap, seed)
    report: dict[str, object] = {
        "time": time_column,
        "event": event_column,
        "best_alpha": best,
        "search": search,
        "how": splits.how,
        "n_development": len(dev),
        "n_test": len(test),
        "events_test": int(e.sum()),
        "test": {
            "c_index": percentile_interval(concordance_index(t, e, risk), c_values, n_requested=n_bootstrap).to_dict()
        },
    }
    if horizon is not None:
        known, died = alive_at_labels(t, e, horizon)
        if 0 < died.sum() < len(died):
            r = risk[known]
            auc = float(roc_auc_score(died, r))

            def auc_of(i: np.ndarray) -> float:
                return float(roc_auc_score(died[i], r[i])) if 0 < died[i].sum() < len(i) else float("nan")

            values = bootstrap_values(auc_of, len(died), None if g is None else g[known], n_bootstrap, seed)
            report["test"][f"auc_died_by_{horizon:g}"] = percentile_interval(
                auc, values, n_requested=n_bootstrap
            ).to_dict()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_table(
        pd.DataFrame({"row": rows[test], time_column: t, event_column: e, "risk": risk}),
        out / "predictions.csv",
    )
    write_json(report, out / "results.json")
    return report
