"""Datasets that read each volume once and cut the patches of all the rows that point at it."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medfm.data.images2d import intensity_warning2d, preprocess2d, read_image2d
from medfm.data.io import Geometry, dicom_stack, read_geometry, read_region, read_stack_region, read_volume
from medfm.data.manifest import Manifest
from medfm.data.patches import PatchPlan, plan_patch, sample_patch, source_region
from medfm.data.profiles import Profile, Profile2D
from medfm.errors import ConfigError, MedfmError, RowError


@dataclass
class VolumeItem:
    """The patches of one volume: good rows with their patch and geometry, bad rows with a reason."""

    rows: list[int] = field(default_factory=list)
    patches: list[np.ndarray] = field(default_factory=list)
    geometries: list[Geometry | None] = field(default_factory=list)  # None for 2D images
    errors: dict[int, str] = field(default_factory=dict)
    warning: str | None = None


class VolumePatches(Dataset):
    """One item per volume (or 2D image): it is read once and every row that points at it gets its patch."""

    def __init__(self, manifest: Manifest, profile: Profile | Profile2D, rows: list[int] | None = None) -> None:
        self.manifest = manifest
        self.profile = profile
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
            stack = dicom_stack(path, uid) if os.path.isdir(path) else None
            volume = read_volume(path, uid) if os.path.isdir(path) and stack is None else None
            geometry = volume.geometry if volume else stack.geometry if stack else read_geometry(path)
            for row in rows:
                try:
                    plans[row] = plan_patch(geometry, self.manifest.seeds_lps[row], self.profile)
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
        item.warning = self.profile.intensity_warning(volume.array)
        for row, plan in plans.items():
            item.patches.append(sample_patch(volume, plan, self.profile))
            item.geometries.append(plan.geometry)
            item.rows.append(row)
        return item

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
) -> Iterator[VolumeItem]:
    """Yield the patches volume by volume, reading ahead in ``num_workers`` processes.

    With ``on_error='raise'`` the first bad row (from the manifest checks, then from reading) raises
    :class:`RowError`; with ``'skip'`` bad rows are reported in each item's ``errors``.
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
    dataset = VolumePatches(manifest, profile, rows)
    loader = DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_keep,
        prefetch_factor=2 if num_workers > 0 else None,
        persistent_workers=False,
    )
    warned = False
    for item in loader:
        if item.errors and on_error == "raise":
            row = min(item.errors)
            raise RowError(row, manifest.paths[row], item.errors[row])
        if item.warning and not warned:
            warnings.warn(
                f"{item.warning} (first seen in {manifest.paths[item.rows[0]] if item.rows else ''})", stacklevel=2
            )
            warned = True
        yield item


def stack_patches(patches: list[np.ndarray]) -> torch.Tensor:
    """Stack (C, Z, Y, X) patches into one float32 batch tensor."""
    return torch.from_numpy(np.stack(patches).astype(np.float32, copy=False))
