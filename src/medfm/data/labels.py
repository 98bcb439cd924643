"""Label columns: which values mean "missing", and whether a column holds the few classes a classifier needs.

Spreadsheets write a missing label as 'NA', 'unknown', '?', an empty cell…; taken as text, each would become a
class of its own. Every command that reads labels from a table (probe, knn, fewshot, finetune) drops these rows
and counts them, with the markers settable (``--label-missing``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from medfm.errors import ConfigError

# compared case-insensitively with the stripped text of each value ('NA', 'n/a', 'Unknown', ' - ' …)
MISSING_LABELS: tuple[str, ...] = ("", "na", "n/a", "nan", "none", "null", "unknown", "?", "-")
MAX_CLASSES = 20  # more classes than this, with fewer than MIN_PER_CLASS rows each on average, is not a class label
MIN_PER_CLASS = 5


def _text(value: object) -> str:
    """A label as the text a marker is compared with: 1.0 → '1', ' NA ' → 'na'."""
    if isinstance(value, (float, np.floating)) and np.isfinite(value) and float(value).is_integer():
        value = int(value)
    return str(value).strip().lower()


def _shown(value: object) -> str:
    """A class as the user wrote it: numbers plain, text quoted."""
    value = value.item() if isinstance(value, np.generic) else value
    return repr(value) if isinstance(value, str) else str(value)


def missing_labels(values: pd.Series, markers: Sequence[str] | None = None) -> np.ndarray:
    """True where a label is missing: empty (NaN/None) or one of ``markers`` (default :data:`MISSING_LABELS`)."""
    wanted = {m.strip().lower() for m in (MISSING_LABELS if markers is None else markers)}
    return np.array([pd.isna(v) or _text(v) in wanted for v in values], dtype=bool)


def clean_labels(values: pd.Series, markers: Sequence[str] | None = None) -> tuple[pd.Series, np.ndarray]:
    """The labels that are present (missing ones left out), read as numbers when every one is (a CSV 'NA' made
    the column text) and whole numbers as integers (1.0 → 1); and the mask of the missing rows."""
    missing = missing_labels(values, markers)
    kept = values[~missing]
    numbers = pd.to_numeric(kept, errors="coerce")
    if len(kept) and numbers.notna().all():
        kept = numbers
        if np.all(np.mod(kept.to_numpy(dtype=float), 1) == 0):
            kept = kept.astype(np.int64)
    return kept, missing


def check_classes(labels: np.ndarray, column: str) -> None:
    """Refuse a label column a classifier cannot mean: non-integer numbers, or many classes of a few rows each;
    the message shows the classes found."""
    classes, counts = np.unique(labels, return_counts=True)
    fractional = labels.dtype.kind == "f"  # after clean_labels: whole numbers are integers
    many = len(classes) > MAX_CLASSES and len(labels) < MIN_PER_CLASS * len(classes)
    if not (fractional and len(classes) > 2) and not many:
        return
    top = np.argsort(-counts, kind="stable")[:8]
    shown = ", ".join(f"{_shown(classes[i])} ({counts[i]})" for i in top)
    why = "non-integer numbers" if fractional else f"fewer than {MIN_PER_CLASS} rows per class on average"
    raise ConfigError(
        f"label column {column!r} has {len(classes)} classes in {len(labels)} rows ({why}), e.g. {shown}: "
        "a classifier needs a few classes; is it a continuous value, or are missing labels written another way "
        "(--label-missing)?"
    )
