"""Read feature tables (from ``medfm extract`` or any Parquet/CSV with feature columns)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from medfm.data.manifest import read_table
from medfm.errors import ManifestError

PREFIXES = ("feat_", "pred_")


def feature_columns(table: pd.DataFrame, prefix: str | None = None) -> list[str]:
    """The feature columns of a table: ``prefix`` + number, by default ``feat_`` or else FMCIB's ``pred_``."""
    for p in (prefix,) if prefix else PREFIXES:
        columns = [c for c in table.columns if isinstance(c, str) and c.startswith(p) and c[len(p) :].isdigit()]
        if columns:
            return sorted(columns, key=lambda c: int(c[len(p) :]))
    tried = prefix or " or ".join(PREFIXES)
    raise ManifestError(f"no feature columns named {tried}<number>; columns are {list(table.columns)[:12]}...")


def read_features(
    path: str | os.PathLike[str] | pd.DataFrame, prefix: str | None = None
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """A feature table, its features as a float64 (n, d) array and the feature column names."""
    table = path if isinstance(path, pd.DataFrame) else read_table(path)
    columns = feature_columns(table, prefix)
    features = table[columns].to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise ManifestError(f"feature table {path}: row {bad[0]} has a missing or infinite feature ({len(bad)} rows)")
    return table, features, columns


@dataclass
class Labelled:
    """The labelled rows of a feature table: the rows, features, labels, groups and their source row numbers."""

    table: pd.DataFrame
    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None
    rows: np.ndarray
    columns: list[str]


def read_labelled(
    features: str | os.PathLike[str] | pd.DataFrame, label: str, group: str | None = None, prefix: str | None = None
) -> Labelled:
    """The rows of a feature table that have a label (others are left out), ready for a probe."""
    table, x, columns = read_features(features, prefix)
    for column in (label, group):
        if column and column not in table.columns:
            raise ManifestError(f"column {column!r} not found; columns are {list(table.columns)[:20]}")
    keep = table[label].notna().to_numpy()
    table = table[keep].reset_index(drop=True)
    values = table[label]
    if values.dtype.kind == "f" and np.all(np.mod(values.to_numpy(), 1) == 0):
        table[label] = values.astype(np.int64)  # a label column with gaps reads as float: 1.0 → 1
    groups = table[group].astype(str).to_numpy() if group else None
    return Labelled(table, x[keep], table[label].to_numpy(), groups, np.flatnonzero(keep), columns)
