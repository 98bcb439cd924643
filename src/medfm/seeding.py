"""Seeded randomness that never touches the caller's generators.

A seeded step (building a network with random init, a seeded augmentation) runs with torch's CPU generator
forked and seeded, and the caller's generator state is restored afterwards, as timm and scikit-learn do: in
``torch.manual_seed(s); net = create(...); head = nn.Linear(...)`` the head still depends on ``s``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded with ``seed``; the caller's RNG state is restored after."""
    with torch.random.fork_rng(devices=[]):
        # default_generator only: torch.manual_seed would also (lazily) reseed CUDA, outside what fork_rng restores
        torch.default_generator.manual_seed(int(seed))
        yield
