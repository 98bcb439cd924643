"""Fine-tuning data: a labelled manifest cut once into a patch store, split by patient, served as seeded views.

Targets by task: ``binary``/``multiclass`` — class indices of ``label_column`` (sorted class names);
``regression`` — the float ``label_column``; ``survival`` — ``time_column`` and ``event_column``. Splits come from
``split_column`` (train/val/test) or, without one, from seeded, stratified, patient-grouped hold-outs
(``group_column``); ``train_fraction`` keeps a seeded, stratified share of the training rows (whole patients).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from medfm.data.augment import build_view, default_view
from medfm.data.labels import check_classes, clean_labels
from medfm.data.manifest import read_manifest
from medfm.data.profiles import Profile2D, get_profile
from medfm.data.splits import assign_splits, subsample
from medfm.data.store import PatchStore, build_store, open_store
from medfm.data.training import StoreViews, encode_labels
from medfm.errors import ConfigError, ManifestError
from medfm.models.hub import medfm_home
from medfm.train.data import StoreDataModule

TASKS = ("binary", "multiclass", "regression", "survival")


class FinetuneData(StoreDataModule):
    """Labelled manifest → patch store → train (augmented) / val / test (centre) views.

    Args:
        manifest: CSV/Parquet of 3D seeds or 2D images with the target columns; ``store``: a prebuilt store
            (from ``store_from_arrays``; its labels and splits are used).
        task: ``binary``, ``multiclass``, ``regression`` or ``survival``.
        label_column: class label (classification) or value (regression).
        label_missing: class labels that mean missing (default: empty, NA, N/A, nan, none, null, unknown, ?, -):
            those rows are left out of every split (``n_missing_labels`` counts them).
        time_column, event_column: survival time and event (1 = event, 0 = censored).
        split_column: train/val/test per row; else hold-outs grouped by ``group_column`` (seeded by ``split_seed``).
        train_fraction, fraction_seed: keep a stratified, seeded share of the training rows.
        oversample: draw training rows with probabilities that balance the classes (instead of class weights).
        view / eval_view: augmentations of training / evaluation views (defaults: the light fine-tuning view of
            :func:`medfm.data.augment.default_view` and the centre crop).
    """

    def __init__(
        self,
        manifest: str | None = None,
        store: str | None = None,
        task: str = "binary",
        profile: str = "fmcib",
        coords: str = "lps",
        label_column: str | None = "label",
        label_missing: list[str] | None = None,
        time_column: str | None = None,
        event_column: str | None = None,
        split_column: str | None = None,
        group_column: str | None = None,
        split_seed: int = 0,
        train_fraction: float = 1.0,
        fraction_seed: int = 0,
        oversample: bool = False,
        margin: int = 0,
        view: list[dict] | None = None,
        eval_view: list[dict] | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        if (manifest is None) == (store is None):
            raise ConfigError("give exactly one of data.manifest or data.store")
        if task not in TASKS:
            raise ConfigError(f"task={task!r}; allowed {TASKS}")
        if task == "survival" and (time_column is None or event_column is None):
            raise ConfigError("task survival needs data.time_column and data.event_column")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.store: PatchStore | None = None
        self.classes: list[str] | None = None
        self.targets: np.ndarray | None = None
        self.group_codes: np.ndarray | None = None
        self.n_missing_labels = 0
        self.manifest_table: pd.DataFrame | None = None  # the manifest's rows (None for a prebuilt store)

    def _build(self, progress: bool) -> PatchStore:
        hp = self.hparams
        if hp.store is not None:
            store = open_store(hp.store)
            if store.splits is None or store.labels is None:
                raise ConfigError(f"store {hp.store} has no labels or splits (store_from_arrays(labels=, splits=))")
            if hp.task in ("regression", "survival"):
                raise ConfigError("a prebuilt store holds class labels only; regression and survival need a manifest")
            self.classes = [str(c) for c in np.unique(store.labels)]
            store.splits = self._fraction(store.splits.astype(str), store.labels, None)
            return store
        profile = get_profile(hp.profile)
        manifest = read_manifest(hp.manifest, coords=hp.coords, seeds=not isinstance(profile, Profile2D))
        root = Path(hp.cache_dir) if hp.cache_dir else medfm_home() / "stores"
        store = build_store(manifest, profile, root, hp.margin, 0, hp.seed, None, hp.on_error, progress=progress)
        table = manifest.table.iloc[store.rows]  # indexed by manifest row, so errors name the row
        self.manifest_table = manifest.table
        strata = self._targets(table, store)
        groups = table[hp.group_column].astype(str).to_numpy() if hp.group_column else None
        splits = assign_splits(table, strata, hp.split_column, groups, hp.split_seed)
        store.splits = self._fraction(splits, strata, groups)
        if self.n_missing_labels:  # rows without a label take part in no split
            store.splits = np.where(store.labels < 0, "unlabelled", store.splits)
        if groups is not None:  # per store entry: the test bootstrap resamples whole patients
            self.group_codes = np.unique(groups, return_inverse=True)[1]
        return store

    def _targets(self, table: pd.DataFrame, store: PatchStore) -> np.ndarray:
        """Set the store's labels / this module's float targets; returns the strata of stratified splits."""
        hp = self.hparams
        needed = [hp.time_column, hp.event_column] if hp.task == "survival" else [hp.label_column]
        for column in needed:
            if column is None or column not in table.columns:
                raise ManifestError(f"task {hp.task} needs column {column!r}, which is not in {hp.manifest}")
        if hp.task in ("binary", "multiclass"):
            store.labels, self.classes = encode_labels(table[hp.label_column], hp.label_missing)
            self.n_missing_labels = int(np.sum(store.labels < 0))
            if self.n_missing_labels == len(store.labels):
                raise ManifestError(f"no row of {hp.manifest} has a {hp.label_column} label")
            check_classes(clean_labels(table[hp.label_column], hp.label_missing)[0].to_numpy(), hp.label_column)
            if hp.task == "binary" and len(self.classes) != 2:
                raise ManifestError(f"task binary needs 2 classes in {hp.label_column}, found {self.classes}")
            return store.labels
        if hp.task == "regression":
            values = pd.to_numeric(table[hp.label_column], errors="coerce").to_numpy(dtype=float)
            self._check_finite(values, hp.label_column, store)
            self.targets = values[:, None]
            return np.zeros(len(values), dtype=int)
        time = pd.to_numeric(table[hp.time_column], errors="coerce").to_numpy(dtype=float)
        event = pd.to_numeric(table[hp.event_column], errors="coerce").to_numpy(dtype=float)
        self._check_finite(time, hp.time_column, store)
        self._check_finite(event, hp.event_column, store)
        self.targets = np.stack([time, event], axis=1)
        return (event > 0).astype(int)

    @staticmethod
    def _check_finite(values: np.ndarray, column: str, store: PatchStore) -> None:
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            raise ManifestError(f"row {int(store.rows[bad[0]])}: {column} is not a number")

    def _fraction(self, splits: np.ndarray, strata: np.ndarray, groups: np.ndarray | None) -> np.ndarray:
        """Training rows outside the kept fraction become ``unused``."""
        hp = self.hparams
        train = np.flatnonzero(splits == "train")
        kept = subsample(train, np.asarray(strata), groups, hp.train_fraction, hp.fraction_seed)
        out = splits.astype(object)
        out[np.setdiff1d(train, kept)] = "unused"
        return out.astype(str)

    def dataset(self, split: str, train: bool = False) -> StoreViews:
        """Views of one split: augmented for training, the centre view otherwise."""
        assert self.store is not None
        hp = self.hparams
        kind = "finetune" if train else "eval"
        spec = (hp.view if train else hp.eval_view) or default_view(self.store.dims, self.view_size, kind)
        indices = self.store.indices(split)
        return StoreViews(
            self.store, build_view(spec, self.store.dims), indices, 1, False, seed=hp.seed, targets=self.targets
        )

    def class_counts(self) -> np.ndarray:
        """Training samples per class (classification)."""
        labels = self.store.labels[self.store.indices("train")]
        return np.bincount(labels, minlength=len(self.classes or []))

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or class-balanced, with ``oversample``) training views, sharded over ranks."""
        hp = self.hparams
        dataset = self.dataset("train", train=True)
        if len(dataset) == 0:
            raise ConfigError("no training rows (check the split column and train_fraction)")
        weights = None
        if hp.oversample and hp.task in ("binary", "multiclass"):
            labels = self.store.labels[dataset.indices]
            weights = 1.0 / np.bincount(labels)[labels]
        return self._loader(dataset, train=True, weights=weights)

    def val_dataloader(self) -> DataLoader:
        """Centre views of the validation rows."""
        return self._loader(self.dataset("val"), train=False)

    def test_dataloader(self) -> DataLoader:
        """Centre views of the test rows."""
        return self._loader(self.dataset("test"), train=False)
