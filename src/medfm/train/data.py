"""What the training data modules share: a patch store built once per node and opened in every process."""

from __future__ import annotations

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from medfm.data.store import PatchStore
from medfm.data.training import EpochSampler, StoreViews


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

    def _loader(self, dataset: StoreViews, sampler: EpochSampler, drop_last: bool = False) -> DataLoader:
        """Batches of ``dataset`` in the order of ``sampler`` (sized to the dataset)."""
        sampler.size = len(dataset)
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
