"""Datasets that read each volume once and cut the patches of all the rows that point at it."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from medfm.data.images2d import intensity_warning2d, preprocess2d, read_image2d
from medfm.data.io import (
    Geometry,
    Volume,
    dicom_stack,
    read_geometry,
    read_region,
    read_stack_region,
    read_volume,
)
from medfm.data.manifest import Manifest
from medfm.data.nifti import form_disagreement, nonfinite_voxels
from medfm.data.patches import PatchPlan, plan_patch, sample_patch, source_region
from medfm.data.profiles import Profile, Profile2D
from medfm.errors import ConfigError, MedfmError, RowError

if TYPE_CHECKING:  # torch is imported only where reader processes or tensors are asked for: `medfm crop` runs without
    import torch


@dataclass
class VolumeItem:
    """The patches of one volume: good rows with their patch and geometry, bad rows with a reason, and good rows
    whose patch deserves a look with a warning (e.g. a seed outside the volume, padded as FMCIB)."""

    rows: list[int] = field(default_factory=list)
    patches: list[np.ndarray] = field(default_factory=list)
    geometries: list[Geometry | None] = field(default_factory=list)  # None for 2D images
    errors: dict[int, str] = field(default_factory=dict)
    warning: str | None = None  # shown once a run (the intensity check)
    notices: list[str] = field(default_factory=list)  # shown for every file (e.g. disagreeing qform and sform)
    flags: dict[int, str] = field(default_factory=dict)  # good rows read under an opt-in (irregular series, NaN)
    # or whose seed lies outside the volume (profile fmcib pads the patch as FMCIB)


NON_FINITE = ("refuse", "pad")  # what to do with NaN/Inf voxels where a patch is sampled


class VolumePatches:
    """One item per volume (or 2D image): it is read once and every row that points at it gets its patch.

    A map-style dataset (``len`` and indexing), as torch's ``DataLoader`` takes it; plain Python otherwise.
    """

    def __init__(
        self,
        manifest: Manifest,
        profile: Profile | Profile2D,
        rows: list[int] | None = None,
        irregular_series: str = "refuse",
        non_finite: str = "refuse",
    ) -> None:
        if non_finite not in NON_FINITE:
            raise ValueError(f"non_finite={non_finite!r}; allowed {NON_FINITE}")
        self.manifest = manifest
        self.profile = profile
        self.irregular_series = irregular_series
        self.non_finite = non_finite
        todo = [r for r in (range(len(manifest)) if rows is None else rows) if r not in manifest.row_errors]
        self.groups = manifest.volumes(todo)

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, index: int) -> VolumeItem:
        path, uid, rows = self.groups[index]
        if isinstance(self.profile, Profile2D):
            return self._image(path, rows)
        item = VolumeItem()
        plans: dict[int, PatchPlan] = {}
        try:
            # Plan from the header, then read only the box the patches need: of a file, or of the slices of an evenly
            # spaced DICOM stack. Any other DICOM series is read whole.
            irregular = self.irregular_series
            stack = dicom_stack(path, uid, irregular) if os.path.isdir(path) else None
            volume = read_volume(path, uid, irregular) if os.path.isdir(path) and stack is None else None
            geometry = volume.geometry if volume else stack.geometry if stack else read_geometry(path)
            if notice := (None if os.path.isdir(path) else form_disagreement(path, geometry.matrix)):
                item.notices.append(notice)
            for row in rows:
                try:
                    plans[row] = plan_patch(
                        geometry, self.manifest.seeds_lps[row], self.profile, self.manifest.seed_as_given(row)
                    )
                except MedfmError as err:
                    item.errors[row] = str(err)
            if plans and volume is None:
                box = source_region(geometry, list(plans.values()))
                volume = read_stack_region(stack, *box) if stack else read_region(path, *box)
        except MedfmError as err:
            reason = str(getattr(err, "reason", err))
            item.errors.update({r: reason for r in rows if r not in item.errors})
            return item
        if volume is None:
            return item
        bad = self._nonfinite(path, volume, geometry)
        item.warning = self.profile.intensity_warning(volume.array)
        for row, plan in plans.items():
            if volume.note:
                item.flags[row] = f"read anyway: {volume.note}; slices interpolated by position"
            if len(bad):
                start, size = source_region(geometry, [plan])
                inside = bad[np.all((bad >= start) & (bad < np.add(start, size)), axis=1)]
                if len(inside):
                    what = (f"{len(inside)} NaN/Inf voxel{'s' if len(inside) > 1 else ''} where the patch is sampled "
                            f"(first at voxel {tuple(int(v) for v in inside[0])})")  # fmt: skip
                    if self.non_finite == "refuse":
                        item.errors[row] = (
                            f"{what}; --non-finite pad reads them as {self.profile.pad_hu:g} and flags the row"
                        )
                        continue
                    item.flags[row] = "; ".join(
                        filter(None, [item.flags.get(row), f"{what}, padded with {self.profile.pad_hu:g}"])
                    )
            try:
                patch = sample_patch(volume, plan, self.profile)
            except MedfmError as err:  # a patch the profile cannot scale (e.g. z-scored with no voxel above 0)
                item.errors[row] = str(err)
                continue
            item.patches.append(patch)
            item.geometries.append(plan.geometry)
            item.rows.append(row)
            if plan.warning:  # a seed outside the volume, padded as FMCIB
                item.flags[row] = "; ".join(filter(None, [item.flags.get(row), plan.warning]))
        return item

    def _nonfinite(self, path: str, volume: Volume, whole: Geometry) -> np.ndarray:
        """(x, y, z) indices (in ``whole``, the file's grid) of the NaN/Inf voxels of what was read; in the array they
        become ``pad_hu``. They survive in the array for most formats; ITK reads them as 0 from NIfTI, so a float NIfTI
        file is scanned for them itself."""
        offset = np.rint(whole.world_to_index(np.asarray(volume.geometry.origin))).astype(int)
        found = [np.argwhere(~np.isfinite(volume.array))[:, ::-1] + offset] if volume.array.dtype.kind == "f" else []
        hidden = None if os.path.isdir(path) else nonfinite_voxels(path)
        if hidden is not None:
            found.append(hidden)
        if not sum(len(f) for f in found):
            return np.zeros((0, 3), dtype=int)
        bad = np.unique(np.concatenate(found), axis=0)
        local = bad - offset
        local = local[np.all((local >= 0) & (local < np.asarray(volume.array.shape[::-1])), axis=1)]
        if volume.array.dtype.kind != "f":
            volume.array = volume.array.astype(np.float32)
        volume.array[local[:, 2], local[:, 1], local[:, 0]] = self.profile.pad_hu
        return bad

    def _image(self, path: str, rows: list[int]) -> VolumeItem:
        """A 2D image: read once, shaped by the profile, shared by its rows (no geometry)."""
        item = VolumeItem()
        try:
            image = read_image2d(path)
        except MedfmError as err:
            item.errors = {r: str(getattr(err, "reason", err)) for r in rows}
            return item
        item.warning = intensity_warning2d(image)
        patch = preprocess2d(image, self.profile)
        for row in rows:
            item.rows.append(row)
            item.patches.append(patch)
            item.geometries.append(None)
        return item


def auto_workers(device_type: str = "cpu") -> int:
    """Reader processes worth starting: none when the network runs on the CPU (it already uses every core and
    cutting costs a few ms a patch), else up to four, leaving a core for the main process."""
    if device_type == "cpu":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _keep(item: VolumeItem) -> VolumeItem:
    return item


def iter_volume_items(
    manifest: Manifest,
    profile: Profile,
    rows: list[int] | None = None,
    num_workers: int = 0,
    on_error: str = "raise",
    irregular_series: str = "refuse",
    non_finite: str = "refuse",
) -> Iterator[VolumeItem]:
    """Yield the patches volume by volume, reading ahead in ``num_workers`` processes.

    With ``on_error='raise'`` the first bad row (from the manifest checks, then from reading) raises
    :class:`RowError`; with ``'skip'`` bad rows are reported in each item's ``errors``. ``irregular_series='resample'``
    reads DICOM series with gaps or changing spacing and ``non_finite='pad'`` pads NaN/Inf voxels; such rows are
    named in each item's ``flags``.
    """
    if on_error not in ("raise", "skip"):
        raise ConfigError(f"on_error={on_error!r}; allowed 'raise' or 'skip'")
    wanted = set(range(len(manifest)) if rows is None else rows)
    early = {r: reason for r, reason in manifest.row_errors.items() if r in wanted}
    if early and on_error == "raise":
        row = min(early)
        raise RowError(row, manifest.paths[row] or "<empty>", early[row])
    if early:
        yield VolumeItem(errors=early)
    dataset = VolumePatches(manifest, profile, rows, irregular_series=irregular_series, non_finite=non_finite)
    if num_workers > 0:  # reader processes through torch's DataLoader; in this process a plain loop (no torch)
        from torch.utils.data import DataLoader

        loader = DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=num_workers,
            collate_fn=_keep,
            prefetch_factor=2,
            persistent_workers=False,
        )
    else:
        loader = (dataset[i] for i in range(len(dataset)))
    warned = False
    for item in loader:
        if item.errors and on_error == "raise":
            row = min(item.errors)
            raise RowError(row, manifest.paths[row], item.errors[row])
        for notice in item.notices:
            warnings.warn(notice, stacklevel=2)
        if item.warning and not warned:
            warnings.warn(
                f"{item.warning} (first seen in {manifest.paths[item.rows[0]] if item.rows else ''})", stacklevel=2
            )
            warned = True
        yield item


def stack_patches(patches: list[np.ndarray]) -> torch.Tensor:
    """Stack (C, Z, Y, X) patches into one float32 batch tensor."""
    import torch

    return torch.from_numpy(np.stack(patches).astype(np.float32, copy=False))
