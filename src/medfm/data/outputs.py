"""Write outputs so that nothing is half-written: temporary file in the same folder, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from torch import nn


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest`` in one rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_weights(module: nn.Module, dest: str | os.PathLike[str]) -> Path:
    """Write a module's state dict as safetensors (CPU, contiguous copies), atomically; returns ``dest``."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp))
    return Path(dest)


def write_table(table: pd.DataFrame, dest: str | os.PathLike[str]) -> Path:
    """Write a table atomically as Parquet, or as CSV when the name ends in .csv."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        if dest.suffix.lower() == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)
    return dest


def write_feature_table(
    table: pd.DataFrame, features: np.ndarray, columns: list[str], dest: str | os.PathLike[str]
) -> Path:
    """Write ``table`` plus ``features`` as columns, atomically (Parquet built in Arrow: pandas is slow at 4096 columns)."""
    dest = Path(dest)
    if dest.suffix.lower() == ".csv":
        wide = pd.concat([table.reset_index(drop=True), pd.DataFrame(features, columns=columns)], axis=1)
        return write_table(wide, dest)
    import pyarrow as pa
    import pyarrow.parquet as pq

    base = pa.Table.from_pandas(table.reset_index(drop=True), preserve_index=False)
    features = np.ascontiguousarray(features.T)
    arrays = list(base.columns) + [pa.array(features[i]) for i in range(len(columns))]
    with atomic_path(dest) as tmp:
        pq.write_table(pa.Table.from_arrays(arrays, names=list(base.column_names) + list(columns)), tmp)
    return dest


def write_json(data: dict[str, Any], dest: str | os.PathLike[str]) -> Path:
    """Write JSON atomically."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return dest


def stem_of(dest: str | os.PathLike[str]) -> Path:
    """The output path without its table suffix (features.parquet → features)."""
    dest = Path(dest)
    return dest.with_suffix("") if dest.suffix.lower() in (".parquet", ".pq", ".csv") else dest


def errors_path(dest: str | os.PathLike[str]) -> Path:
    """Where the bad rows of an output go: ``NAME.errors.csv`` beside it."""
    stem = stem_of(dest)
    return stem.with_name(stem.name + ".errors.csv")


def sidecar_path(dest: str | os.PathLike[str]) -> Path:
    """Where an output's provenance goes: ``NAME.json`` beside it."""
    stem = stem_of(dest)
    return stem.with_name(stem.name + ".json")


def write_errors(table: pd.DataFrame, errors: dict[int, str], dest: str | os.PathLike[str]) -> Path | None:
    """Write the bad rows (all their manifest columns plus ``row`` and ``reason``), or remove a stale file."""
    path = errors_path(dest)
    if not errors:
        if path.exists():
            path.unlink()
        return None
    rows = sorted(errors)
    bad = table.iloc[rows].copy()
    bad.insert(0, "row", rows)
    bad["reason"] = [errors[r] for r in rows]
    return write_table(bad, path)


class FinishedRows:
    """Results kept in a ``.partial`` folder as each row (image, case) finishes, so that an interrupted command goes
    on from there with ``resume=True``; the settings must be the same. :meth:`close` removes them once the final
    tables are written."""

    def __init__(self, path: str | os.PathLike[str], settings: dict, resume: bool) -> None:
        from medfm.errors import MedfmError

        self.path = Path(path)
        state = json.loads(json.dumps(settings, default=str))
        if resume and self.path.is_dir():
            saved = self.path / "state.json"
            if (json.loads(saved.read_text()) if saved.exists() else None) != state:
                raise MedfmError(
                    f"{self.path} was made with other inputs or settings; run without --resume to start again"
                )
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        write_json(state, self.path / "state.json")

    def get(self, key: str) -> dict | None:
        """What an earlier run kept under ``key``, or None."""
        file = self.path / f"{key}.json"
        return json.loads(file.read_text()) if file.exists() else None

    def put(self, key: str, results: dict) -> None:
        """Keep one row's results (JSON-ready data) under ``key``."""
        write_json(results, self.path / f"{key}.json")

    def close(self) -> None:
        """Remove the kept rows: the command has written its tables."""
        shutil.rmtree(self.path, ignore_errors=True)
