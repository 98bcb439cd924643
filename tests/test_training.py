"""Training data: the epoch sampler (seeded shuffling, sharding over ranks) and seeded augmented views of a store."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from medfm.data.augment import build_view, default_view
from medfm.data.store import store_from_arrays
from medfm.data.training import NO_LABEL, StoreViews, mined_turn
from medfm.train.sampler import EpochSampler

# ---------------------------------------------------------------------------------------------- EpochSampler


def _shard(monkeypatch, sampler: EpochSampler, rank: int, world: int) -> list[int]:
    """The indices ``rank`` of ``world`` ranks would get (the sampler's length checked on the way)."""
    monkeypatch.setattr(EpochSampler, "_world", lambda self: (rank, world))
    pairs = list(sampler)
    assert len(pairs) == len(sampler)
    assert all(epoch == sampler.epoch for _, epoch in pairs)
    return [index for index, _ in pairs]


def test_sampler_yields_every_index_once_per_epoch_with_the_epoch():
    sampler = EpochSampler(10, seed=3)
    pairs = list(sampler)
    assert len(sampler) == 10 and len(pairs) == 10
    assert all(isinstance(i, int) and isinstance(e, int) for i, e in pairs)
    assert [e for _, e in pairs] == [0] * 10
    assert sorted(i for i, _ in pairs) == list(range(10))
    assert [i for i, _ in pairs] != list(range(10))  # shuffled
    sampler.set_epoch(4)
    pairs4 = list(sampler)
    assert [e for _, e in pairs4] == [4] * 10 and sorted(i for i, _ in pairs4) == list(range(10))


def test_sampler_order_is_seeded_by_seed_and_epoch():
    def order(seed: int, epoch: int) -> list[int]:
        sampler = EpochSampler(50, seed=seed)
        sampler.set_epoch(epoch)
        return [i for i, _ in sampler]

    assert order(1, 2) == order(1, 2)
    assert order(1, 2) == [int(i) for i in np.random.default_rng([1, 2]).permutation(50)]
    assert order(1, 3) != order(1, 2)
    assert order(2, 2) != order(1, 2)


def test_sampler_without_shuffle_is_in_order():
    sampler = EpochSampler(7, shuffle=False, drop_last=False)
    sampler.set_epoch(5)
    assert list(sampler) == [(i, 5) for i in range(7)]


def test_sampler_shards_are_disjoint_and_equal_with_drop_last(monkeypatch):
    sampler = EpochSampler(11, seed=0)
    sampler.set_epoch(2)
    a = _shard(monkeypatch, sampler, 0, 2)
    b = _shard(monkeypatch, sampler, 1, 2)
    assert len(a) == len(b) == 5
    assert not set(a) & set(b)
    assert len(set(a) | set(b)) == 10  # n // 2 * 2 indices, each once
    permutation = np.random.default_rng([0, 2]).permutation(11)
    assert a == permutation[0:10:2].tolist() and b == permutation[1:10:2].tolist()
    assert _shard(monkeypatch, sampler, 0, 1) == permutation.tolist()


def test_sampler_shards_without_drop_last_pad_to_equal_length(monkeypatch):
    sampler = EpochSampler(11, seed=0, drop_last=False)
    a = _shard(monkeypatch, sampler, 0, 2)
    b = _shard(monkeypatch, sampler, 1, 2)
    assert len(a) == len(b) == 6  # ceil(11 / 2)
    assert set(a) | set(b) == set(range(11))
    assert len(set(a) & set(b)) == 1  # one index repeated to pad


@pytest.mark.parametrize("size, world", [(1, 3), (2, 5), (3, 8)])
def test_sampler_pads_every_rank_even_with_fewer_items_than_ranks(monkeypatch, size, world):
    sampler = EpochSampler(size, shuffle=False, drop_last=False)
    shards = [_shard(monkeypatch, sampler, rank, world) for rank in range(world)]
    assert [len(s) for s in shards] == [1] * world  # every rank takes the same number of steps
    assert set().union(*shards) == set(range(size))
    dropped = EpochSampler(size, shuffle=False, drop_last=True)
    assert [_shard(monkeypatch, dropped, rank, world) for rank in range(world)] == [[]] * world


# ---------------------------------------------------------------------------------------------- StoreViews

SIZE = (12, 12, 12)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Six random 16³ volumes stored as 14³ patches (12³ + margin 1) with two negatives each and labels."""
    images = np.random.default_rng(0).random((6, 16, 16, 16), dtype=np.float32)
    root = tmp_path_factory.mktemp("store")
    labels = np.array([0, 1, 2, 0, 1, 2])
    splits = np.array(["train", "train", "val", "train", "val", "train"])
    return store_from_arrays(images, root, SIZE, margin=1, negatives=2, labels=labels, splits=splits, seed=1)


@pytest.fixture(scope="module")
def view():
    return build_view(default_view(3, SIZE, "ssl"), 3)


def test_item_has_two_float_views_the_index_and_the_label(store, view):
    data = StoreViews(store, view, seed=7)
    assert len(data) == 6
    item = data[(3, 0)]
    assert set(item) == {"views", "index", "label"}
    assert item["views"].shape == (2, 1, *SIZE) and item["views"].dtype == torch.float32
    assert item["index"].item() == 3 and item["label"].item() == 0
    assert not torch.equal(item["views"][0], item["views"][1])  # two different views of one patch
    assert torch.isfinite(item["views"]).all()
    plain = data[3]  # a bare index is epoch 0
    assert torch.equal(plain["views"], item["views"])
    # each view is the pipeline applied to the stored patch with a seed drawn from (seed, epoch, entry)
    seeds = np.random.SeedSequence([7, 0, 3]).generate_state(5)
    expected = np.stack([view(np.asarray(store.patches[3]), int(seeds[v])) for v in range(2)])
    np.testing.assert_array_equal(item["views"].numpy(), expected)


def test_without_labels_the_label_is_no_label(tmp_path, view):
    images = np.random.default_rng(1).random((2, 14, 14, 14), dtype=np.float32)
    unlabelled = store_from_arrays(images, tmp_path, SIZE, margin=1)
    item = StoreViews(unlabelled, view)[(1, 0)]
    assert NO_LABEL == -1 and item["label"].item() == -1
    assert item["index"].item() == 1


def test_views_are_seeded_by_index_and_epoch(store, view):
    data = StoreViews(store, view, seed=7)
    first = data[(2, 5)]
    again = StoreViews(store, view, seed=7)[(2, 5)]
    assert torch.equal(first["views"], again["views"])
    assert not torch.equal(first["views"], data[(2, 6)]["views"])  # another epoch, other views
    assert not torch.equal(first["views"], StoreViews(store, view, seed=8)[(2, 5)]["views"])
    data[(4, 1)]  # other items drawn in between change nothing
    assert torch.equal(first["views"], data[(2, 5)]["views"])


def test_views_of_a_subset_report_the_store_entry(store, view):
    val = store.indices("val")
    np.testing.assert_array_equal(val, [2, 4])
    data = StoreViews(store, view, indices=val, views=1, seed=7)
    assert len(data) == 2
    item = data[(1, 0)]
    assert item["views"].shape == (1, 1, *SIZE)
    assert item["index"].item() == 4 and item["label"].item() == 1
    full = StoreViews(store, view, seed=7)[(4, 0)]
    assert torch.equal(item["views"][0], full["views"][0])  # seeded by the entry, not the position in the subset


def test_mined_items_carry_views_of_one_negative(store, view):
    data = StoreViews(store, view, mined=True, seed=7)
    item = data[(0, 3)]
    assert set(item) == {"views", "index", "label", "negatives"}
    assert item["negatives"].shape == (2, 1, *SIZE) and item["negatives"].dtype == torch.float32
    assert not torch.equal(item["negatives"][0], item["negatives"][1])
    assert not torch.equal(item["negatives"], item["views"])
    seeds = np.random.SeedSequence([7, 3, 0]).generate_state(5)
    turn = int(np.random.default_rng([7, 0, 1]).permutation(2)[1])  # epoch 3: cycle 1 of the pool of 2, turn 1
    assert turn == mined_turn(2, 7, 3, 0)
    chosen = np.asarray(store.negatives[0][turn])
    expected = np.stack([view(chosen, int(seeds[2 + v])) for v in range(2)])
    np.testing.assert_array_equal(item["negatives"].numpy(), expected)
    assert torch.equal(item["views"], StoreViews(store, view, seed=7)[(0, 3)]["views"])  # same positive views
    assert torch.equal(item["negatives"], data[(0, 3)]["negatives"])


def test_mined_turns_serve_every_pooled_patch_once_per_cycle():
    # FMCIB draws a fresh background patch every step; from a pool of K, K consecutive epochs see K distinct ones
    for pool in (1, 3, 8):
        for entry in (0, 5):
            turns = [mined_turn(pool, 7, epoch, entry) for epoch in range(3 * pool)]
            for cycle in range(3):
                assert sorted(turns[cycle * pool : (cycle + 1) * pool]) == list(range(pool))
    orders = {tuple(mined_turn(8, 7, e, entry) for e in range(8)) for entry in range(6)}
    assert len(orders) > 1  # the order is seeded per entry, not one shared cycle


def test_mined_needs_a_store_with_negatives(tmp_path, view):
    images = np.random.default_rng(1).random((2, 14, 14, 14), dtype=np.float32)
    plain = store_from_arrays(images, tmp_path, SIZE, margin=1)
    with pytest.raises(ValueError, match="negatives"):
        StoreViews(plain, view, mined=True)


def _batches(data: StoreViews, workers: int) -> list[dict[str, torch.Tensor]]:
    sampler = EpochSampler(len(data), seed=5)
    sampler.set_epoch(1)
    loader = DataLoader(data, batch_size=2, sampler=sampler, num_workers=workers, drop_last=True)
    return list(loader)


def test_loader_batches_do_not_depend_on_the_number_of_workers(store, view):
    data = StoreViews(store, view, mined=True, seed=7)
    serial = _batches(data, 0)
    parallel = _batches(data, 2)
    assert len(serial) == len(parallel) == 3
    order = [int(i) for i in np.random.default_rng([5, 1]).permutation(6)]
    assert torch.cat([b["index"] for b in serial]).tolist() == order
    for a, b in zip(serial, parallel):
        assert set(a) == set(b) == {"views", "index", "label", "negatives"}
        assert a["views"].shape == (2, 2, 1, *SIZE)
        for key in a:
            assert torch.equal(a[key], b[key]), key
