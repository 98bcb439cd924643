"""Feature similarity as the SSL-transfer study measured invariance: cosine of mean-centred, covariance-whitened
(Mahalanobis) features, and plain cosine; averaged over images with a bootstrap confidence interval.

The whitening is estimated on the features of the original inputs. The covariance is shrunk towards a multiple
of the identity with the Ledoit–Wolf coefficient, ``(1 − α) S + α (tr S / d) I``, so it is invertible when there
are fewer images than feature dimensions; its inverse square root is applied in the span of the data (an n × n
problem, however wide the features).

With few images (n ≪ d) the Ledoit–Wolf coefficient is small, so directions in which the original images do not
vary at all are weighted strongly: a change there counts as a large change. The whitened similarity is then lower
than the plain one and is comparable only between models measured on the same images; ``shrinkage`` fixes α.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.covariance import ledoit_wolf_shrinkage

from medfm.errors import ConfigError
from medfm.evaluate.metrics import Interval, bootstrap_values, percentile_interval


@dataclass(frozen=True)
class Whitener:
    """``x ↦ Σ^{-1/2} (x − μ)`` for the Ledoit–Wolf shrunk covariance Σ, stored by its eigenvectors in the span."""

    mean: np.ndarray
    basis: np.ndarray  # (d, k) orthonormal eigenvectors of the sample covariance with non-zero eigenvalues
    scales: np.ndarray  # (k,) Σ^{-1/2} on the basis
    rest: float  # Σ^{-1/2} on the orthogonal complement
    shrinkage: float

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Whitened, centred rows of ``x`` (n, d)."""
        centred = np.asarray(x, dtype=np.float64) - self.mean
        coords = centred @ self.basis
        return (coords * self.scales) @ self.basis.T + self.rest * (centred - coords @ self.basis.T)


def fit_whitener(features: np.ndarray, shrinkage: float | None = None) -> Whitener:
    """Estimate the whitening on original features (n ≥ 2 rows, not all equal); ``shrinkage`` fixes α in [0, 1]
    instead of the Ledoit–Wolf estimate."""
    x = np.asarray(features, dtype=np.float64)
    n, d = x.shape
    if n < 2:
        raise ConfigError(f"whitening needs at least 2 images, got {n}")
    mean = x.mean(axis=0)
    centred = x - mean
    _, singular, vt = np.linalg.svd(centred / np.sqrt(n), full_matrices=False)
    eig = singular**2  # eigenvalues of S = centred.T @ centred / n
    nu = float(eig.sum() / d)
    if nu <= 1e-20:
        raise ConfigError("all original features are equal; there is no covariance to whiten with")
    if shrinkage is not None and not 0 <= shrinkage <= 1:
        raise ConfigError(f"shrinkage={shrinkage}; must lie in [0, 1]")
    if shrinkage is not None:
        alpha = float(shrinkage)
    else:
        alpha = float(ledoit_wolf_shrinkage(centred, assume_centered=True)) if d > 1 else 0.0
    keep = eig > eig.max() * 1e-12
    shrunk = (1 - alpha) * eig[keep] + alpha * nu
    floor = alpha * nu if alpha > 0 else shrunk.min()  # α = 0 (many images): the complement is left unscaled
    return Whitener(mean, vt[keep].T, 1 / np.sqrt(shrunk), float(1 / np.sqrt(floor)), alpha)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows; a zero row against anything gives 0 (no direction)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.sum(a * b, axis=1)
    return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


def similarities(original: np.ndarray, other: np.ndarray, whitener: Whitener | None) -> dict[str, np.ndarray]:
    """Per-row ``mahalanobis`` (whitened cosine; NaN without a whitener) and ``cosine`` similarity."""
    plain = cosine_rows(original, other)
    if whitener is None:
        return {"mahalanobis": np.full(len(plain), np.nan), "cosine": plain}
    return {"mahalanobis": cosine_rows(whitener(original), whitener(other)), "cosine": plain}


def mean_interval(values: np.ndarray, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> Interval:
    """Mean of per-image values with a percentile bootstrap CI over images (NaN when there are none; no interval,
    with the reason, below :data:`~medfm.evaluate.metrics.MIN_CI_N` images)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return Interval(float("nan"), float("nan"), float("nan"), level, 0)
    resampled = bootstrap_values(lambda idx: float(values[idx].mean()), len(values), None, n_resamples, seed)
    return percentile_interval(float(values.mean()), resampled, level, n=len(values))
