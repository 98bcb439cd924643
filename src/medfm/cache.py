"""What medfm keeps in its cache folder (``$MEDFM_HOME``), and removing it: ``medfm cache list|clean``.

The cache holds published and exported weights (``weights/``), the cards of exported models (``models/``) and the
patch stores that training cuts once and reuses (``stores/``; a store without ``store.json`` is one whose build was
interrupted). Stores are derived data, cut again when needed; weights and model cards are not re-created by
themselves, so :func:`clean_cache` removes them only when asked by kind.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from medfm.errors import ConfigError
from medfm.models.hub import medfm_home

KINDS = ("store", "unfinished-store", "weights", "model")


@dataclass(frozen=True)
class CacheEntry:
    """One thing in the cache: its kind, path, size in bytes and last modification (seconds since the epoch)."""

    kind: str
    path: Path
    size: int
    modified: float


def _size(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (links not followed)."""
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _modified(path: Path) -> float:
    """The latest modification time of a file, or of a folder and anything in it."""
    times = [path.lstat().st_mtime]
    if path.is_dir():
        times += [p.lstat().st_mtime for p in path.rglob("*")]
    return max(times)


def cache_entries(home: str | Path | None = None) -> list[CacheEntry]:
    """Everything in the cache folder, by kind then name."""
    home = Path(home) if home is not None else medfm_home()
    found: list[tuple[str, Path]] = []
    stores = home / "stores"
    if stores.is_dir():
        for path in sorted(stores.iterdir()):
            if path.is_dir():
                found.append(("store" if (path / "store.json").is_file() else "unfinished-store", path))
    for kind, folder in (("weights", home / "weights"), ("model", home / "models")):
        if folder.is_dir():
            found += [(kind, path) for path in sorted(folder.iterdir()) if path.is_file() or path.is_dir()]
    return [CacheEntry(kind, path, _size(path), _modified(path)) for kind, path in found]


def clean_cache(
    kinds: Iterable[str] = ("store", "unfinished-store"),
    older_than_days: float | None = None,
    dry_run: bool = False,
    home: str | Path | None = None,
) -> list[CacheEntry]:
    """Remove the cache entries of the given kinds (last modified more than ``older_than_days`` ago, when given);
    returns what was (with ``dry_run``: what would be) removed."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"unknown cache kind(s) {unknown}; allowed {list(KINDS)}")
    if older_than_days is not None and older_than_days < 0:
        raise ConfigError(f"--older-than must be at least 0 days, got {older_than_days}")
    cutoff = None if older_than_days is None else time.time() - older_than_days * 86400
    chosen = [
        e for e in cache_entries(home) if e.kind in kinds and (cutoff is None or e.modified < cutoff)
    ]
    if not dry_run:
        for entry in chosen:
            if entry.path.is_dir() and not entry.path.is_symlink():
                shutil.rmtree(entry.path)
            else:
                entry.path.unlink()
    return chosen


def human_size(size: float) -> str:
    """Bytes as a short human-readable size (1.5 GB)."""
    unit = "B"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            break
        size /= 1000
    return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
