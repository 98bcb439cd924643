"""The masked contrastive loss against lightly (SimCLR), pytorch-metric-learning (SupCon), hand-written loops
(FMCIB's mined negatives, written from its definition; medfm's hard-negative variant), and against itself and the
definitions across two real gloo processes (DDP)."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
from lightly.loss import NTXentLoss
from pytorch_metric_learning.losses import SupConLoss
from torch import nn

from medfm.pretrain.losses import (
    contrastive_loss,
    distributed_contrastive,
    gather,
    label_masks,
    mined_masks,
    simclr_ids,
    world,
)

TOL = dict(rtol=1e-5, atol=1e-5)


def _pair(batch: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)


def _simclr(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    batch = len(z0)
    return distributed_contrastive(
        torch.cat([z0, z1]), simclr_ids(batch), torch.ones(2 * batch, dtype=torch.bool), temperature=temperature
    )


# --------------------------------------------------------------------------------------------- single process


def test_world_and_gather_without_process_group():
    assert world() == (0, 1)
    x = torch.randn(3, 2)
    assert gather(x) is x


def test_simclr_ids_views_share_sample_id():
    assert simclr_ids(3).tolist() == [0, 1, 2, 0, 1, 2]
    assert simclr_ids(2, torch.tensor([7, 9])).tolist() == [7, 9, 7, 9]


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_simclr_matches_lightly_ntxent(temperature):
    # lightly's NT-Xent is a cross-entropy averaged over the 2B rows [z0; z1] (both directions), each row's
    # logits being its partner view and the 2B-2 other samples: the same mean over 2B anchors as ours.
    z0, z1 = _pair()
    ours = _simclr(z0, z1, temperature)
    ref = NTXentLoss(temperature=temperature)(z0, z1)
    torch.testing.assert_close(ours, ref, **TOL)


def test_simclr_gradients_match_lightly():
    z0, z1 = _pair(seed=3)
    a0, a1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    b0, b1 = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    _simclr(a0, a1, 0.2).backward()
    NTXentLoss(temperature=0.2)(b0, b1).backward()
    for ours, ref in ((a0.grad, b0.grad), (a1.grad, b1.grad)):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, **TOL)


def test_supcon_matches_pytorch_metric_learning():
    # PML normalises (cosine similarity), excludes self pairs, and averages over the anchors whose loss is
    # non-zero, i.e. those with a positive; label 5 is a singleton, so its anchor must count in neither.
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(12, 16, generator=g)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 3, 1, 4, 4])
    emb_singleton = torch.cat([emb, torch.randn(1, 16, generator=g)])
    labels_singleton = torch.cat([labels, torch.tensor([5])])
    for e, lab in ((emb, labels), (emb_singleton, labels_singleton)):
        ours = distributed_contrastive(e, lab, torch.ones(len(e), dtype=torch.bool), temperature=0.1)
        ref = SupConLoss(temperature=0.1)(e, lab)
        torch.testing.assert_close(ours, ref, **TOL)


def test_supcon_gradients_match_pytorch_metric_learning():
    g = torch.Generator().manual_seed(2)
    emb = torch.randn(12, 16, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 1])
    a, b = emb.clone().requires_grad_(), emb.clone().requires_grad_()
    distributed_contrastive(a, labels, torch.ones(12, dtype=torch.bool), temperature=0.1).backward()
    SupConLoss(temperature=0.1)(b, labels).backward()
    assert torch.isfinite(a.grad).all()
    torch.testing.assert_close(a.grad, b.grad, **TOL)


def _mined_batch(batch: int, mined: torch.Tensor, seed: int = 4):
    z0, z1 = _pair(batch, 16, seed)
    emb = torch.cat([z0, z1, mined])
    ids = torch.cat([simclr_ids(batch), torch.full((len(mined),), -1)])
    is_anchor = torch.cat([torch.ones(2 * batch, dtype=torch.bool), torch.zeros(len(mined), dtype=torch.bool)])
    return emb, ids, is_anchor


def _mined_reference(emb: torch.Tensor, batch: int, temperature: float) -> torch.Tensor:
    """For each of the 2B lesion views: partner view over every other sample (all mined views included)."""
    z = emb / emb.norm(dim=1, keepdim=True)
    losses = []
    for i in range(2 * batch):
        partner = (i + batch) % (2 * batch)
        denom = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(len(z)) if k != i)
        losses.append(-(float(z[i] @ z[partner]) / temperature - math.log(denom)))
    return torch.tensor(sum(losses) / len(losses))


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_mined_negatives_match_loop(temperature):
    batch = 4
    mined = torch.randn(2 * batch, 16, generator=torch.Generator().manual_seed(5))
    emb, ids, is_anchor = _mined_batch(batch, mined)
    ours = distributed_contrastive(emb, ids, is_anchor, temperature=temperature)
    torch.testing.assert_close(ours, _mined_reference(emb.double(), batch, temperature), **TOL)


def test_mined_negatives_are_only_negatives():
    # A mined view is never an anchor and never anybody's positive, but is a negative of every anchor.
    batch = 3
    ids = torch.cat([simclr_ids(batch), torch.full((4,), -1)])
    anchors = torch.arange(2 * batch)
    pos, neg = label_masks(ids[anchors], ids, anchors)
    assert not pos[:, 2 * batch :].any()
    assert neg[:, 2 * batch :].all()
    assert pos.sum(dim=1).tolist() == [1] * (2 * batch)
    assert not (pos | neg)[anchors, anchors].any()


def test_mined_copies_of_a_positive_increase_the_loss():
    batch, temperature, copies = 4, 0.1, 5
    mined = torch.randn(2 * batch, 16, generator=torch.Generator().manual_seed(6))
    emb, ids, is_anchor = _mined_batch(batch, mined)
    base = distributed_contrastive(emb, ids, is_anchor, temperature)
    positive_of_0 = emb[batch]  # view 2 of sample 0
    emb2 = torch.cat([emb, positive_of_0.expand(copies, -1)])
    ids2 = torch.cat([ids, torch.full((copies,), -1)])
    is_anchor2 = torch.cat([is_anchor, torch.zeros(copies, dtype=torch.bool)])
    more = distributed_contrastive(emb2, ids2, is_anchor2, temperature)
    assert more > base
    # Anchor 0 alone: its positive now sits in the denominator 1 + copies times, so its loss exceeds log(1 + copies).
    only0 = torch.zeros_like(is_anchor2)
    only0[0] = True
    alone_before = distributed_contrastive(emb, ids, only0[: len(emb)], temperature)
    alone_after = distributed_contrastive(emb2, ids2, only0, temperature)
    assert alone_after > math.log(1 + copies)
    assert alone_after > alone_before
    torch.testing.assert_close(more, _mined_reference(emb2.double(), batch, temperature), **TOL)


def test_loss_gradients_are_finite():
    z0, z1 = _pair(seed=7)
    emb = torch.cat([z0, z1]).requires_grad_()
    loss = distributed_contrastive(emb, simclr_ids(8), torch.ones(16, dtype=torch.bool), temperature=0.05)
    loss.backward()
    assert torch.isfinite(loss)
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0


def test_contrastive_loss_rejects_bad_masks():
    a, c = torch.randn(3, 4), torch.randn(5, 4)
    good = torch.zeros(3, 5, dtype=torch.bool)
    with pytest.raises(ValueError):
        contrastive_loss(a, c, torch.zeros(5, 3, dtype=torch.bool), good)
    with pytest.raises(ValueError):
        contrastive_loss(a, c, good, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError):
        contrastive_loss(a, c, torch.zeros(3, dtype=torch.bool), good)
    overlap_pos = good.clone()
    overlap_neg = good.clone()
    overlap_pos[1, 2] = overlap_neg[1, 2] = True
    with pytest.raises(ValueError, match="both positive and negative"):
        contrastive_loss(a, c, overlap_pos, overlap_neg)


def test_anchors_without_positive_are_ignored():
    g = torch.Generator().manual_seed(8)
    emb = torch.randn(10, 8, generator=g)
    ids = torch.tensor([0, 1, 2, 0, 1, 3, 4, 2, 5, 6])  # 3, 4, 5, 6 are singletons
    every = torch.arange(10)
    pos, neg = label_masks(ids, ids, every)
    full = contrastive_loss(emb, emb, pos, neg, 0.1)
    keep = pos.any(dim=1)
    assert keep.sum() == 6
    removed = contrastive_loss(emb[keep], emb, pos[keep], neg[keep], 0.1)
    torch.testing.assert_close(full, removed, **TOL)
    # Through distributed_contrastive: dropping them as anchors (they stay negatives) changes nothing.
    torch.testing.assert_close(distributed_contrastive(emb, ids, keep, 0.1), full, **TOL)
    # No anchor with a positive at all: zero, still differentiable.
    lone = emb.clone().requires_grad_()
    zero = distributed_contrastive(lone, torch.arange(10), torch.ones(10, dtype=torch.bool), 0.1)
    assert zero.item() == 0.0
    zero.backward()
    assert torch.equal(lone.grad, torch.zeros_like(lone))


# ------------------------------------------------------------------- FMCIB's objective (simclr-mined), by definition


def fmcib_definition(lesion: torch.Tensor, mined: torch.Tensor, temperature: float) -> torch.Tensor:
    """FMCIB's loss written from its definition, one anchor at a time, in float64.

    ``lesion`` and ``mined`` are (B, 2, D): two views of each sample's lesion patch and of its mined patch. The
    anchors are the 2B lesion views; the positive of view v of lesion b is view 1-v of lesion b; the negatives
    are the two views of the mined patch of every other sample c != b (its own mined patch and all lesions are
    not); loss = -mean_anchors log(e^{s_pos/T} / (e^{s_pos/T} + sum_neg e^{s_neg/T})), s = cosine similarity.
    """
    lesion, mined = lesion.double(), mined.double()
    batch = len(lesion)

    def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a @ b) / (a.norm() * b.norm())

    terms = []
    for b in range(batch):
        for v in range(2):
            anchor = lesion[b, v]
            pos = torch.exp(cosine(anchor, lesion[b, 1 - v]) / temperature)
            neg = sum(
                torch.exp(cosine(anchor, mined[c, w]) / temperature) for c in range(batch) if c != b for w in range(2)
            )
            terms.append(torch.log(pos / (pos + neg)))
    return -torch.stack(terms).mean()


def fmcib_rows(lesion: torch.Tensor, mined: torch.Tensor, first_id: int = 0):
    """medfm's rows for one process's batch: [lesion view 1; lesion view 2; mined view 1; mined view 2], with
    sample ids (a mined patch carries its sample's id), anchors (lesion views) and the mined flags."""
    batch = len(lesion)
    emb = torch.cat([lesion[:, 0], lesion[:, 1], mined[:, 0], mined[:, 1]])
    ids = (first_id + torch.arange(batch)).repeat(4)
    is_anchor = torch.arange(4 * batch) < 2 * batch
    return emb, ids, is_anchor, ~is_anchor


def test_fmcib_masks_for_three_samples():
    # Documentation as much as a test: columns are l0 l1 l2 (lesion view 1), l0' l1' l2' (view 2),
    # m0 m1 m2 (mined view 1), m0' m1' m2' (mined view 2); rows are the 6 lesion-view anchors.
    _, ids, is_anchor, mined = fmcib_rows(torch.zeros(3, 2, 1), torch.zeros(3, 2, 1))
    anchors = torch.nonzero(is_anchor, as_tuple=True)[0]
    pos, neg = mined_masks(ids[anchors], ids, mined, anchors)
    print("\npositives (B=3)\n", pos.int(), "\nnegatives (B=3)\n", neg.int())
    # fmt: off
    #                               l0 l1 l2 l0'l1'l2' m0 m1 m2 m0'm1'm2'
    expected_pos = torch.tensor([[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # l0
                                 [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],  # l1
                                 [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],  # l2
                                 [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # l0'
                                 [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # l1'
                                 [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]])  # l2'
    expected_neg = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1],  # l0: mined of samples 1, 2
                                 [0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 1],  # l1: mined of samples 0, 2
                                 [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0],  # l2: mined of samples 0, 1
                                 [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1],  # l0'
                                 [0, 0, 0, 0, 0, 0, 1, 0, 1, 1, 0, 1],  # l1'
                                 [0, 0, 0, 0, 0, 0, 1, 1, 0, 1, 1, 0]])  # l2'
    # fmt: on
    assert torch.equal(pos.int(), expected_pos)
    assert torch.equal(neg.int(), expected_neg)


def _fmcib_case(batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(batch, 1, 16, generator=g)
    lesion = torch.cat([first, first + 1.2 * torch.randn(batch, 1, 16, generator=g)], dim=1)  # views alike
    # each mined patch near its own lesion makes the choice of negatives matter: FMCIB leaves it out, medfm's
    # variant (and its in-batch lesions) count it
    mined = lesion + 1.0 * torch.randn(batch, 2, 16, generator=g)
    return lesion, mined


@pytest.mark.parametrize(("batch", "temperature"), [(3, 0.1), (8, 0.1), (5, 0.5), (2, 0.1)])
def test_simclr_mined_loss_and_gradients_equal_fmcib_definition(batch, temperature):
    lesion, mined = _fmcib_case(batch, seed=batch)
    emb, ids, is_anchor, is_mined = fmcib_rows(lesion, mined)
    emb = emb.clone().requires_grad_()
    ours = distributed_contrastive(emb, ids, is_anchor, temperature, mined=is_mined)
    ours.backward()
    lesion_ref, mined_ref = lesion.double().requires_grad_(), mined.double().requires_grad_()
    ref = fmcib_definition(lesion_ref, mined_ref, temperature)
    ref.backward()
    grad_ref = torch.cat([lesion_ref.grad[:, 0], lesion_ref.grad[:, 1], mined_ref.grad[:, 0], mined_ref.grad[:, 1]])
    loss_diff = abs(ours.item() - ref.item())
    grad_diff = float((emb.grad.double() - grad_ref).abs().max())
    print(
        f"\nB={batch} T={temperature}: loss {ours.item():.6f} vs definition {ref.item():.6f}, |loss diff| "
        f"{loss_diff:.2e}, max |grad diff| {grad_diff:.2e} (grad scale {float(grad_ref.abs().max()):.2e})"
    )
    assert loss_diff < 1e-6 + 1e-5 * ref.item()  # float32 against float64
    assert grad_diff < 1e-4 * float(grad_ref.abs().max())
    assert grad_ref[2 * batch :].abs().sum() > 0  # the mined patches do receive gradients
    # medfm's own variant (every mined patch and every other lesion negative) is a different objective
    hard_ids = torch.cat([ids[: 2 * batch], torch.full((2 * batch,), -1)])
    hardneg = distributed_contrastive(emb.detach(), hard_ids, is_anchor, temperature)
    assert abs(float(hardneg) - float(ref.detach())) > 0.5


def test_simclr_mined_single_sample_has_no_negatives():
    # B = 1 in one process: no other sample, hence no negative; -log(e/e) = 0 for both anchors, as FMCIB's.
    lesion, mined = _fmcib_case(1, seed=0)
    emb, ids, is_anchor, is_mined = fmcib_rows(lesion, mined)
    assert float(distributed_contrastive(emb, ids, is_anchor, 0.1, mined=is_mined)) == 0.0
    assert float(fmcib_definition(lesion, mined, 0.1)) == 0.0


# ------------------------------------------------------------------------------------- two gloo processes (DDP)

WORLD = 2


def _layer() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(10, 8)


def _ddp_worker(rank: int, port: int, cases: list, out_path: str) -> None:
    """One rank: for each case, its local rows through the seeded Linear, the loss, backward, averaged grads."""
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        results = []
        for x, ids, is_anchor, mined, temperature, fmcib in cases[rank]:
            layer = _layer()
            loss = distributed_contrastive(layer(x), ids, is_anchor, temperature, mined if fmcib else None)
            loss.backward()
            grad = layer.weight.grad.clone()
            dist.all_reduce(grad)  # what DDP does: sum, then divide by the world size
            results.append((loss.detach(), grad / WORLD))
        torch.save(results, out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _split(parts: list[tuple[torch.Tensor, ...]], rank: int):
    """Rank ``rank``'s share of each block (view 1, view 2, mined, ...), stacked block after block."""
    local = [tuple(t.chunk(WORLD)[rank] for t in block) for block in parts]
    return tuple(torch.cat([blk[i] for blk in local]) for i in range(4))


def _ddp_cases():
    """Global batches as blocks of (x, ids, is_anchor, is_mined); each rank takes its half of every block.

    A case is (blocks, temperature, FMCIB's masks or label masks)."""
    g = torch.Generator().manual_seed(11)

    def block(n, ids, anchor=True):
        return torch.randn(n, 10, generator=g), ids, torch.full((n,), anchor), torch.full((n,), not anchor)

    b = 8  # SimCLR: 8 samples, ids = global sample index, two views
    simclr = [block(b, torch.arange(b)), block(b, torch.arange(b))]
    # SupCon: labels as ids, every anchor has a positive somewhere in the global batch (not always on its rank)
    supcon = [block(12, torch.tensor([0, 1, 2, 0, 3, 1, 2, 3, 0, 4, 4, 1]))]
    # SupCon with singleton labels, unevenly spread: rank 0 has two anchors without a positive, rank 1 none
    uneven = [block(8, torch.tensor([5, 6, 0, 1, 0, 1, 2, 2]))]
    # Mined negatives: lesion views (ids 0..B-1 twice) and 2B mined views (id -1, not anchors)
    mined = [block(b, torch.arange(b)), block(b, torch.arange(b)), block(2 * b, torch.full((2 * b,), -1), False)]
    # FMCIB: lesion view 1, lesion view 2, mined view 1, mined view 2 of 8 samples; rank r holds samples 4r..4r+3
    # of each block, so the sample ids are the global slots; a mined patch carries its sample's id
    fmcib = [block(b, torch.arange(b)), block(b, torch.arange(b))]
    fmcib += [block(b, torch.arange(b), False), block(b, torch.arange(b), False)]
    return {
        "simclr": (simclr, 0.1, False),
        "supcon": (supcon, 0.1, False),
        "supcon-uneven": (uneven, 0.2, False),
        "mined": (mined, 0.1, False),
        "fmcib": (fmcib, 0.1, True),
    }


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Run every case once on two gloo CPU processes; (name -> (global blocks, temperature, rank results))."""
    cases = _ddp_cases()
    names = list(cases)
    per_rank = [[(*_split(cases[n][0], r), *cases[n][1:]) for n in names] for r in range(WORLD)]
    tmp = tmp_path_factory.mktemp("ddp")
    outs = [str(tmp / f"rank{r}.pt") for r in range(WORLD)]
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, per_rank, outs[r])) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0] * WORLD, "a DDP rank failed or hung"
    ranks = [torch.load(o) for o in outs]
    return {n: (*cases[n], [ranks[r][i] for r in range(WORLD)]) for i, n in enumerate(names)}


@pytest.mark.parametrize("name", ["simclr", "supcon", "supcon-uneven", "mined", "fmcib"])
def test_ddp_matches_single_process(ddp_results, name):
    blocks, temperature, fmcib, ranks = ddp_results[name]
    x, ids, is_anchor, mined = (torch.cat([blk[i] for blk in blocks]) for i in range(4))
    layer = _layer()
    loss = distributed_contrastive(layer(x), ids, is_anchor, temperature, mined if fmcib else None)
    loss.backward()
    mean_loss = torch.stack([r[0] for r in ranks]).mean()
    torch.testing.assert_close(mean_loss, loss.detach(), **TOL)
    torch.testing.assert_close(ranks[0][1], ranks[1][1], rtol=0, atol=0)  # all-reduced: identical on both ranks
    torch.testing.assert_close(ranks[0][1], layer.weight.grad, **TOL)
    assert layer.weight.grad.abs().sum() > 0


def test_ddp_simclr_mined_equals_fmcib_definition_on_the_global_batch(ddp_results):
    # Two ranks of 4 samples: each rank's anchors take as negatives the mined patches of the 3 other samples on
    # its rank and of the 4 samples on the other rank (gathered): FMCIB's definition on the global batch of 8.
    blocks, temperature, _, ranks = ddp_results["fmcib"]
    layer = _layer().double()
    z = [layer(blk[0].double()) for blk in blocks]  # lesion view 1, view 2, mined view 1, view 2: (8, 8) each
    ref = fmcib_definition(torch.stack(z[:2], dim=1), torch.stack(z[2:], dim=1), temperature)
    ref.backward()
    mean_loss = torch.stack([r[0] for r in ranks]).mean()
    loss_diff = abs(float(mean_loss) - float(ref.detach()))
    grad_diff = float((ranks[0][1].double() - layer.weight.grad).abs().max())
    print(
        f"\ntwo gloo ranks: loss {float(mean_loss):.6f} vs definition {float(ref.detach()):.6f}, |loss diff| {loss_diff:.2e}, "
        f"max |grad diff| {grad_diff:.2e} (grad scale {float(layer.weight.grad.abs().max()):.2e})"
    )
    assert loss_diff < 1e-5
    assert grad_diff < 1e-5
    assert layer.weight.grad.abs().sum() > 0
