"""A memory-mapped store of preprocessed patches, so that training epochs never re-read scans.

Each manifest row is cut once with its profile, enlarged by a margin for the crop augmentations, and written
into ``patches.npy`` (N, C, *size). For SimCLR with mined negatives, ``negatives.npy`` (N, K, C, *size) holds K
patches cut at random places of the same scan, inside the body and away from every seed of that scan (FMCIB's
explicitly mined negatives). The store's folder is named by a hash of everything that shapes its content
(the rows' files and seeds, the profile, margin, negatives and seed), so a changed manifest or profile builds a
new store and an unchanged one is reused. A build that is stopped resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medfm.data.datasets import iter_volume_items
from medfm.data.io import Volume, read_volume
from medfm.data.manifest import Manifest
from medfm.data.patches import plan_patch, sample_patch
from medfm.data.profiles import Profile, Profile2D
from medfm.errors import ConfigError, MedfmError, RowError
from medfm.progress import progress_bar

STORE_VERSION = "1"
BODY_HU = -500.0  # a negative's centre must be denser than this: inside the body, not in the air around it


@dataclass
class PatchStore:
    """Preprocessed patches (memory-mapped), the manifest row of each, and optional labels and splits."""

    root: Path
    patches: np.ndarray
    rows: np.ndarray
    negatives: np.ndarray | None = None
    labels: np.ndarray | None = None
    splits: np.ndarray | None = None
    margin: int = 0
    profile: dict | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def size(self) -> tuple[int, ...]:
        """Spatial size of the stored patches (margin included)."""
        return tuple(self.patches.shape[2:])

    @property
    def dims(self) -> int:
        """2 for images, 3 for volumes."""
        return self.patches.ndim - 2

    def indices(self, split: str | None) -> np.ndarray:
        """Positions of the entries of one split (all entries when ``split`` is None or there are no splits)."""
        if split is None or self.splits is None:
            return np.arange(len(self))
        return np.flatnonzero(self.splits == split)


def enlarged(profile: Profile | Profile2D, margin: int) -> Profile | Profile2D:
    """The profile with ``margin`` voxels (pixels) more on every side."""
    return replace(profile, size=tuple(s + 2 * margin for s in profile.size))


def store_key(
    manifest: Manifest, rows: list[int], profile: Profile | Profile2D, margin: int, negatives: int, seed: int
) -> str:
    """A hash of what shapes the store's content: files, series, seeds, profile, margin, negatives, seed."""
    digest = hashlib.sha256()
    for row in rows:
        seed_lps = manifest.seeds_lps[row] if len(manifest.seeds_lps) else ()
        digest.update(f"{manifest.paths[row]}|{manifest.series_uid(row)}|{np.round(seed_lps, 4).tolist()}\n".encode())
        path = manifest.paths[row]
        if os.path.isfile(path):
            stat = os.stat(path)
            digest.update(f"{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    meta = {"profile": profile.to_dict(), "margin": margin, "negatives": negatives, "seed": seed, "v": STORE_VERSION}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    return digest.hexdigest()[:16]


def open_store(root: str | os.PathLike[str]) -> PatchStore:
    """Open a finished store read-only (memory-mapped)."""
    root = Path(root)
    meta_path = root / "store.json"
    if not meta_path.exists():
        raise MedfmError(f"{root}: not a finished patch store (no store.json)")
    meta = json.loads(meta_path.read_text())
    negatives = root / "negatives.npy"
    labels = root / "labels.npy"
    splits = root / "splits.npy"
    return PatchStore(
        root=root,
        patches=np.load(root / "patches.npy", mmap_mode="r"),
        rows=np.load(root / "rows.npy"),
        negatives=np.load(negatives, mmap_mode="r") if negatives.exists() else None,
        labels=np.load(labels, allow_pickle=False) if labels.exists() else None,
        splits=np.load(splits, allow_pickle=False) if splits.exists() else None,
        margin=int(meta.get("margin", 0)),
        profile=meta.get("profile"),
    )


def _far_seeds(
    volume: Volume, seeds: np.ndarray, count: int, min_mm: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """``count`` LPS points inside the body of a volume, at least ``min_mm`` from every seed."""
    shape = np.asarray(volume.array.shape[::-1])  # (x, y, z)
    found: list[np.ndarray] = []
    fallback: list[tuple[float, np.ndarray]] = []
    for _ in range(400 * count):
        index = rng.uniform(0, shape - 1)
        world = volume.geometry.index_to_world(index)
        distance = float(np.min(np.linalg.norm(seeds - world, axis=1))) if len(seeds) else np.inf
        x, y, z = np.round(index).astype(int)
        inside = float(volume.array[z, y, x]) > BODY_HU
        if distance >= min_mm and inside:
            found.append(world)
            if len(found) == count:
                return found
        else:
            fallback.append((distance + (1e6 if inside else 0.0), world))
    fallback.sort(key=lambda item: -item[0])
    return found + [world for _, world in fallback[: count - len(found)]]


def build_store(
    manifest: Manifest,
    profile: Profile | Profile2D,
    root: str | os.PathLike[str],
    margin: int = 0,
    negatives: int = 0,
    seed: int = 0,
    rows: list[int] | None = None,
    on_error: str = "raise",
    progress: bool = True,
) -> PatchStore:
    """Cut every row once into a store under ``root/<key>`` (reused when it exists); returns it opened.

    Bad rows raise :class:`RowError` (``on_error='raise'``) or are left out and listed in ``errors.json``.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error={on_error!r}; allowed 'raise' or 'skip'")
    if isinstance(profile, Profile2D) and negatives:
        raise ConfigError("mined negatives need 3D scans: a 2D image has no 'elsewhere in the same scan'")
    wanted = list(range(len(manifest))) if rows is None else list(rows)
    early = {r: manifest.row_errors[r] for r in wanted if r in manifest.row_errors}
    if early and on_error == "raise":
        row = min(early)
        raise RowError(row, manifest.paths[row] or "<empty>", early[row])
    wanted = [r for r in wanted if r not in early]
    key = store_key(manifest, wanted, profile, margin, negatives, seed)
    final = Path(root) / key
    if (final / "store.json").exists():
        return open_store(final)
    work = Path(root) / f"{key}.partial"
    work.mkdir(parents=True, exist_ok=True)
    big = enlarged(profile, margin)
    shape = (len(wanted), profile.channels, *big.size)
    patches = _memmap(work / "patches.npy", shape)
    negs = _memmap(work / "negatives.npy", (len(wanted), negatives, *shape[1:])) if negatives else None
    done_path = work / "done.npy"
    done = np.load(done_path) if done_path.exists() else np.zeros(len(wanted), dtype=bool)
    errors: dict[int, str] = dict(early)
    errors_path = work / "errors.json"
    if errors_path.exists():
        errors.update({int(k): v for k, v in json.loads(errors_path.read_text()).items()})
    position = {row: i for i, row in enumerate(wanted)}
    todo = [r for r in wanted if not done[position[r]] and r not in errors]

    def record(rows: list[int]) -> None:
        """Mark rows done (or failed), flush, and save the progress so a stopped build resumes here."""
        for row in rows:
            done[position[row]] = row not in errors
        if errors and on_error == "raise":
            row = min(errors)
            raise RowError(row, manifest.paths[row], errors[row])
        patches.flush()
        if negs is not None:
            negs.flush()
        np.save(done_path, done)
        errors_path.write_text(json.dumps({str(k): v for k, v in errors.items()}))

    with progress_bar(progress) as bar:
        task = bar.add_task("caching patches", total=len(wanted), completed=len(wanted) - len(todo))
        if negs is None:  # the extraction path: ROI-first reads (only the box the patches need), 2D images too
            for item in iter_volume_items(manifest, big, rows=todo, on_error="skip"):
                for row, patch in zip(item.rows, item.patches):
                    patches[position[row]] = patch
                errors.update(item.errors)
                record(item.rows + list(item.errors))
                bar.advance(task, len(item.rows) + len(item.errors))
        else:  # mined negatives lie anywhere in the scan: read it whole, once
            # negatives keep away from every seed of a scan, also those of rows not in this store (other splits)
            lesions = {
                (path, uid): np.asarray([manifest.seeds_lps[r] for r in members if r not in manifest.row_errors])
                for path, uid, members in manifest.volumes()
            }
            for path, uid, members in manifest.volumes(todo):
                try:
                    _cut_volume(
                        manifest, path, uid, members, big, position, patches, negs, seed, errors, lesions[(path, uid)]
                    )
                except MedfmError as err:
                    errors.update({r: str(getattr(err, "reason", err)) for r in members if r not in errors})
                record(members)
                bar.advance(task, len(members))
    keep = np.flatnonzero(done)
    _finish(work, final, patches, negs, np.asarray(wanted)[keep], keep, errors, big, margin, negatives, seed)
    return open_store(final)


def _cut_volume(
    manifest: Manifest,
    path: str,
    uid: str | None,
    rows: list[int],
    profile: Profile,
    position: dict[int, int],
    patches: np.ndarray,
    negs: np.ndarray | None,
    seed: int,
    errors: dict[int, str],
    seeds: np.ndarray,
) -> None:
    """Cut the rows of one volume (and their mined negatives, away from ``seeds``) into the memory maps."""
    volume = read_volume(path, uid)
    for row in rows:
        try:
            patches[position[row]] = sample_patch(
                volume,
                plan_patch(volume.geometry, manifest.seeds_lps[row], profile, manifest.seed_as_given(row)),
                profile,
            )
        except MedfmError as err:
            errors[row] = str(err)
            continue
        if negs is None:
            continue
        rng = np.random.default_rng([seed, row])
        extent = float(np.max(np.asarray(profile.size) * np.asarray(profile.spacing[::-1])))
        for k, world in enumerate(_far_seeds(volume, seeds, negs.shape[1], extent, rng)):
            plan = plan_patch(volume.geometry, world, replace(profile, border="centred"))
            negs[position[row], k] = sample_patch(volume, plan, profile)


def _memmap(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """Open (resume) or create a float32 .npy memory map of ``shape``."""
    if path.exists():
        array = np.load(path, mmap_mode="r+")
        if array.shape == shape:
            return array
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)


def _finish(
    work: Path,
    final: Path,
    patches: np.ndarray,
    negs: np.ndarray | None,
    rows: np.ndarray,
    keep: np.ndarray,
    errors: dict[int, str],
    profile: Profile | Profile2D,
    margin: int,
    negatives: int,
    seed: int,
) -> None:
    """Write the kept entries compactly, the metadata last, then rename the folder into place."""
    tmp = work / "final"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    out = np.lib.format.open_memmap(
        tmp / "patches.npy", mode="w+", dtype=np.float32, shape=(len(keep), *patches.shape[1:])
    )
    out[:] = patches[keep]
    out.flush()
    if negs is not None:
        out_negs = np.lib.format.open_memmap(
            tmp / "negatives.npy", mode="w+", dtype=np.float32, shape=(len(keep), *negs.shape[1:])
        )
        out_negs[:] = negs[keep]
        out_negs.flush()
    np.save(tmp / "rows.npy", rows.astype(np.int64))
    (tmp / "errors.json").write_text(json.dumps({str(k): v for k, v in sorted(errors.items())}, indent=1))
    meta = {
        "version": STORE_VERSION,
        "profile": profile.to_dict(),
        "margin": margin,
        "negatives": negatives,
        "seed": seed,
    }
    (tmp / "store.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    shutil.rmtree(work, ignore_errors=True)


def _elsewhere(start: np.ndarray, room: np.ndarray, big: np.ndarray, rng: np.random.Generator) -> tuple[slice, ...]:
    """A random block of size ``big`` whose corner is at least half a block from ``start`` along one axis."""
    corner = np.array([rng.integers(0, r + 1) for r in room])
    half = big // 2
    axes = [a for a in rng.permutation(len(room)) if start[a] - half[a] >= 0 or start[a] + half[a] <= room[a]]
    if axes:
        a = axes[0]
        valid = [c for c in range(room[a] + 1) if abs(c - start[a]) >= half[a]]
        corner[a] = valid[rng.integers(len(valid))]
    else:  # the array is too small for a block apart from the centre: take the farthest one
        corner = np.where(start >= room - start, 0, room)
    return tuple(slice(int(a), int(a + b)) for a, b in zip(corner, big))


def store_from_arrays(
    images: np.ndarray,
    root: str | os.PathLike[str],
    size: tuple[int, ...],
    margin: int = 0,
    negatives: int = 0,
    labels: np.ndarray | None = None,
    splits: np.ndarray | None = None,
    seed: int = 0,
) -> PatchStore:
    """A store from arrays already scaled for the network, (N, *spatial) or (N, C, *spatial), e.g. MedMNIST.

    The centre ``size + 2·margin`` block is the patch; mined negatives are blocks of the same size at random
    places of the same array whose centre lies at least half a patch from the array's centre.
    """
    images = np.asarray(images, dtype=np.float32)
    dims = len(size)
    if images.ndim == dims + 1:
        images = images[:, None]
    if images.ndim != dims + 2:
        raise ConfigError(f"images of shape {images.shape} do not match a {dims}D size {size}")
    big = np.asarray(size) + 2 * margin
    spatial = np.asarray(images.shape[2:])
    if np.any(big > spatial):
        raise ConfigError(f"patch {tuple(big)} (size + 2·margin) is larger than the images {tuple(spatial)}")
    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    start = (spatial - big) // 2
    centre = tuple(slice(int(a), int(a + b)) for a, b in zip(start, big))
    out = np.lib.format.open_memmap(
        root / "patches.npy", mode="w+", dtype=np.float32, shape=(len(images), images.shape[1], *big.tolist())
    )
    out[:] = images[(slice(None), slice(None), *centre)]
    out.flush()
    if negatives:
        rng = np.random.default_rng(seed)
        negs = np.lib.format.open_memmap(
            root / "negatives.npy",
            mode="w+",
            dtype=np.float32,
            shape=(len(images), negatives, images.shape[1], *big.tolist()),
        )
        room = spatial - big
        for i in range(len(images)):
            for k in range(negatives):
                negs[i, k] = images[(i, slice(None), *_elsewhere(start, room, big, rng))]
        negs.flush()
    np.save(root / "rows.npy", np.arange(len(images), dtype=np.int64))
    if labels is not None:
        np.save(root / "labels.npy", np.asarray(labels).reshape(-1))
    if splits is not None:
        np.save(root / "splits.npy", np.asarray(splits).astype(str))
    meta = {"version": STORE_VERSION, "profile": None, "margin": margin, "negatives": negatives, "seed": seed}
    (root / "store.json").write_text(json.dumps(meta, indent=1))
    return open_store(root)
