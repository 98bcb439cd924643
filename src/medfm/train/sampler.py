"""Which rank this process is, and which rows each rank takes: a seeded epoch sampler sharded over the ranks.

The sampler yields ``(index, epoch)`` pairs and splits each epoch's permutation between the processes of a
distributed run itself (equal shares, so every rank takes the same number of steps).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler


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
