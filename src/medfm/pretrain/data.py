"""The pre-training data: a manifest (3D seeds or 2D images) cut once into a patch store, served as seeded views.

``prepare_data`` (one process per node) builds the store; ``setup`` opens it in every process. Training items
carry two augmented views (and two views of a mined negative when asked); validation items carry the centre view
of the labelled validation rows for the kNN monitor.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from medfm.data.augment import build_view, default_view
from medfm.data.manifest import read_manifest
from medfm.data.profiles import Profile2D, get_profile
from medfm.data.store import PatchStore, build_store, open_store
from medfm.data.training import StoreViews, encode_labels
from medfm.errors import ConfigError
from medfm.models.hub import medfm_home
from medfm.train.data import StoreDataModule


class PretrainData(StoreDataModule):
    """Manifest → patch store → seeded views, sharded over ranks by :class:`EpochSampler`.

    Args:
        manifest: CSV/Parquet of 3D seeds (``image_path, coordX, coordY, coordZ``) or 2D images (``image_path``).
        store: an existing patch store folder instead of a manifest (e.g. from ``store_from_arrays``).
        profile: preprocessing profile name (3D: ``fmcib``; 2D: ``gray-224``, …); its size is the views' size.
        coords: ``lps``, ``ras`` or ``voxel`` seeds (3D manifests).
        label_column: labels for SupCon, supervised pre-training and the kNN monitor.
        split_column: rows whose value is ``train_split`` train, ``val_split`` feed the monitor; others are unused.
        margin: voxels cached around each patch for the crop augmentation.
        mined_negatives: patches cached per row from elsewhere in the same scan (SimCLR with mined negatives).
        view: the augmentation of training views as a list of ops (default: the SimCLR-style view of
            :func:`medfm.data.augment.default_view`); ``eval_view`` the validation view (default: centre crop).
        cache_dir: where stores live (default ``$MEDFM_HOME/stores``).
    """

    def __init__(
        self,
        manifest: str | None = None,
        store: str | None = None,
        profile: str = "fmcib",
        coords: str = "lps",
        label_column: str | None = None,
        split_column: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        margin: int = 0,
        mined_negatives: int = 0,
        view: list[dict] | None = None,
        eval_view: list[dict] | None = None,
        views: int = 2,
        batch_size: int = 32,
        num_workers: int = 0,
        cache_dir: str | None = None,
        seed: int = 0,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        if (manifest is None) == (store is None):
            raise ConfigError("give exactly one of data.manifest or data.store")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.store: PatchStore | None = None
        self.classes: list[str] | None = None

    def _build(self, progress: bool) -> PatchStore:
        hp = self.hparams
        if hp.store is not None:
            return open_store(hp.store)
        profile = get_profile(hp.profile)
        manifest = read_manifest(hp.manifest, coords=hp.coords, seeds=not isinstance(profile, Profile2D))
        rows = None
        if hp.split_column is not None:
            split = manifest.table[hp.split_column].astype(str)
            rows = [int(r) for r in np.flatnonzero(split.isin([hp.train_split, hp.val_split]).to_numpy())]
        root = Path(hp.cache_dir) if hp.cache_dir else medfm_home() / "stores"
        store = build_store(
            manifest, profile, root, hp.margin, hp.mined_negatives, hp.seed, rows, hp.on_error, progress=progress
        )
        table = manifest.table.iloc[store.rows]
        if hp.label_column is not None:
            store.labels, self.classes = encode_labels(table[hp.label_column])
        if hp.split_column is not None:
            store.splits = table[hp.split_column].astype(str).to_numpy()
        return store

    def _dataset(self, split: str, spec: list[dict], views: int, mined: bool) -> StoreViews:
        assert self.store is not None
        hp = self.hparams
        indices = self.store.indices(split if hp.split_column is not None or self.store.splits is not None else None)
        return StoreViews(self.store, build_view(spec, self.store.dims), indices, views, mined, seed=hp.seed)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, sharded training views; every rank gets the same number of full batches."""
        hp = self.hparams
        spec = hp.view or default_view(self.store.dims, self.view_size, "ssl")
        dataset = self._dataset(hp.train_split, spec, hp.views, hp.mined_negatives > 0)
        if len(dataset) < hp.batch_size:
            raise ConfigError(f"{len(dataset)} training samples, fewer than one batch of {hp.batch_size}")
        return self._loader(dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        """Centre views of the labelled validation rows (none without a split or labels)."""
        hp = self.hparams
        if self.store.labels is None or self.store.splits is None:
            return []
        spec = hp.eval_view or default_view(self.store.dims, self.view_size, "eval")
        dataset = self._dataset(hp.val_split, spec, 1, False)
        if len(dataset) == 0:
            return []
        return self._loader(dataset, train=False)
