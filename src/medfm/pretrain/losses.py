"""One contrastive loss on explicit positive/negative masks, and the masks of SimCLR, FMCIB's mined-negative SimCLR,
medfm's hard-negative variant of it, and SupCon.

For an anchor ``i`` with positives ``P(i)`` and negatives ``N(i)`` (cosine similarities ``s`` over temperature ``T``):

    loss_i = -1/|P(i)| * sum_{p in P(i)} [ s_ip / T - log sum_{k in P(i) ∪ N(i)} exp(s_ik / T) ]

With one positive and every other sample a negative this is SimCLR's NT-Xent; with the positives of the same
label it is supervised contrastive ("L_out" of Khosla et al.). Mined patches (from elsewhere in a sample's scan) are
never anchors. FMCIB's objective (``simclr-mined``, :func:`mined_masks`) gives each lesion view one positive, the
other view of its lesion, and as negatives only the two views of the mined patches of the *other* samples (other
lesions are not negatives; its own sample's mined patch is not either). medfm's variant (``simclr-hardneg``,
:func:`label_masks` with id -1) adds every mined patch, its own included, to SimCLR's in-batch negatives. Anchors
without a positive do not count.

Across processes (DDP) each rank keeps its own anchors and compares them with the embeddings of all ranks,
gathered with their gradients, so the mean of the ranks' losses is the single-process loss of the global batch
and DDP's averaged gradients are its gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from medfm.train.distributed import gather, world


def contrastive_loss(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float = 0.1,
) -> torch.Tensor:
    """Mean over anchors with a positive of the masked InfoNCE loss (module docstring).

    ``anchors`` (A, D) and ``candidates`` (N, D) are embeddings (normalised here); ``positives`` and
    ``negatives`` are (A, N) boolean masks; an anchor's own entry must be in neither.
    """
    if positives.shape != (len(anchors), len(candidates)) or negatives.shape != positives.shape:
        raise ValueError(f"masks must be {(len(anchors), len(candidates))}, got {tuple(positives.shape)}")
    if bool((positives & negatives).any()):
        raise ValueError("a pair is both positive and negative")
    logits = F.normalize(anchors.float(), dim=1) @ F.normalize(candidates.float(), dim=1).T / temperature
    logits = logits.masked_fill(~(positives | negatives), float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    counts = positives.sum(dim=1)
    has = counts > 0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0)).sum(dim=1)[has] / counts[has]
    if per_anchor.numel() == 0:
        return anchors.sum() * 0.0
    return per_anchor.mean()


def label_masks(
    anchor_ids: torch.Tensor, candidate_ids: torch.Tensor, self_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positives share an id, negatives do not; the anchor itself (column ``self_index[i]``) is neither.

    A negative id (-1) marks a mined negative: never a positive, always a negative.
    """
    same = anchor_ids[:, None] == candidate_ids[None, :]
    same &= candidate_ids[None, :] >= 0
    not_self = torch.ones_like(same)
    not_self[torch.arange(len(anchor_ids), device=same.device), self_index] = False
    return same & not_self, ~same & not_self


def mined_masks(
    anchor_ids: torch.Tensor, candidate_ids: torch.Tensor, candidate_mined: torch.Tensor, self_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """FMCIB's masks: the positive is a lesion view of the anchor's own sample (not itself); the negatives are
    the mined patches of every other sample, and nothing else.

    Ids name samples, a mined patch carrying the id of the sample it was mined for; ``candidate_mined`` marks
    the mined patches among the candidates.
    """
    same = anchor_ids[:, None] == candidate_ids[None, :]
    mined = candidate_mined[None, :].expand_as(same)
    positives = same & ~mined
    positives[torch.arange(len(anchor_ids), device=same.device), self_index] = False
    return positives, ~same & mined


def distributed_contrastive(
    embeddings: torch.Tensor,
    ids: torch.Tensor,
    is_anchor: torch.Tensor,
    temperature: float = 0.1,
    mined: torch.Tensor | None = None,
) -> torch.Tensor:
    """The contrastive loss of this rank's anchors against the embeddings of every rank.

    ``ids`` name what is alike: the source sample for SimCLR (its two views share it), the class label for
    SupCon, -1 for a mined negative of medfm's hard-negative variant. ``is_anchor`` selects the rows that are
    anchors (mined patches are not). With ``mined`` (rows that are mined patches, whose ids name the sample they
    were mined for, unique over ranks) the masks are FMCIB's (:func:`mined_masks`): under DDP the mined patches
    of every other rank's samples are negatives too.
    Every rank must hold the same number of rows. The rank's mean is weighted by its share of the anchors that
    have a positive, so the mean over ranks is the global batch's loss even when ranks count different numbers
    of them (SupCon with a label seen once).
    """
    rank, size = world()
    everything = gather(embeddings)
    all_ids = gather(ids)
    offset = rank * len(embeddings)
    local = torch.nonzero(is_anchor, as_tuple=True)[0]
    if mined is None:
        positives, negatives = label_masks(ids[local], all_ids, local + offset)
    else:
        positives, negatives = mined_masks(ids[local], all_ids, gather(mined.long()) > 0, local + offset)
    loss = contrastive_loss(embeddings[local], everything, positives, negatives, temperature)
    if size == 1:
        return loss
    counted = positives.any(dim=1).sum().to(device=embeddings.device, dtype=torch.float32)
    total = counted.clone()
    dist.all_reduce(total)
    return loss * (counted * size / total.clamp_min(1.0))


def simclr_ids(batch_size: int, sample_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Ids of two stacked views ``[view1; view2]`` of ``batch_size`` samples: a sample's views share its id."""
    base = torch.arange(batch_size) if sample_ids is None else sample_ids
    return torch.cat([base, base])
