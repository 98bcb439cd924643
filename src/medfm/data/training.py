"""Training data over a patch store: seeded augmented views, and a sampler that shards epochs across ranks.

Every random choice of an item comes from (seed, epoch, index), so the same run gives the same views whatever the
number of loader workers or ranks, and each epoch gives new ones. The sampler yields ``(index, epoch)`` pairs and
splits each epoch's permutation between the processes of a distributed run itself (equal shares, so every rank
takes the same number of steps).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Sampler

from medfm.data.augment import ViewPipeline
from medfm.data.store import PatchStore
from medfm.errors import ConfigError

NO_LABEL = -1


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) when none is running."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class EpochSampler(Sampler):
    """Seeded per-epoch shuffling, sharded over the ranks of the default process group; yields (index, epoch).

    With ``weights`` each epoch draws ``size`` indices with replacement in proportion to them (oversampling).
    """

    def __init__(
        self, size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = True, weights: np.ndarray | None = None
    ) -> None:
        self.size = size
        self.weights = None if weights is None else np.asarray(weights, dtype=float) / np.sum(weights)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer at the start of each epoch."""
        self.epoch = epoch

    def _world(self) -> tuple[int, int]:
        return world()

    def __len__(self) -> int:
        _, world = self._world()
        return self.size // world if self.drop_last else -(-self.size // world)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        rank, world = self._world()
        order = np.arange(self.size)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is not None:
            order = rng.choice(self.size, size=self.size, replace=True, p=self.weights)
        elif self.shuffle:
            order = rng.permutation(self.size)
        if self.drop_last:
            order = order[: len(order) // world * world]
        else:
            order = np.resize(order, -(-len(order) // world) * world)  # repeats the start, even past n < world
        for index in order[rank::world]:
            yield int(index), self.epoch


def mined_turn(pool: int, seed: int, epoch: int, entry: int) -> int:
    """Which of an entry's ``pool`` mined patches serves ``epoch``: every ``pool`` epochs serve each one once, in a
    seeded order, so a pool as large as the number of epochs gives a fresh patch every epoch (as FMCIB draws)."""
    cycle, turn = divmod(epoch, pool)
    return int(np.random.default_rng([seed, entry, cycle]).permutation(pool)[turn])


class StoreViews(Dataset):
    """Items of a patch store: ``views`` augmented views of the patch (and of one mined negative, see
    :func:`mined_turn`), with labels
    and, when given, float ``targets`` per store entry (regression values, survival time and event)."""

    def __init__(
        self,
        store: PatchStore,
        view: ViewPipeline,
        indices: np.ndarray | None = None,
        views: int = 2,
        mined: bool = False,
        labels: np.ndarray | None = None,
        seed: int = 0,
        targets: np.ndarray | None = None,
    ) -> None:
        if mined and store.negatives is None:
            raise ConfigError("mined negatives asked for, but the store has none (build it with negatives > 0)")
        self.store = store
        self.view = view
        self.indices = np.arange(len(store)) if indices is None else np.asarray(indices)
        self.views = views
        self.mined = mined
        labels = store.labels if labels is None else labels
        self.labels = None if labels is None else np.asarray(labels)
        self.seed = seed
        self.targets = None if targets is None else np.asarray(targets, dtype=np.float32)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        entry = int(self.indices[index])
        seeds = np.random.SeedSequence([self.seed, epoch, entry]).generate_state(2 * self.views + 1)
        patch = np.array(self.store.patches[entry])  # a writable copy out of the read-only map
        item = {
            "views": torch.from_numpy(np.stack([self.view(patch, int(seeds[v])) for v in range(self.views)])),
            "index": torch.tensor(entry),
            "label": torch.tensor(NO_LABEL if self.labels is None else int(self.labels[entry])),
        }
        if self.targets is not None:  # float targets per store entry: (value,) for regression, (time, event)
            item["target"] = torch.from_numpy(np.atleast_1d(self.targets[entry]).astype(np.float32))
        if self.mined:
            negatives = self.store.negatives[entry]
            chosen = np.array(negatives[mined_turn(len(negatives), self.seed, epoch, entry)])
            item["negatives"] = torch.from_numpy(
                np.stack([self.view(chosen, int(seeds[self.views + v])) for v in range(self.views)])
            )
        return item


def encode_labels(values: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Class indices of a label column (sorted class names; missing labels are -1) and the class names."""
    present = values.dropna()
    classes = sorted(present.unique().tolist())
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.array([NO_LABEL if pd.isna(v) else lookup[v] for v in values], dtype=np.int64)
    return codes, [str(c) for c in classes]
