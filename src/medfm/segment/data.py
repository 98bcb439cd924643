"""Segmentation data: a mask manifest read into prepared cases, split by patient, served as seeded patches.

Training items are patches (``patch_size``; the whole image when None) drawn ``samples_per_case`` times per case and
epoch: with probability ``foreground_fraction`` centred on a voxel of a foreground class (classes drawn uniformly,
so small organs are seen as often as large ones), else anywhere, as MONAI's ``RandCropByPosNegLabeld`` does; then
seeded flips along ``flip_axes`` and an intensity jitter. Every random draw comes from (seed, epoch, item), so a run
gives the same patches whatever the number of workers or ranks. Validation and test items are whole cases (the
model slides a window over them). Splits come from ``split_column`` or seeded hold-outs that keep each patient
(``group_column``) on one side; ``train_fraction`` keeps a seeded share of the training patients.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from medfm.data.profiles import Profile2D, get_profile
from medfm.data.splits import assign_splits, subsample
from medfm.errors import ConfigError
from medfm.segment.cases import GEOMETRY_TOLERANCE, Case, CaseSet, load_cases
from medfm.segment.labels import ClassMap, class_names
from medfm.train.sampler import EpochSampler


def crop(array: np.ndarray, start: np.ndarray, size: tuple[int, ...], fill: float) -> np.ndarray:
    """The box ``start … start+size`` of the last ``len(size)`` axes, ``fill`` where it leaves the array."""
    spatial = array.shape[-len(size) :]
    out = np.full((*array.shape[: -len(size)], *size), fill, dtype=array.dtype)
    src, dst = [], []
    for s, n, extent in zip(start, size, spatial):
        a, b = max(0, int(s)), min(extent, int(s) + n)
        src.append(slice(a, max(a, b)))
        dst.append(slice(a - int(s), a - int(s) + max(0, b - a)))
    lead = (slice(None),) * (array.ndim - len(size))
    out[(*lead, *dst)] = array[(*lead, *src)]
    return out


class PatchDataset(Dataset):
    """Seeded training patches of some cases: ``samples_per_case`` items per case and epoch."""

    def __init__(
        self,
        cases: list[Case],
        positions: np.ndarray,
        patch_size: tuple[int, ...] | None,
        samples_per_case: int = 4,
        foreground_fraction: float = 0.67,
        flip_axes: list[int] | None = None,
        intensity_jitter: float = 0.0,
        seed: int = 0,
    ) -> None:
        self.cases = cases
        self.positions = np.asarray(positions, dtype=int)
        self.patch_size = None if patch_size is None else tuple(int(s) for s in patch_size)
        self.samples_per_case = int(samples_per_case)
        self.foreground_fraction = float(foreground_fraction)
        self.flip_axes = list(flip_axes or [])
        self.intensity_jitter = float(intensity_jitter)
        self.seed = seed
        self._voxels: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.positions) * self.samples_per_case

    def _class_voxels(self, position: int, cls: int) -> np.ndarray:
        key = (position, cls)
        if key not in self._voxels:
            self._voxels[key] = np.flatnonzero(self.cases[position].label.ravel() == cls)
        return self._voxels[key]

    def _centre(self, case: Case, position: int, rng: np.random.Generator) -> np.ndarray:
        shape = case.label.shape
        present = [c for c in np.unique(case.label) if c > 0]
        if present and rng.random() < self.foreground_fraction:
            voxels = self._class_voxels(position, int(rng.choice(present)))
            return np.array(np.unravel_index(int(voxels[rng.integers(len(voxels))]), shape))
        return np.array([rng.integers(n) for n in shape])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        position = int(self.positions[index // self.samples_per_case])
        case = self.cases[position]
        rng = np.random.default_rng([self.seed, epoch, index])
        image, label = case.image, case.label
        if self.patch_size is not None:
            size = np.array(self.patch_size)
            shape = np.array(label.shape)
            start = self._centre(case, position, rng) - size // 2
            inside = shape >= size  # keep the patch inside the volume where it fits; centre it where it does not
            start = np.where(inside, np.clip(start, 0, shape - size), (shape - size) // 2)
            image = crop(image, start, self.patch_size, float(image.min()))
            label = crop(label, start, self.patch_size, 0)
        for axis in self.flip_axes:
            if rng.random() < 0.5:
                image, label = np.flip(image, axis=axis + 1), np.flip(label, axis=axis)
        image = np.ascontiguousarray(image, dtype=np.float32)
        if self.intensity_jitter:
            scale, shift = 1 + self.intensity_jitter * rng.uniform(-1, 1), self.intensity_jitter * rng.uniform(-1, 1)
            image = image * np.float32(scale) + np.float32(shift)
        return {
            "image": torch.from_numpy(image),
            "label": torch.from_numpy(np.ascontiguousarray(label))[None],
            "index": torch.tensor(position),
        }


class CaseDataset(Dataset):
    """Whole cases (validation, test): image, label, spacing (mm, array order) and position."""

    def __init__(self, cases: list[Case], positions: np.ndarray) -> None:
        self.cases = cases
        self.positions = np.asarray(positions, dtype=int)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index = key[0] if isinstance(key, tuple) else key
        position = int(self.positions[index])
        case = self.cases[position]
        return {
            "image": torch.from_numpy(case.image),
            "label": torch.from_numpy(case.label)[None],
            "spacing": torch.tensor(case.spacing, dtype=torch.float64),
            "index": torch.tensor(position),
        }


class SegmentData(pl.LightningDataModule):
    """Mask manifest → prepared cases → training patches / whole validation and test cases.

    Args:
        manifest: CSV/Parquet with ``image_path`` and ``mask_path`` (+ ``series_uid``, patient and split columns).
        classes: foreground class names (mask value i+1 → the i-th), or ``{mask value: name}`` (values sharing a
            name merge); ``label_map``: more ``{mask value: name}`` (``background`` allowed); ``unlisted``: values
            nobody names become ``background`` or are an ``error``.
        profile: 3D — a CT profile whose HU window scales intensities (``hu_window`` overrides it, clipped to
            [0, 1]); 2D — the image profile (size, resize policy, channels, normalisation).
        spacing: 3D resampling (x, y, z mm); None keeps each scan's own grid (only turned to LPS axis order).
        split_column, group_column, split_seed, test_size, val_size: splits as in fine-tuning (patients kept whole).
        train_fraction, fraction_seed: a seeded share of the training patients.
        patch_size: training patch (and sliding window) size in array order, (Z, Y, X) or (H, W); None: whole image.
        samples_per_case, foreground_fraction, flip_axes, intensity_jitter: the seeded patch sampler.
        tolerance: how far mask and image grids may differ (relative spacing, origin in voxels, direction).
        on_error: ``raise`` at the first bad row, or ``skip`` bad rows (reported in ``errors`` and errors.csv).
    """

    def __init__(
        self,
        manifest: str | None = None,
        classes: list[str] | dict[int, str] | None = None,
        label_map: dict[int, str] | None = None,
        unlisted: str = "background",
        profile: str = "fmcib",
        spacing: list[float] | None = None,
        hu_window: list[float] | None = None,
        split_column: str | None = None,
        group_column: str | None = None,
        split_seed: int = 0,
        test_size: float = 0.2,
        val_size: float = 0.2,
        train_fraction: float = 1.0,
        fraction_seed: int = 0,
        patch_size: list[int] | None = None,
        samples_per_case: int = 4,
        foreground_fraction: float = 0.67,
        flip_axes: list[int] | None = None,
        intensity_jitter: float = 0.0,
        batch_size: int = 4,
        num_workers: int = 0,
        seed: int = 0,
        tolerance: float = GEOMETRY_TOLERANCE,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        if manifest is None:
            raise ConfigError("data.manifest is required: a CSV/Parquet with image_path and mask_path columns")
        self.save_hyperparameters()
        self.class_map = ClassMap.build(classes or [], label_map, unlisted)
        self.profile = get_profile(profile)
        self.dims = 2 if isinstance(self.profile, Profile2D) else 3
        if spacing is not None and (self.dims != 3 or len(spacing) != 3):
            raise ConfigError(f"spacing {spacing}: three values (x, y, z mm), for 3D profiles only")
        if patch_size is not None and len(patch_size) != self.dims:
            raise ConfigError(f"patch_size {patch_size} must have {self.dims} values for a {self.dims}D profile")
        self.batch_size = batch_size
        self.cases: CaseSet | None = None
        self.splits: np.ndarray | None = None
        self.group_codes: np.ndarray | None = None

    @property
    def errors(self) -> dict[int, str]:
        """Bad manifest rows and why (only with ``on_error: skip``)."""
        return {} if self.cases is None else self.cases.errors

    def setup(self, stage: str | None = None) -> None:
        """Read the cases once per process and split them."""
        if self.cases is not None:
            return
        hp = self.hparams
        spacing = None if hp.spacing is None else tuple(float(s) for s in hp.spacing)
        window = None if hp.hu_window is None else tuple(hp.hu_window)
        self.cases = load_cases(
            hp.manifest, self.class_map, self.profile, spacing, window, hp.tolerance, hp.on_error, progress=False
        )
        if self.cases.errors:
            row, reason = next(iter(self.cases.errors.items()))
            warnings.warn(f"{len(self.cases.errors)} bad row(s) skipped, e.g. row {row}: {reason}", stacklevel=2)
        rows = [c.row for c in self.cases.cases]
        table = self.cases.table.iloc[rows]  # indexed by manifest row, so errors name the row
        groups = table[hp.group_column].astype(str).to_numpy() if hp.group_column else None
        strata = np.zeros(len(table), dtype=int)
        splits = assign_splits(table, strata, hp.split_column, groups, hp.split_seed, hp.test_size, hp.val_size)
        train = np.flatnonzero(splits == "train")
        kept = subsample(train, strata, groups, hp.train_fraction, hp.fraction_seed)
        splits = splits.astype(object)
        splits[np.setdiff1d(train, kept)] = "unused"
        self.splits = splits.astype(str)
        self.group_codes = None if groups is None else np.unique(groups, return_inverse=True)[1]

    @property
    def in_channels(self) -> int:
        """Channels of the network input."""
        assert self.cases is not None
        return int(self.cases.cases[0].image.shape[0])

    def positions(self, split: str) -> np.ndarray:
        """Case positions of a split (``train``, ``val``, ``test``, ``unused``)."""
        assert self.splits is not None
        return np.flatnonzero(self.splits == split)

    def sizes(self) -> dict[str, int]:
        """Cases per split."""
        return {s: int(len(self.positions(s))) for s in ("train", "val", "test", "unused")}

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        hp = self.hparams
        sampler = EpochSampler(len(dataset), shuffle=train, seed=hp.seed, drop_last=train)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else 1,
            sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=hp.num_workers,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, seeded patches of the training cases, sharded over ranks."""
        hp = self.hparams
        positions = self.positions("train")
        if len(positions) == 0:
            raise ConfigError("no training cases (check the split column and train_fraction)")
        dataset = PatchDataset(
            self.cases.cases,
            positions,
            None if hp.patch_size is None else tuple(hp.patch_size),
            hp.samples_per_case,
            hp.foreground_fraction,
            hp.flip_axes,
            hp.intensity_jitter,
            hp.seed,
        )
        return self._loader(dataset, train=True)

    def val_dataloader(self) -> DataLoader:
        """Whole validation cases, one per batch."""
        return self._loader(CaseDataset(self.cases.cases, self.positions("val")), train=False)

    def test_dataloader(self) -> DataLoader:
        """Whole test cases, one per batch."""
        return self._loader(CaseDataset(self.cases.cases, self.positions("test")), train=False)


def linked_class_names(classes: list[str] | dict[int, str] | None) -> list[str]:
    """``data.classes`` as the model's class names (LightningCLI links the two)."""
    return class_names(classes or [])
