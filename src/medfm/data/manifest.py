"""Read and validate manifests: CSV or Parquet tables of images and seed points.

Required columns: ``image_path`` (absolute, or relative to the manifest's folder) and ``coordX, coordY,
coordZ``. Coordinates are world LPS millimetres unless the manifest declares ``ras`` (negated x and y) or
``voxel`` (continuous (x, y, z) index of the file, converted with its header). The conversion happens
here, once; every other column travels through untouched. Whole-table problems raise
:class:`ManifestError`; problems of single rows are collected in ``row_errors`` so a run can skip them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medfm.data.io import EMPTY_UID, Geometry, read_geometry
from medfm.errors import ManifestError, MedfmError

COORD_COLUMNS = ("coordX", "coordY", "coordZ")
COORD_SYSTEMS = ("lps", "ras", "voxel")
SERIES_COLUMN = "series_uid"
_DECIMAL_COMMA = re.compile(r"^\s*[-+]?\d*,\d+\s*$")
_NUMBER = re.compile(r"^-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?$|^-?0?\.\d+([eE][-+]?\d+)?$")


@dataclass
class Manifest:
    """A validated manifest: the table as given, resolved paths, LPS seeds, and per-row problems."""

    table: pd.DataFrame
    source: str
    coords: str
    paths: list[str]
    seeds_lps: np.ndarray
    row_errors: dict[int, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.table)

    def series_uid(self, row: int) -> str | None:
        """The DICOM series chosen for a row, if the manifest has a ``series_uid`` column."""
        if SERIES_COLUMN not in self.table.columns:
            return None
        value = self.table[SERIES_COLUMN].iloc[row]
        if pd.isna(value):
            return None
        # a series whose UID is empty: "" from Parquet, or "<empty UID>" as the listing names it (a CSV cannot say "")
        return "" if str(value).strip() == EMPTY_UID else str(value)

    def seed_as_given(self, row: int) -> str:
        """A row's seed as the manifest gives it (LPS or RAS mm, or voxel index), with LPS beside it if converted."""
        given = tuple(float(self.table[c].iloc[row]) for c in COORD_COLUMNS)
        text = "(" + ", ".join(f"{v:.1f}" for v in given) + ")"
        lps = "(" + ", ".join(f"{v:.1f}" for v in self.seeds_lps[row]) + ")"
        if self.coords == "ras":
            return f"seed {text} mm RAS (LPS {lps})"
        if self.coords == "voxel":
            return f"seed at voxel {text} (LPS {lps} mm)"
        return f"seed {text} mm"

    def volumes(self, rows: list[int] | None = None) -> list[tuple[str, str | None, list[int]]]:
        """Group rows by the volume they read: (path, series uid, rows) in order of first appearance."""
        groups: dict[tuple[str, str | None], list[int]] = {}
        for row in range(len(self)) if rows is None else rows:
            groups.setdefault((self.paths[row], self.series_uid(row)), []).append(row)
        return [(path, uid, members) for (path, uid), members in groups.items()]

    def row_digest(self, row: int) -> str:
        """A SHA-256 of what a row's output is computed from (image path, series, LPS seed), so that a resumed run
        notices a row that changed, moved or was swapped since its output was kept."""
        seed = [repr(float(v)) for v in self.seeds_lps[row]]
        text = json.dumps([self.paths[row], self.series_uid(row), seed])
        return hashlib.sha256(text.encode()).hexdigest()


def _infer_column(values: pd.Series) -> pd.Series:
    """Turn a text column into numbers only when every value is a plain number (IDs like 007 stay text)."""
    text = values.dropna()
    if len(text) and all(_NUMBER.match(v.strip()) for v in text):
        return pd.to_numeric(values)
    return values


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a CSV or Parquet table; CSV values become numbers only where nothing would be lost."""
    path = str(path)
    if not os.path.isfile(path):
        raise ManifestError(f"manifest {path}: file not found")
    try:
        if path.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        raw = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except Exception as err:  # pandas raises many kinds; the message is what the user needs
        raise ManifestError(f"manifest {path}: cannot be read ({err})") from None
    for column in raw.columns:
        raw[column] = _infer_column(raw[column])
    return raw


def read_manifest(path: str | os.PathLike[str], coords: str = "lps", seeds: bool = True) -> Manifest:
    """Read a manifest, check its columns, resolve paths and convert seeds to LPS world millimetres.

    ``seeds=False`` reads a manifest of whole 2D images: only ``image_path`` is required.
    """
    if coords not in COORD_SYSTEMS:
        raise ManifestError(f"coords={coords!r} is not allowed; choose one of {COORD_SYSTEMS}")
    table = read_table(path)
    return validate_manifest(table, str(path), Path(path).resolve().parent, coords=coords, seeds=seeds)


def validate_manifest(
    table: pd.DataFrame, source: str, base_dir: Path, coords: str = "lps", seeds: bool = True
) -> Manifest:
    """Validate a manifest table already in memory (see :func:`read_manifest`)."""
    required = ("image_path", *COORD_COLUMNS) if seeds else ("image_path",)
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise ManifestError(
            f"manifest {source}: missing column(s) {missing}; it has {list(table.columns)}. "
            f"Required: {', '.join(required)}"
        )
    if len(table) == 0:
        raise ManifestError(f"manifest {source}: has no rows")
    table = table.reset_index(drop=True)
    row_errors: dict[int, str] = {}
    paths: list[str] = []
    for row, value in enumerate(table["image_path"]):
        if pd.isna(value) or str(value).strip() == "":
            row_errors[row] = "column image_path is empty"
            paths.append("")
            continue
        p = Path(str(value).strip()).expanduser()
        paths.append(str(p if p.is_absolute() else (base_dir / p)))
    points = np.full((len(table), 3), np.nan)
    for axis, column in enumerate(COORD_COLUMNS if seeds else ()):
        check_numeric_column(table[column], column, f"manifest {source}")
        numbers = pd.to_numeric(table[column], errors="coerce")
        for row in np.flatnonzero(~np.isfinite(numbers.to_numpy(dtype=float))):
            value = table[column].iloc[row]
            value = value.item() if isinstance(value, np.generic) else value  # nan, not np.float64(nan)
            row_errors.setdefault(int(row), f"column {column} has value {value!r}, not a finite number")
        points[:, axis] = numbers.to_numpy(dtype=float)
    for row, path in enumerate(paths):
        if row not in row_errors and not os.path.exists(path):
            row_errors[row] = "file not found"
    if seeds and coords == "ras":
        points[:, :2] *= -1.0
    elif seeds and coords == "voxel":
        points = _voxel_to_lps(table, paths, points, row_errors)
    return Manifest(table=table, source=source, coords=coords, paths=paths, seeds_lps=points, row_errors=row_errors)


def check_numeric_column(values: pd.Series, column: str, source: str) -> None:
    """Refuse a column that must hold numbers but holds booleans, dates, or decimal commas ('0,640'); rows are named
    by the series' index (the table's row numbers), the table by ``source`` (e.g. 'manifest m.csv')."""
    kind = values.dtype
    flags = [isinstance(v, (bool, np.bool_)) for v in values] if pd.api.types.is_object_dtype(kind) else []
    if pd.api.types.is_bool_dtype(kind) or any(flags):
        raise ManifestError(f"{source}: column {column} holds booleans (dtype {kind}), not coordinates")
    if not (
        pd.api.types.is_numeric_dtype(kind) or pd.api.types.is_object_dtype(kind) or pd.api.types.is_string_dtype(kind)
    ):
        raise ManifestError(f"{source}: column {column} has dtype {kind}, not numbers")
    if pd.api.types.is_numeric_dtype(kind):
        return
    commas = [row for row, v in values.items() if isinstance(v, str) and _DECIMAL_COMMA.match(v)]
    if commas:
        row = commas[0]
        raise ManifestError(
            f"{source}: column {column}, row {row} holds {values[row]!r}"
            + (f" ({len(commas)} rows like it)" if len(commas) > 1 else "")
            + ": decimal commas are not read; write decimal points (0.640), with commas only between columns"
        )


def check_number_column(values: pd.Series, column: str, source: str) -> None:
    """:func:`check_numeric_column`, and refuse any other value that is not a number (a word), naming the first row;
    for columns where a bad value is the whole table's fault (features, follow-up times), not one row's."""
    check_numeric_column(values, column, source)
    numbers = pd.to_numeric(values, errors="coerce")
    words = [row for row, v, n in zip(values.index, values, numbers) if pd.notna(v) and pd.isna(n)]
    if words:
        row = words[0]
        raise ManifestError(
            f"{source}: column {column}, row {row} holds {values[row]!r}, not a number"
            + (f" ({len(words)} rows like it)" if len(words) > 1 else "")
        )


def _voxel_to_lps(table: pd.DataFrame, paths: list[str], index: np.ndarray, row_errors: dict[int, str]) -> np.ndarray:
    world = np.full_like(index, np.nan)
    geometries: dict[tuple[str, str | None], Geometry] = {}
    for row, path in enumerate(paths):
        if row in row_errors:
            continue
        uid = table[SERIES_COLUMN].iloc[row] if SERIES_COLUMN in table.columns else None
        key = (path, None if pd.isna(uid) else str(uid))
        try:
            if key not in geometries:
                geometries[key] = read_geometry(path, key[1])
            world[row] = geometries[key].index_to_world(index[row])
        except MedfmError as err:
            row_errors[row] = str(getattr(err, "reason", err))
    return world
