"""Write outputs so that nothing is half-written: temporary file in the same folder, then rename."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from medfm.errors import OutputError

if TYPE_CHECKING:
    from torch import nn


WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                errno.EPERM: "permission denied"}  # fmt: skip


def write_errno(err: OSError) -> int | None:
    """The errno of a failed write; pyarrow raises OSError with the number only in its message."""
    if err.errno is not None:
        return err.errno
    found = re.search(r"\[Errno (\d+)\]", str(err))
    return int(found.group(1)) if found else None


def write_failure(path: str | os.PathLike[str], err: OSError, needed: int | None = None) -> OutputError:
    """A failed write as one line naming the path, what went wrong and (where known) the bytes needed."""
    reason = WRITE_ERRORS.get(write_errno(err) or 0, err.strerror or str(err))
    if needed is not None:
        reason += f"; it needs {_size(needed)}"
    return OutputError(f"cannot write {path}: {reason}")


def _size(n: int) -> str:
    """Bytes as a short human size (``1.2 GB``)."""
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


@contextlib.contextmanager
def atomic_paths(*dests: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """Yield a temporary path beside each of ``dests``; on success they replace their ``dests`` together.

    When anything fails, every temporary file is removed and the ``dests`` are as they were. The later dests
    (sidecars) are removed before the first is replaced, so a crash between the renames leaves a file without its
    sidecar, never beside an earlier run's. Disk full, a read-only folder or a missing permission become an
    :class:`OutputError` naming the path.
    """
    dests = [Path(d) for d in dests]
    temps: list[str] = []
    try:
        for dest in dests:
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
            os.close(fd)
            temps.append(tmp)
        yield [Path(t) for t in temps]
        for dest in dests[1:]:
            dest.unlink(missing_ok=True)
        for tmp, dest in zip(temps, dests):
            os.replace(tmp, dest)
    except OSError as err:
        if write_errno(err) not in WRITE_ERRORS:
            raise
        where = next((d for d, t in zip(dests, temps) if err.filename in (t, str(d))), dests[0])
        raise write_failure(where, err) from None
    finally:
        for tmp in temps:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it replaces ``dest`` in one rename."""
    with atomic_paths(dest) as (tmp,):
        yield tmp


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


FIGURE_FORMATS = ("png", "svg", "pdf")


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_figure(fig: Any, dest: str | os.PathLike[str], dpi: int = 120) -> Path:
    """Write a matplotlib figure atomically in the format its suffix names (png, svg or pdf), then close it."""
    dest = Path(dest)
    fmt = dest.suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        from medfm.errors import ConfigError

        raise ConfigError(f"figure format {fmt!r} of {dest}; allowed {list(FIGURE_FORMATS)}")
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    pyplot().close(fig)
    return dest


def write_weights(module: nn.Module, dest: str | os.PathLike[str]) -> Path:
    """Write a module's state dict as safetensors (CPU, contiguous copies), atomically; returns ``dest``."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    with atomic_path(dest) as tmp:
        save_file(state, str(tmp))
    return Path(dest)


def write_table(table: pd.DataFrame, dest: str | os.PathLike[str], sidecar: dict[str, Any] | None = None) -> Path:
    """Write a table atomically as Parquet, or as CSV when the name ends in .csv; with ``sidecar``, the pair
    (see :func:`write_with_sidecar`)."""
    dest = Path(dest)

    def write(tmp: Path) -> None:
        if dest.suffix.lower() == ".csv":
            table.to_csv(tmp, index=False)
        else:
            table.to_parquet(tmp, index=False)

    return write_with_sidecar(write, dest, sidecar)


def write_feature_table(
    table: pd.DataFrame,
    features: np.ndarray,
    columns: list[str],
    dest: str | os.PathLike[str],
    sidecar: dict[str, Any] | None = None,
) -> Path:
    """Write ``table`` plus ``features`` as columns, atomically (Parquet built in Arrow: pandas is slow at 4096
    columns); with ``sidecar``, the table and its sidecar as one pair (see :func:`write_with_sidecar`)."""
    dest = Path(dest)
    if dest.suffix.lower() == ".csv":
        wide = pd.concat([table.reset_index(drop=True), pd.DataFrame(features, columns=columns)], axis=1)
        return write_table(wide, dest, sidecar)
    import pyarrow as pa
    import pyarrow.parquet as pq

    def write(tmp: Path) -> None:
        base = pa.Table.from_pandas(table.reset_index(drop=True), preserve_index=False)
        by_column = np.ascontiguousarray(features.T)
        arrays = list(base.columns) + [pa.array(by_column[i]) for i in range(len(columns))]
        pq.write_table(pa.Table.from_arrays(arrays, names=list(base.column_names) + list(columns)), tmp)

    return write_with_sidecar(write, dest, sidecar)


def write_with_sidecar(
    write: Callable[[Path], None], dest: str | os.PathLike[str], sidecar: dict[str, Any] | None
) -> Path:
    """Call ``write(tmp)`` and install ``tmp`` as ``dest``, with ``sidecar`` (plus the file's SHA-256, which
    :func:`read_sidecar` checks) as ``NAME.json``: both or neither, never a new file beside an old sidecar."""
    dest = Path(dest)
    if sidecar is None:
        with atomic_path(dest) as tmp:
            write(tmp)
        return dest
    with atomic_paths(dest, sidecar_path(dest)) as (tmp, tmp_sidecar):
        write(tmp)
        _dump_json({**sidecar, "file_sha256": file_sha256(tmp)}, tmp_sidecar)
    return dest


def read_sidecar(dest: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The provenance beside an output (``NAME.json``), None when there is none; an error when it describes another
    file than the one there now (its recorded SHA-256 differs: a stale sidecar)."""
    path = sidecar_path(dest)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OutputError(f"{path}: the sidecar of {dest} cannot be read ({err})") from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: the sidecar of {dest} is not a JSON object")
    recorded = data.get("file_sha256")
    if recorded is not None and recorded != file_sha256(dest):
        raise OutputError(
            f"{path} describes another file than {dest} (SHA-256 differs): a stale sidecar; write the output again"
        )
    return data


def _dump_json(data: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def write_json(data: dict[str, Any], dest: str | os.PathLike[str]) -> Path:
    """Write JSON atomically."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        _dump_json(data, tmp)
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


WARNINGS_COLUMN = "warnings"


def with_warnings(table: pd.DataFrame, rows: list[int], warnings: dict[int, str]) -> pd.DataFrame:
    """``table`` (one line per manifest row of ``rows``) plus a ``warnings`` column ('' where none) when any of
    its rows has a warning; a manifest column of that name is refused rather than overwritten."""
    if not any(r in warnings for r in rows):
        return table
    if WARNINGS_COLUMN in table.columns:
        raise OutputError(
            f"the manifest has a column {WARNINGS_COLUMN!r}, where medfm writes its row warnings; rename that column"
        )
    out = table.copy()
    out[WARNINGS_COLUMN] = [warnings.get(r, "") for r in rows]
    return out


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
    on from there with ``resume=True``; the settings must be the same. Each row is kept with a digest of its inputs
    (:meth:`medfm.data.manifest.Manifest.row_digest`): a row whose inputs changed since is computed again.
    :meth:`close` removes them once the final tables are written."""

    def __init__(self, path: str | os.PathLike[str], settings: dict, resume: bool) -> None:
        self.path = Path(path)
        state = json.loads(json.dumps(settings, default=str))
        if resume and self.path.is_dir():
            saved = self.path / "state.json"
            if (json.loads(saved.read_text()) if saved.exists() else None) != state:
                raise OutputError(
                    f"{self.path} was made with other inputs or settings; run without --resume to start again"
                )
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True)
        write_json(state, self.path / "state.json")

    def get(self, key: str, digest: str) -> dict | None:
        """What an earlier run kept under ``key`` from inputs of this ``digest``, or None (not kept, or changed)."""
        file = self.path / f"{key}.json"
        if not file.exists():
            return None
        kept = json.loads(file.read_text())
        return kept["results"] if kept.get("digest") == digest else None

    def put(self, key: str, results: dict, digest: str) -> None:
        """Keep one row's results (JSON-ready data) under ``key``, with the ``digest`` of its inputs."""
        write_json({"digest": digest, "results": results}, self.path / f"{key}.json")

    def close(self) -> None:
        """Remove the kept rows: the command has written its tables."""
        shutil.rmtree(self.path, ignore_errors=True)


def check_output(target: str | os.PathLike[str], folder: bool = False) -> Path:
    """Before any work: ``target`` (a file, or with ``folder`` a folder) can be written — it is not a folder where a
    file goes (or the reverse), and its folder (or the nearest one that exists) takes a new file. Returns it."""
    target = Path(target)
    if target.exists() and target.is_dir() != folder:
        what = "a folder" if target.is_dir() else "a file"
        raise OutputError(f"--out {target} is {what}; name {'a folder' if folder else 'a file'} to write")
    where = target if folder else target.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise OutputError(f"cannot write {target}: {where} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".medfm-write-check.", dir=where)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise write_failure(target, err) from None
    return target


def check_free_space(folder: str | os.PathLike[str], needed: int, target: str | os.PathLike[str]) -> None:
    """Refuse before the work when ``folder``'s disk has less than ``needed`` bytes free for ``target``."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"cannot write {target}: it needs {_size(needed)}, the disk has {_size(free)} free")


def check_columns_free(columns: Sequence[object], names: Sequence[str], prefix: str | None, source: str) -> None:
    """Refuse a manifest whose columns collide with those medfm writes beside them: ``names`` (``row``,
    ``patch_index``, ``reason``, ``warnings`` …) or ``prefix`` + number (the feature columns)."""
    for column in columns:
        text = str(column)
        if text in names:
            raise OutputError(
                f"manifest {source}: column {text!r} is one medfm writes itself; rename it in the manifest"
            )
        if prefix and text.startswith(prefix) and text[len(prefix) :].isdigit():
            raise OutputError(
                f"manifest {source}: column {text!r} collides with the feature columns {prefix}<i> (an earlier "
                "extraction's output?); give another --column-prefix, or rename or drop those columns"
            )


@contextlib.contextmanager
def output_lock(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``.NAME.lock`` beside ``target`` while writing it: a second writer is refused, naming the process
    (PID, host) that holds it; a lock left by a process of this host that no longer runs is taken over."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = target.parent / f".{target.name}.lock"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder is not None and holder.get("host") == me["host"] and not _alive(holder.get("pid")):
                lock.unlink(missing_ok=True)  # its process is gone: take the lock over
                continue
            who = (
                f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started')})"
                if holder
                else "another process"
            )
            raise OutputError(
                f"{target} is being written by {who}; wait for it to finish, or remove {lock} if it is gone"
            ) from None
        except OSError as err:
            raise write_failure(lock, err) from None
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
        break
    else:  # pragma: no cover - another process kept taking the lock between our attempts
        raise OutputError(f"{target}: could not take {lock}")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict | None:
    try:
        holder = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _alive(pid: object) -> bool:
    """Whether a process of this host runs with ``pid``."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
