"""``medfm crop``: cut every row's patch and write them as one array, an index, and optionally NIfTI files."""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfm.data.datasets import iter_volume_items
from medfm.data.io import Geometry, write_volume
from medfm.data.manifest import Manifest
from medfm.data.outputs import (
    WARNINGS_COLUMN,
    WRITE_ERRORS,
    atomic_path,
    check_columns_free,
    check_free_space,
    check_output,
    output_lock,
    with_warnings,
    write_errno,
    write_errors,
    write_failure,
    write_json,
    write_table,
)
from medfm.data.profiles import Profile, Profile2D, get_profile
from medfm.errors import MedfmError
from medfm.progress import progress_bar

CROP_COLUMNS = ("row", "patch_index", WARNINGS_COLUMN, "reason")  # what crop writes beside the manifest's columns


@dataclass
class CropResult:
    """Where ``crop_manifest`` wrote its outputs and how many rows made it."""

    patches: Path
    index: Path
    n_written: int
    errors: dict[int, str]
    errors_file: Path | None
    nifti_dir: Path | None


def crop_manifest(
    manifest: Manifest,
    profile: str | Profile | Profile2D,
    out_dir: str | os.PathLike[str],
    nifti: bool = False,
    on_error: str = "raise",
    num_workers: int = 0,
    progress: bool = True,
    irregular_series: str = "refuse",
    non_finite: str = "refuse",
) -> CropResult:
    """Write ``patches.npy`` (N, C, Z, Y, X) — (N, C, H, W) for 2D profiles — float32 in row order, and ``index.csv``.

    Rows read under ``irregular_series='resample'`` or ``non_finite='pad'``, and seeds outside the volume that profile
    ``fmcib`` pads as FMCIB, say so in a ``warnings`` column.
    """
    profile = get_profile(profile)
    if nifti and isinstance(profile, Profile2D):
        raise MedfmError(f"profile {profile.name} is 2D: --nifti writes 3D patches only")
    out = check_output(out_dir, folder=True)
    check_columns_free(manifest.table.columns, CROP_COLUMNS, None, manifest.source)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out / "patches.npy"):  # a second crop into this folder is refused while this one runs
        return _crop(manifest, profile, out, nifti, on_error, num_workers, progress, irregular_series, non_finite)


def _crop(
    manifest: Manifest,
    profile: Profile | Profile2D,
    out: Path,
    nifti: bool,
    on_error: str,
    num_workers: int,
    progress: bool,
    irregular_series: str,
    non_finite: str,
) -> CropResult:
    nifti_dir = out / "nifti" if nifti else None
    if nifti_dir:
        nifti_dir.mkdir(exist_ok=True)
    candidates = [r for r in range(len(manifest)) if r not in manifest.row_errors]
    slot = {row: i for i, row in enumerate(candidates)}
    shape = (profile.channels, *profile.size)
    needed = len(candidates) * int(np.prod(shape)) * 4
    final = out / "patches.npy"
    check_free_space(out, needed, final)
    errors: dict[int, str] = {}
    done: list[int] = []
    flags: dict[int, str] = {}
    fd, name = tempfile.mkstemp(prefix=".patches.", suffix=".staging.npy", dir=out)  # unique: never another run's
    os.close(fd)
    staging = Path(name)
    try:
        staged = np.lib.format.open_memmap(staging, mode="w+", dtype=np.float32, shape=(len(candidates), *shape))
        _reserve(staging)
        with progress_bar(progress) as bar:
            task = bar.add_task("cropping", total=len(manifest))
            for item in iter_volume_items(
                manifest, profile, num_workers=num_workers, on_error=on_error,
                irregular_series=irregular_series, non_finite=non_finite,
            ):  # fmt: skip
                errors.update(item.errors)
                flags.update(item.flags)
                for row, patch, geometry in zip(item.rows, item.patches, item.geometries):
                    staged[slot[row]] = patch
                    done.append(row)
                    if nifti_dir:
                        _write_nifti(patch, geometry, nifti_dir, row)
                bar.advance(task, len(item.rows) + len(item.errors))
        done.sort()
        with atomic_path(final) as tmp:
            if len(done) == len(candidates):
                staged.flush()
                del staged
                os.replace(staging, tmp)
            else:  # keep only the good rows, still in manifest order
                compact = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(len(done), *shape))
                _reserve(tmp)
                for i, row in enumerate(done):
                    compact[i] = staged[slot[row]]
                compact.flush()
                del compact, staged
    except OSError as err:
        if write_errno(err) not in WRITE_ERRORS:
            raise
        raise write_failure(final, err, needed) from None
    finally:
        if staging.exists():
            staging.unlink()
    index = manifest.table.iloc[done].copy()
    index.insert(0, "patch_index", np.arange(len(done)))
    index.insert(0, "row", done)
    index_path = write_table(with_warnings(index, done, flags), out / "index.csv")
    write_json(
        {"profile": profile.to_dict(), "manifest": manifest.source, "coords": manifest.coords}, out / "crop.json"
    )
    errors_file = write_errors(manifest.table, errors, out / "patches.csv")
    return CropResult(final, index_path, len(done), errors, errors_file, nifti_dir)


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks now: a full disk is an error here, not a SIGBUS mid-run."""
    with open(path, "r+b") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # a file system that cannot
                raise


def _write_nifti(patch: np.ndarray, geometry: Geometry, folder: Path, row: int) -> None:
    for c in range(patch.shape[0]):
        name = f"row_{row:06d}" + (f"_c{c}" if patch.shape[0] > 1 else "") + ".nii.gz"
        write_volume(patch[c], geometry, folder / name)
