"""Train / validation / test splits that never put one patient on two sides."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from medfm.errors import ConfigError, ManifestError

SPLIT_NAMES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}


@dataclass
class Splits:
    """Row indices: the rows the probe learns from (train + val), the held-out test rows, and search folds."""

    development: np.ndarray
    test: np.ndarray
    folds: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    how: str = ""
    n_available: int = 0  # development rows before a train fraction was drawn

    def counts(self) -> dict[str, int | None]:
        """Labelled rows used: ``n_train`` and ``n_val`` of a train→val search (``n_val`` None when the search
        used folds of the development rows), ``n_labelled`` (train + val, all refit into the final model),
        ``n_labelled_available`` before any train fraction, and ``n_test``."""
        single = len(self.folds) == 1 and len(np.intersect1d(*self.folds[0])) == 0
        n_dev = len(self.development)
        return {
            "n_train": len(self.folds[0][0]) if single else n_dev,
            "n_val": len(self.folds[0][1]) if single else None,
            "n_labelled": n_dev,
            "n_labelled_available": self.n_available or n_dev,
            "n_test": len(self.test),
        }


def _kfold(
    y: np.ndarray, groups: np.ndarray | None, k: int, seed: int, asked: str, advice: str
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` stratified (grouped) folds; when the rows cannot make them, a ConfigError naming what the user ``asked``
    (the option behind ``k``), the class counts and ``advice``, instead of scikit-learn's ``n_splits=…`` message."""
    try:
        if groups is None:
            splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
            return list(splitter.split(np.zeros(len(y)), y))
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
        return list(splitter.split(np.zeros(len(y)), y, groups))
    except ValueError:
        labels, counts = np.unique(np.asarray(y).astype(str), return_counts=True)
        per_class = ", ".join(f"{label}: {n}" for label, n in zip(labels, counts))
        units = "rows" if groups is None else f"rows in {len(np.unique(groups))} groups"
        raise ConfigError(
            f"{asked} needs {k} stratified folds{'' if groups is None else ' of whole groups'}, but the "
            f"{len(y)} {units} cannot make them (rows per class: {per_class}); {advice}"
        ) from None


def split_names(table: pd.DataFrame, split_column: str) -> pd.Series:
    """``train``/``val``/``test`` per row from a split column: spaces stripped, any case, the synonyms of
    ``SPLIT_NAMES``; an unknown or empty value is refused naming its row and value."""
    if split_column not in table.columns:
        raise ManifestError(f"split column {split_column!r} is not in the manifest")
    raw = table[split_column]
    names = raw.astype(str).str.strip().str.lower().map(SPLIT_NAMES)
    if names.isna().any():
        bad = int(np.flatnonzero(names.isna().to_numpy())[0])
        value = raw.iloc[bad]
        given = "is empty" if pd.isna(value) or not str(value).strip() else f"has value {value!r}"
        raise ManifestError(f"row {table.index[bad]}: column {split_column} {given}; allowed train, val, test")
    return names


def _test_names(table: pd.DataFrame, split_column: str) -> pd.Series:
    names = split_names(table, split_column)
    if not (names == "test").any():
        raise ManifestError(f"column {split_column} marks no row as test")
    return names


def holdout(
    table: pd.DataFrame,
    y: np.ndarray,
    split_column: str | None = "split",
    groups: np.ndarray | None = None,
    test_size: float = 0.2,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(development, test) row indices: the ``split`` column's test rows, else a stratified, grouped hold-out."""
    rows = np.arange(len(table))
    if split_column and split_column in table.columns:
        names = _test_names(table, split_column)
        development, test = rows[(names != "test").to_numpy()], rows[(names == "test").to_numpy()]
        if groups is not None:
            shared = sorted(set(groups[development]) & set(groups[test]))
            if shared:
                raise ManifestError(
                    f"column {split_column} puts {len(shared)} group(s) in both test and train/val, "
                    f"e.g. {shared[:3]}: the test would not be held out"
                )
        return development, test
    if not 0 < test_size < 1:
        raise ConfigError(f"--test-size {test_size:g}: the held-out share must lie between 0 and 1 (e.g. 0.2)")
    k = max(2, int(round(1 / test_size)))
    asked = f"a held-out test set of 1/{k} of the rows (--test-size {test_size:g}, no split column)"
    dev_pos, test_pos = _kfold(
        y, groups, k, seed, asked, "mark test rows in a split column or give a larger --test-size"
    )[0]
    return np.sort(rows[dev_pos]), np.sort(rows[test_pos])


def subsample(rows: np.ndarray, y: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int) -> np.ndarray:
    """A seeded share of ``rows``, stratified by label; whole groups (patients) are kept or dropped together."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"train fraction {fraction} must lie in (0, 1]")
    if fraction == 1:
        return rows
    rng = np.random.default_rng(seed)
    if groups is None:
        units = [np.array([r]) for r in rows]
        labels = y[rows]
    else:
        names, inverse = np.unique(groups[rows], return_inverse=True)
        units = [rows[inverse == g] for g in range(len(names))]
        labels = np.array([pd.Series(y[u]).mode().iloc[0] for u in units])
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        chosen = rng.choice(members, size=max(1, int(round(fraction * len(members)))), replace=False)
        keep.extend(units[i] for i in chosen)
    return np.sort(np.concatenate(keep))


def make_splits(
    table: pd.DataFrame,
    y: np.ndarray,
    split_column: str | None = "split",
    cv: int | None = None,
    groups: np.ndarray | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    train_fraction: float = 1.0,
    fraction_seed: int = 0,
) -> Splits:
    """Test rows from :func:`holdout`, and search folds over the rest.

    The search folds are the train→val split when the ``split`` column has val rows and no ``cv`` is
    given; else ``cv`` (default 5) grouped, stratified folds over train + val. ``train_fraction`` keeps a
    seeded share of the development rows as a whole — train and val together, stratified by label (and by side,
    so train and val each keep that share of each class), whole groups kept or dropped — so that the final
    probe, refit on train + val, learns from that share of the labelled rows; test rows stay as they are.
    """
    development, test = holdout(table, y, split_column, groups, test_size, seed)
    available = len(development)
    has_column = bool(split_column and split_column in table.columns)
    if has_column and cv is None:
        names = _test_names(table, split_column)
        train = np.flatnonzero((names == "train").to_numpy())
        val = np.flatnonzero((names == "val").to_numpy())
        if len(val) == 0:
            raise ManifestError(f"column {split_column} marks no row as val; give --cv K to search by folds")
        development = np.sort(np.concatenate([train, val]))
        strata = np.asarray([f"{label}|{side}" for label, side in zip(y, names.to_numpy())], dtype=object)
        development = subsample(development, strata, groups, train_fraction, fraction_seed)
        train, val = np.intersect1d(train, development), np.intersect1d(val, development)
        if len(val) == 0 or len(train) == 0:
            raise ConfigError(
                f"train fraction {train_fraction:g} leaves {len(train)} train and {len(val)} val rows; "
                "give a larger fraction or search by folds (--cv K)"
            )
        how = f"{split_column} column: train→val search, test held out"
        return Splits(development, test, [(train, val)], how, available)
    given_cv = cv is not None
    if given_cv and cv < 2:
        raise ConfigError(f"--cv {cv}: a search by folds needs at least 2 folds")
    cv = cv or 5
    development = subsample(development, y, groups, train_fraction, fraction_seed)
    source = (
        f"{split_column} column"
        if has_column
        else (f"held-out test of {len(test)} rows (stratified{', grouped' if groups is not None else ''})")
    )
    sub_groups = None if groups is None else groups[development]
    asked = f"--cv {cv}" if given_cv else f"the default {cv}-fold search (--cv K sets it)"
    fewest = int(np.unique(y[development], return_counts=True)[1].min()) if len(development) else 0
    advice = f"give a smaller --cv (the rarest class has {fewest} rows)" + (
        " or mark val rows in the split column" if has_column else ""
    )
    splits = _kfold(y[development], sub_groups, cv, seed, asked + " over the development rows", advice)
    folds = [(development[a], development[b]) for a, b in splits]
    return Splits(development, test, folds, f"{source}; {cv}-fold search over the rest", available)


def leaked_groups(splits: Splits, groups: np.ndarray) -> set[object]:
    """Groups found on both sides of the test split or of any search fold (should be empty)."""
    leaks = set(groups[splits.development]) & set(groups[splits.test])
    for train, val in splits.folds:
        leaks |= set(groups[train]) & set(groups[val])
    return leaks


def assign_splits(
    table: pd.DataFrame,
    strata: np.ndarray,
    split_column: str | None,
    groups: np.ndarray | None,
    seed: int,
    test_size: float = 0.2,
    val_size: float = 0.2,
) -> np.ndarray:
    """``train``/``val``/``test`` per row: the split column's names, else grouped stratified hold-outs."""
    if split_column is not None:
        out = split_names(table, split_column).to_numpy().astype(object)
    else:
        out = np.full(len(table), "train", dtype=object)
        dev, test = holdout(table, strata, None, groups, test_size, seed)
        out[test] = "test"
        sub = table.iloc[dev]
        train_pos, val_pos = holdout(
            sub, strata[dev], None, None if groups is None else groups[dev], val_size, seed + 1
        )
        out[dev[val_pos]] = "val"
    if groups is not None:
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = set(groups[out == a]) & set(groups[out == b])
            if shared:
                raise ManifestError(f"{len(shared)} patient(s) are in both {a} and {b}, e.g. {sorted(shared)[:3]}")
    return out.astype(str)
