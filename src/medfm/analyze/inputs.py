"""Inputs of an analysis, read as the model sees them: manifests and pairs files through the model's own profile.

Images and volumes are read by :func:`medfm.data.datasets.iter_volume_items` (the path of ``medfm extract``), so a
bad row stops with the row, file and reason, or with ``on_error='skip'`` is reported and left out. A pairs file
(columns ``a`` and ``b``, paths relative to its folder) becomes two manifests of the same rows; for 3D models its
seeds are ``coordX, coordY, coordZ`` (shared), ``coordX_a … coordZ_b`` (one per side), or absent (volume centre).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medfm.analyze.models import AnalysisModel
from medfm.data.datasets import iter_volume_items
from medfm.data.io import read_geometry
from medfm.data.manifest import COORD_COLUMNS, Manifest, read_manifest, read_table, validate_manifest
from medfm.errors import ManifestError, MedfmError
from medfm.progress import progress_bar


@dataclass
class Inputs:
    """Preprocessed inputs of the good rows (``arrays[i]`` belongs to manifest row ``rows[i]``) and the bad rows."""

    rows: list[int]
    arrays: list[np.ndarray]
    table: pd.DataFrame
    errors: dict[int, str] = field(default_factory=dict)

    def tensor(self, index: int) -> torch.Tensor:
        """Input ``index`` as a (1, C, …) float32 batch."""
        return torch.from_numpy(np.ascontiguousarray(self.arrays[index], dtype=np.float32))[None]

    def batch(self) -> torch.Tensor:
        """All inputs as one (N, C, …) float32 batch."""
        return torch.from_numpy(np.stack(self.arrays).astype(np.float32, copy=False))

    def __len__(self) -> int:
        return len(self.rows)


def open_manifest(path: str | os.PathLike[str] | Manifest, dims: int, coords: str = "lps") -> Manifest:
    """A manifest for a model of ``dims`` dimensions: 3D needs seeds, 2D only ``image_path``."""
    if isinstance(path, Manifest):
        return path
    return read_manifest(path, coords=coords, seeds=dims == 3)


def read_inputs(
    manifest: Manifest,
    model: AnalysisModel,
    limit: int | None = None,
    on_error: str = "raise",
    progress: bool = False,
) -> Inputs:
    """The first ``limit`` rows (all when None) cut and shaped by the model's profile (and a card's view)."""
    rows = list(range(len(manifest) if limit is None else min(limit, len(manifest))))
    found: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    with progress_bar(progress) as bar:
        task = bar.add_task(f"reading for {model.name}", total=len(rows))
        for item in iter_volume_items(manifest, model.profile, rows=rows, on_error=on_error):
            errors.update(item.errors)
            for row, patch in zip(item.rows, item.patches):
                found[row] = model.view(patch) if model.view is not None else patch
            bar.advance(task, len(item.rows) + len(item.errors))
    good = sorted(found)
    if not good:
        raise MedfmError(f"manifest {manifest.source}: none of its {len(rows)} rows could be read")
    return Inputs(good, [found[r] for r in good], manifest.table.iloc[good].reset_index(drop=True), errors)


def _centre_seed(path: str) -> tuple[float, float, float]:
    geometry = read_geometry(path)
    return tuple(float(v) for v in geometry.index_to_world((np.asarray(geometry.size, dtype=float) - 1) / 2))


def _side_table(table: pd.DataFrame, side: str, base: Path, dims: int, source: str) -> pd.DataFrame:
    out = pd.DataFrame({"image_path": table[side]})
    if dims == 2:
        return out
    own = [f"{c}_{side}" for c in COORD_COLUMNS]
    if all(c in table.columns for c in own):
        columns = own
    elif all(c in table.columns for c in COORD_COLUMNS):
        columns = list(COORD_COLUMNS)
    else:
        columns = None
    for axis, name in enumerate(COORD_COLUMNS):
        if columns is not None:
            out[name] = table[columns[axis]]
    if columns is None:  # no seeds: the centre of each volume
        centres = []
        for row, value in enumerate(table[side]):
            path = Path(str(value)).expanduser()
            path = path if path.is_absolute() else base / path
            try:
                centres.append(_centre_seed(str(path)))
            except MedfmError as err:
                raise ManifestError(f"pairs {source}: row {row} ({side}={value}): {err}") from None
        for axis, name in enumerate(COORD_COLUMNS):
            out[name] = [c[axis] for c in centres]
    return out


def read_pairs(
    pairs: str | os.PathLike[str] | pd.DataFrame, dims: int, coords: str = "lps", base: Path | None = None
) -> tuple[pd.DataFrame, Manifest, Manifest]:
    """A pairs file or table (columns ``a``, ``b``; others travel through) as two manifests of the same rows.

    Relative paths are taken from the file's folder (a table: from ``base``, default the working folder).
    """
    if isinstance(pairs, pd.DataFrame):
        table, source, base = pairs, "pairs table", Path(base or Path.cwd())
    else:
        table, source, base = read_table(pairs), str(pairs), Path(pairs).resolve().parent
    missing = [c for c in ("a", "b") if c not in table.columns]
    if missing:
        raise ManifestError(
            f"pairs {source}: missing column(s) {missing}; it has {list(table.columns)}. Required: a, b"
        )
    table = table.reset_index(drop=True)
    sides = [
        validate_manifest(_side_table(table, s, base, dims, source), f"{source} (column {s})", base, coords, dims == 3)
        for s in ("a", "b")
    ]
    return table, sides[0], sides[1]


def read_pair_inputs(
    path: str | os.PathLike[str] | pd.DataFrame,
    model: AnalysisModel,
    limit: int | None = None,
    on_error: str = "raise",
    coords: str = "lps",
) -> tuple[pd.DataFrame, Inputs, Inputs]:
    """Both sides of a pairs file as the model sees them; a pair with a bad side is left out (``skip``) or stops."""
    table, side_a, side_b = read_pairs(path, model.dims, coords)
    a = read_inputs(side_a, model, limit, on_error)
    b = read_inputs(side_b, model, limit, on_error)
    both = sorted(set(a.rows) & set(b.rows))
    keep_a = [a.rows.index(r) for r in both]
    keep_b = [b.rows.index(r) for r in both]
    errors = {**a.errors, **b.errors}
    a = Inputs(both, [a.arrays[i] for i in keep_a], table.iloc[both].reset_index(drop=True), errors)
    b = Inputs(both, [b.arrays[i] for i in keep_b], a.table, errors)
    return table, a, b
