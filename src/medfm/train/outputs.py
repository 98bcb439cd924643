"""What every fit leaves about its rows: the split each manifest row went to, and each test row's prediction.

``splits.csv`` has one line per manifest row: ``row`` (its 0-based position in the manifest), ``fit_split``
(train, val, test, unused: left out by a training fraction, unlabelled, or error: the row could not be read) and
the manifest's own columns (patient and image IDs, coordinates, labels). ``test_predictions.csv`` has one line per
test row: ``row``, the manifest's columns, then the task's truth and prediction columns. A manifest column whose name
one of these takes keeps its values under ``NAME_manifest``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.outputs import write_table


def _beside(ours: pd.DataFrame, manifest: pd.DataFrame | None, rows: np.ndarray, last: pd.DataFrame) -> pd.DataFrame:
    """``ours`` (leading columns), the manifest's columns of ``rows``, then ``last``; colliding manifest names get
    ``_manifest`` appended."""
    parts = [ours.reset_index(drop=True)]
    if manifest is not None:
        taken = set(ours.columns) | set(last.columns)
        part = manifest.iloc[rows].reset_index(drop=True)
        parts.append(part.rename(columns={c: f"{c}_manifest" for c in part.columns if c in taken}))
    parts.append(last.reset_index(drop=True))
    return pd.concat(parts, axis=1)


def write_splits(
    folder: str | os.PathLike[str],
    rows: np.ndarray,
    splits: np.ndarray,
    manifest: pd.DataFrame | None = None,
) -> Path:
    """``splits.csv`` in ``folder``: every manifest row (``rows``: the manifest row of each entry, ``splits``: its
    split); manifest rows that are not among ``rows`` were not read and are marked ``error``."""
    rows = np.asarray(rows, dtype=int)
    n = len(manifest) if manifest is not None else (int(rows.max()) + 1 if len(rows) else 0)
    assigned = np.full(n, "error", dtype=object)
    assigned[rows] = np.asarray(splits, dtype=str)
    ours = pd.DataFrame({"row": np.arange(n), "fit_split": assigned})
    table = _beside(ours, manifest, np.arange(n), pd.DataFrame(index=range(n)))
    return write_table(table, Path(folder) / "splits.csv")


def write_test_predictions(
    folder: str | os.PathLike[str],
    rows: np.ndarray,
    columns: dict[str, np.ndarray | list],
    manifest: pd.DataFrame | None = None,
) -> Path:
    """``test_predictions.csv`` in ``folder``: per test row (``rows``: manifest rows), its manifest columns and the
    task's ``columns`` (truth, probabilities, prediction), in manifest order."""
    rows = np.asarray(rows, dtype=int)
    order = np.argsort(rows, kind="stable")
    last = pd.DataFrame({name: np.asarray(values, dtype=object if isinstance(values, list) else None)[order]
                         for name, values in columns.items()})  # fmt: skip
    table = _beside(pd.DataFrame({"row": rows[order]}), manifest, rows[order], last)
    return write_table(table, Path(folder) / "test_predictions.csv")
