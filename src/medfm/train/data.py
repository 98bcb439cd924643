"""What the training data modules share: a patch store built once per node and opened in every process."""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader

from medfm.data.store import PatchStore
from medfm.data.training import StoreViews
from medfm.train.sampler import EpochSampler


class StoreDataModule(pl.LightningDataModule):
    """Base of the pre-training and fine-tuning data: subclasses build (or open) ``self.store`` in ``_build``."""

    store: PatchStore | None = None
    batch_size: int = 1

    def _build(self, progress: bool) -> PatchStore:
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Build the patch store once (rank 0 of each node)."""
        self._build(progress=True)

    def setup(self, stage: str | None = None) -> None:
        """Open the store in this process."""
        if self.store is None:
            self.store = self._build(progress=False)

    @property
    def view_size(self) -> tuple[int, ...]:
        """The size of the views the network sees: the stored patch without its margin."""
        assert self.store is not None
        return tuple(s - 2 * self.store.margin for s in self.store.size)

    def _loader(self, dataset: StoreViews, train: bool, weights: np.ndarray | None = None) -> DataLoader:
        """Training: reshuffled every epoch (or drawn by ``weights``), equal shares per rank, an incomplete last
        batch dropped (batch norm cannot train on one sample). Evaluation: in order, every row on some rank."""
        sampler = EpochSampler(len(dataset), shuffle=train, seed=self.hparams.seed, drop_last=train, weights=weights)
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=train and len(dataset) > self.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
