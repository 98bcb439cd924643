"""Training data over a patch store: seeded augmented views of each entry, and label encoding.

Every random choice of an item comes from (seed, epoch, index), so the same run gives the same views whatever the
number of loader workers or ranks, and each epoch gives new ones. Items are addressed by ``(index, epoch)`` pairs,
which :class:`medfm.train.sampler.EpochSampler` yields (the sharding over ranks lives in ``train/``: ``data/``
knows no process groups).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from medfm.data.augment import ViewPipeline
from medfm.data.labels import clean_labels
from medfm.data.store import PatchStore
from medfm.errors import ConfigError

NO_LABEL = -1


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


def encode_labels(values: pd.Series, missing: Sequence[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """Class indices of a label column (sorted class names) and the class names; missing labels (empty, or one of
    ``missing``, default :data:`~medfm.data.labels.MISSING_LABELS`: 'NA', 'unknown', …) are -1."""
    present, absent = clean_labels(values, missing)
    classes = sorted(present.unique().tolist())
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.full(len(values), NO_LABEL, dtype=np.int64)
    codes[~absent] = [lookup[v] for v in present]
    return codes, [str(c) for c in classes]


_MOVED = {"world": "medfm.train.sampler", "EpochSampler": "medfm.train.sampler"}


def __getattr__(name: str) -> object:
    """Deprecated names that moved to ``train/`` (they go in the next release)."""
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    warnings.warn(
        f"medfm.data.training.{name} moved to {_MOVED[name]}.{name}; the old name goes in the next release",
        DeprecationWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(_MOVED[name]), name)
