"""Read feature tables (from ``medfm extract`` or any Parquet/CSV with feature columns), and FMCIB's folder of them.

FMCIB's ``run.py`` layout is a folder with ``train_features.csv``, ``val_features.csv`` and ``test_features.csv``
whose feature columns are ``pred_<i>`` (or ``feature_<i>``): the split of a row is the file it is in.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.labels import check_classes, clean_labels
from medfm.data.manifest import check_number_column, read_table
from medfm.data.outputs import read_sidecar, write_table
from medfm.data.splits import SPLIT_NAMES
from medfm.errors import ManifestError

PREFIXES = ("feat_", "pred_", "feature_")
PROVENANCE_KEYS = ("model", "weights_sha256", "random_init_seed", "profile")
# FMCIB's run.py layout: one CSV per split, in this order
FMCIB_FILES = {"train": "train_features.csv", "val": "val_features.csv", "test": "test_features.csv"}
FMCIB_PREFIXES = ("pred_", "feature_")


def read_fmcib_layout(folder: str | os.PathLike[str], split_column: str = "split") -> pd.DataFrame:
    """FMCIB's folder of split CSVs as one table (train, val, test rows in turn); ``split_column`` says the file."""
    folder = Path(folder)
    for name in (FMCIB_FILES["train"], FMCIB_FILES["test"]):  # val_features.csv may be absent
        if not (folder / name).is_file():
            raise ManifestError(
                f"{folder}: FMCIB's layout needs {name} (found {sorted(p.name for p in folder.glob('*.csv'))})"
            )
    parts = []
    for split, name in FMCIB_FILES.items():
        path = folder / name
        if not path.is_file():
            continue
        table = read_table(path)
        if split_column in table.columns:  # a split column of its own must agree with the file
            names = table[split_column].astype(str).str.strip().str.lower().map(SPLIT_NAMES)
            wrong = np.flatnonzero((names != split).to_numpy())
            if len(wrong):
                raise ManifestError(
                    f"{path} row {wrong[0]}: column {split_column} says {table[split_column].iloc[wrong[0]]!r}, "
                    f"the file says {split}"
                )
        table[split_column] = split
        parts.append(table)
    columns = [list(p.columns) for p in parts]
    if any(c != columns[0] for c in columns):
        raise ManifestError(f"{folder}: the split files have different columns")
    return pd.concat(parts, ignore_index=True)


def fmcib_splits(table: pd.DataFrame, split_column: str = "split") -> pd.Series:
    """Each row's split (train, val or test) for FMCIB's layout; a missing column or another value is refused."""
    if split_column not in table.columns:
        raise ManifestError(
            f"column {split_column!r} not found: FMCIB's layout needs each row's split (train/val/test)"
        )
    names = table[split_column].astype(str).str.strip().str.lower().map(SPLIT_NAMES)
    if names.isna().any():
        bad = int(np.flatnonzero(names.isna().to_numpy())[0])
        raise ManifestError(
            f"row {bad}: column {split_column} has value {table[split_column].iloc[bad]!r}; allowed train, val, test"
        )
    return names


def write_fmcib_layout(
    table: str | os.PathLike[str] | pd.DataFrame, folder: str | os.PathLike[str], split_column: str = "split"
) -> list[Path]:
    """Write a feature table as FMCIB's folder: one CSV per split in ``split_column`` (all three, even if empty)."""
    table = table if isinstance(table, pd.DataFrame) else read_table(table)
    names = fmcib_splits(table, split_column)
    if not any(str(c).startswith(FMCIB_PREFIXES) for c in table.columns):
        raise ManifestError(
            f"FMCIB's layout has feature columns named {' or '.join(FMCIB_PREFIXES)}<i>; extract with --column-prefix pred_"
        )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_table(table[(names == split).to_numpy()], folder / name) for split, name in FMCIB_FILES.items()]


def feature_columns(table: pd.DataFrame, prefix: str | None = None) -> list[str]:
    """The feature columns of a table: ``prefix`` + number, by default ``feat_`` or else FMCIB's ``pred_``."""
    for p in (prefix,) if prefix else PREFIXES:
        columns = [c for c in table.columns if isinstance(c, str) and c.startswith(p) and c[len(p) :].isdigit()]
        if columns:
            return sorted(columns, key=lambda c: int(c[len(p) :]))
    tried = prefix or " or ".join(PREFIXES)
    raise ManifestError(f"no feature columns named {tried}<number>; columns are {list(table.columns)[:12]}...")


def table_provenance(path: str | os.PathLike[str] | pd.DataFrame) -> dict | None:
    """What made a feature table (model, weight SHA-256, random-init seed, profile), from its sidecar; None when it
    has none (a DataFrame, a table from elsewhere). A stale sidecar (of another table) is an error."""
    if isinstance(path, pd.DataFrame) or os.path.isdir(path):  # a DataFrame, FMCIB's folder: no sidecar
        return None
    sidecar = read_sidecar(path)
    if sidecar is None or "model" not in sidecar:
        return None
    found = {key: sidecar.get(key) for key in PROVENANCE_KEYS}
    if isinstance(found["profile"], dict):  # the description is prose: only the settings identify a profile
        found["profile"] = {k: v for k, v in found["profile"].items() if k != "description"}
    return found


def describe_provenance(provenance: dict) -> str:
    """A feature table's provenance in a few words: model, weights, profile."""
    sha = provenance.get("weights_sha256")
    weights = f"weights SHA-256 {sha[:12]}…" if sha else f"random weights, seed {provenance.get('random_init_seed')}"
    profile = provenance.get("profile") or {}
    return f"{provenance.get('model')} ({weights}, profile {profile.get('name')} v{profile.get('version')})"


def table_source(path: object) -> str:
    """How messages name a feature table: ``feature table PATH``, or ``the feature table`` for a DataFrame."""
    return "the feature table" if isinstance(path, pd.DataFrame) else f"feature table {path}"


def feature_matrix(table: pd.DataFrame, columns: list[str], source: str) -> np.ndarray:
    """The feature columns as a float64 (n, d) array; a cell that is not a number is named (column, row, value)."""
    try:
        return table[columns].to_numpy(dtype=np.float64)
    except (TypeError, ValueError):
        for column in columns:  # only on failure: find the first column that holds something else
            check_number_column(table[column], column, source)
        raise ManifestError(f"{source}: the feature columns do not all hold numbers") from None


def read_features(
    path: str | os.PathLike[str] | pd.DataFrame, prefix: str | None = None, split_column: str | None = "split"
) -> tuple[pd.DataFrame, np.ndarray, list[str]]:
    """A feature table (or FMCIB's folder of them), its features as a float64 (n, d) array and the column names."""
    if isinstance(path, pd.DataFrame):
        table = path
    elif os.path.isdir(path):
        table = read_fmcib_layout(path, split_column or "split")
    else:
        table = read_table(path)
    columns = feature_columns(table, prefix)
    features = feature_matrix(table, columns, table_source(path))
    bad = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad):
        raise ManifestError(f"feature table {path}: row {bad[0]} has a missing or infinite feature ({len(bad)} rows)")
    return table, features, columns


@dataclass
class Labelled:
    """The labelled rows of a feature table: the rows, features, labels, groups and their source row numbers,
    and how many rows were left out for a missing label."""

    table: pd.DataFrame
    x: np.ndarray
    y: np.ndarray
    groups: np.ndarray | None
    rows: np.ndarray
    columns: list[str]
    n_missing: int = 0


def read_labelled(
    features: str | os.PathLike[str] | pd.DataFrame,
    label: str,
    group: str | None = None,
    prefix: str | None = None,
    split_column: str | None = "split",
    missing: Sequence[str] | None = None,
    classes: bool = True,
) -> Labelled:
    """The rows of a feature table that have a label, ready for a probe. Rows whose label is empty or one of the
    ``missing`` markers (default :data:`~medfm.data.labels.MISSING_LABELS`: 'NA', 'unknown', '?', …) are left out
    and counted. With ``classes`` the labels must look like classes (see :func:`~medfm.data.labels.check_classes`).
    """
    table, x, columns = read_features(features, prefix, split_column)
    for column in (label, group):
        if column and column not in table.columns:
            raise ManifestError(f"column {column!r} not found; columns are {list(table.columns)[:20]}")
    values, absent = clean_labels(table[label], missing)
    keep = ~absent
    table = table[keep].reset_index(drop=True)
    table[label] = values.to_numpy()
    if classes:
        check_classes(table[label].to_numpy(), label)
    groups = table[group].astype(str).to_numpy() if group else None
    return Labelled(table, x[keep], table[label].to_numpy(), groups, np.flatnonzero(keep), columns, int(absent.sum()))
