"""Transfer weights across topologies: by name after prefix mapping, by shape, with a report of what went where.

``transfer_weights(src, model)`` reads ``src`` safely (a path or a checkpoint dict), unwraps it by rule
(:mod:`medfm.models.adapters`), finds the one prefix mapping (strip a wrapper prefix from the source's names, add
one to them) that matches the most tensors of compatible shape, and copies what fits.

A tensor goes only where it has the same structural role: the same name below the wrapper (stage, block index,
layer within the block) in a block of the same kind. A wrapper prefix (``module.``, ``backbone.``, ``encoder.``,
``features.``) holds no stage or block index: no component of it is a number or a stage among siblings of the
same stem (``layer3`` beside ``layer2``, ``denseblock2`` beside ``denseblock1``), and it is not a single layer.
A block is of the same kind when its named children agree (a bottleneck's ``conv1..conv3`` are not a basic block's
``conv1, conv2``); sequences may differ in length, so ResNet50's stages go into ResNet101's for the blocks both
have. Shapes alone never move a tensor into another role. Then:

- equal shapes are copied as they are (BatchNorm weights, biases and running statistics included);
- a 3-channel first conv goes into a 1-channel one by summing over the input channels (a grey image then
  gives what the 3-channel conv gives on that image repeated to 3 channels), and a 1-channel one into a
  3-channel one by repeating it and dividing by 3;
- with ``inflate=True`` a 2D conv weight ``(out, in, kh, kw)`` initialises a 3D one ``(out, in, kt, kh, kw)``
  I3D-style: repeated ``kt`` times along depth and divided by ``kt``, so on an input that is constant along
  depth the 3D conv gives the 2D conv's output.

Everything else is left at its initialisation and reported.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medfm.errors import CheckpointError
from medfm.models.checkpoints import read_trunk

_PREFIX_DEPTH = 3  # how many leading name components a prefix mapping may strip or add


@dataclass
class TransferReport:
    """What a transfer did.

    ``transferred``: target keys set from the source (copied, or adapted as ``adapted`` says), with their
    source keys in ``sources``; ``left_at_init``: every other target key (shape-mismatched ones included);
    ``unused``: source keys that set nothing; ``mismatched``: (target key, source shape, target shape) of
    names that matched with shapes that do not fit; ``role_mismatched``: (target key, block) of names that
    matched a source tensor held by a block of another kind (left at init); ``dropped``: head tensors the
    layout's rules removed.
    ``blocks``: the share of each top-level block's values that came from the source; ``coverage``: that
    share over the whole model.
    """

    layout: str
    strip_prefix: str = ""
    add_prefix: str = ""
    transferred: list[str] = field(default_factory=list)
    sources: dict[str, str] = field(default_factory=dict)
    adapted: list[tuple[str, str]] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    role_mismatched: list[tuple[str, str]] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    blocks: dict[str, float] = field(default_factory=dict)
    coverage: float = 0.0

    def summary(self) -> str:
        """A few lines for a terminal: counts, the name mapping, adaptations, mismatches, coverage by block."""
        n_target = len(self.transferred) + len(self.left_at_init)
        lines = [
            f"layout {self.layout}: {len(self.dropped)} head tensors dropped; names: strip {self.strip_prefix!r}, "
            f"add {self.add_prefix!r}",
            f"transferred {len(self.transferred)} of {n_target} tensors ({self.coverage:.2%} of the model's values), "
            f"{len(self.adapted)} adapted, {len(self.mismatched)} shape-mismatched, "
            f"{len(self.unused)} source tensors unused, {len(self.left_at_init)} target tensors left at init",
        ]
        lines += [f"  adapted {key}: {how}" for key, how in self.adapted[:8]]
        if len(self.adapted) > 8:
            lines.append(f"  ... and {len(self.adapted) - 8} more adapted")
        lines += [f"  mismatched {key}: source {list(s)}, target {list(t)}" for key, s, t in self.mismatched[:8]]
        if len(self.mismatched) > 8:
            lines.append(f"  ... and {len(self.mismatched) - 8} more mismatched")
        if self.role_mismatched:
            blocks = list(dict.fromkeys(block for _, block in self.role_mismatched))
            lines.append(
                f"  {len(self.role_mismatched)} tensors not moved: their blocks differ in kind between source and "
                f"target ({', '.join(blocks[:4])}{', ...' if len(blocks) > 4 else ''})"
            )
        if any(len(s) == 4 and len(t) == 5 for _, s, t in self.mismatched):
            lines.append("  2D weights meet 3D layers: pass inflate=True (--inflate) to inflate them")
        lines.append("coverage by block:")
        width = max((len(b) for b in self.blocks), default=0)
        lines += [f"  {block:<{width}}  {share:7.2%}" for block, share in self.blocks.items()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """The report as plain JSON-ready data."""
        return {
            "layout": self.layout,
            "strip_prefix": self.strip_prefix,
            "add_prefix": self.add_prefix,
            "coverage": self.coverage,
            "blocks": dict(self.blocks),
            "transferred": list(self.transferred),
            "sources": dict(self.sources),
            "adapted": [list(a) for a in self.adapted],
            "mismatched": [[k, list(s), list(t)] for k, s, t in self.mismatched],
            "role_mismatched": [list(r) for r in self.role_mismatched],
            "unused": list(self.unused),
            "left_at_init": list(self.left_at_init),
            "dropped": list(self.dropped),
        }


def _plan(src: tuple[int, ...], dst: tuple[int, ...], inflate: bool) -> list[str] | None:
    """How a source shape becomes a target shape: [] for a plain copy, the steps, or None when it cannot."""
    if src == dst:
        return []
    steps: list[str] = []
    if inflate and len(src) == 4 and len(dst) == 5:
        steps.append(f"inflated 2D→3D over depth {dst[2]}")
        src = (src[0], src[1], dst[2], *src[2:])
    if len(src) != len(dst) or len(src) < 3 or src[0] != dst[0] or src[2:] != dst[2:]:
        return None
    if src[1] == 3 and dst[1] == 1:
        steps.insert(0, "summed 3→1 input channels")
    elif src[1] == 1 and dst[1] == 3:
        steps.insert(0, "repeated 1→3 input channels, /3")
    elif src[1] != dst[1]:
        return None
    return steps


def _apply(value: torch.Tensor, dst: tuple[int, ...], inflate: bool) -> torch.Tensor:
    out = value.detach()
    if out.is_floating_point():
        out = out.float()
    if inflate and out.ndim == 4 and len(dst) == 5:
        out = out.unsqueeze(2).repeat(1, 1, dst[2], 1, 1) / dst[2]
    if out.shape[1] == 3 and dst[1] == 1:
        out = out.sum(dim=1, keepdim=True)
    elif out.shape[1] == 1 and dst[1] == 3:
        out = out.repeat(1, 3, *([1] * (out.ndim - 2))) / 3
    return out


def _stem(name: str) -> str:
    return name.rstrip("0123456789")


def _children(keys: Iterable[str]) -> dict[str, set[str]]:
    """Each module path (``""`` for the root, else ending in ``.``) → the names of its children in ``keys``."""
    children: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        parts = key.split(".")
        for i in range(len(parts) - 1):
            children[".".join(parts[:i]) + "." if i else ""].add(parts[i])
    return children


def _wrappers(keys: Iterable[str]) -> set[str]:
    """The prefixes (up to ``_PREFIX_DEPTH`` components) that wrap a network without naming a stage, block or layer."""
    keys = list(keys)
    children = _children(keys)
    found = {""}
    for key in keys:
        parts = key.split(".")
        for i in range(1, min(_PREFIX_DEPTH, len(parts) - 2) + 1):  # a wrapper keeps a module below it
            parent, name = (".".join(parts[: i - 1]) + "." if i > 1 else ""), parts[i - 1]
            siblings = children[parent] - {name}
            if name.isdigit() or (_stem(name) != name and any(_stem(s) == _stem(name) for s in siblings)):
                break
            found.add(parent + name + ".")
    return found


def _other_role(rest: str, source_children: dict[str, set[str]], target_children: dict[str, set[str]]) -> str:
    """The first block above the tensor ``rest`` (a name below the wrappers) that differs in kind between source and
    target (other named children; numbered ones, the blocks of a stage, may differ in count), or ``""``."""
    parts = rest.split(".")
    for i in range(1, len(parts) - 1):  # the root's and the tensor's own module's children may differ
        path = ".".join(parts[:i]) + "."
        named_source = {c for c in source_children.get(path, ()) if not c.isdigit()}
        named_target = {c for c in target_children.get(path, ()) if not c.isdigit()}
        if named_source != named_target:
            return path[:-1]
    return ""


def _best_mapping(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], inflate: bool
) -> tuple[str, str]:
    """The (strip, add) wrapper pair under which the most source tensors find a target of the same role and a
    compatible shape."""
    add_prefixes = _wrappers(target)
    by_suffix: dict[str, list[str]] = defaultdict(list)
    for key in target:
        for prefix in add_prefixes:
            if key.startswith(prefix):
                by_suffix[key[len(prefix) :]].append(prefix)
    scores: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for strip in _wrappers(source):
        for key, value in source.items():
            if not key.startswith(strip):
                continue
            rest = key[len(strip) :]
            for add in by_suffix.get(rest, ()):
                dst = target[add + rest]
                if _plan(tuple(value.shape), tuple(dst.shape), inflate) is not None:
                    score = scores[(strip, add)]
                    score[0] += 1
                    score[1] += dst.numel()
    if not scores:
        return "", ""
    return max(scores, key=lambda pair: (scores[pair][0], scores[pair][1], -len(pair[0]) - len(pair[1])))


def _below(keys: Iterable[str], prefix: str) -> dict[str, set[str]]:
    return _children(k[len(prefix) :] for k in keys if k.startswith(prefix))


def _block(key: str, add: str, children: dict[str, set[str]]) -> str:
    """A target key's block: the first name component after the added prefix, below any single-child wrapper
    (DenseNet's ``features.denseblock1``, not ``features``)."""
    root = add if add and key.startswith(add) else ""
    parts = key[len(root) :].split(".")
    depth = 0
    while depth < len(parts) - 2 and len(children.get(root + "".join(p + "." for p in parts[:depth]), ())) == 1:
        depth += 1
    return root + ".".join(parts[: depth + 1])


def transfer_weights(
    src: str | os.PathLike[str] | Mapping[str, object],
    model: nn.Module,
    inflate: bool = False,
    min_coverage: float = 0.0,
    layout: str | None = None,
    exact: bool = False,
) -> TransferReport:
    """Copy what fits of a checkpoint into ``model`` and report it.

    ``src``: a checkpoint path (read without running code; ``.tar.gz`` archives are opened safely) or a
    checkpoint / state dict already in memory. ``layout`` forces a layout of :mod:`medfm.models.adapters`.
    ``exact``: only tensors of the target's own shape are copied (no channel summing or inflation; the others are
    reported as mismatched), as when a model's own weights are loaded.
    Raises :class:`CheckpointError`, leaving the model untouched, when the transferred values cover less than
    ``min_coverage`` of the model or when nothing at all can be transferred.
    """
    source, dropped, layout_name = read_trunk(src, layout)
    target = model.state_dict()
    inflate = inflate and not exact
    strip, add = _best_mapping(source, target, inflate)
    report = TransferReport(layout=layout_name, strip_prefix=strip, add_prefix=add, dropped=dropped)
    new: dict[str, torch.Tensor] = {}
    source_children, target_children = _below(source, strip), _below(target, add)
    for key, value in source.items():
        if not key.startswith(strip):
            continue
        name = add + key[len(strip) :]
        if name not in target or name in new:
            continue
        other = _other_role(key[len(strip) :], source_children, target_children)
        if other:
            report.role_mismatched.append((name, add + other))
            continue
        dst = tuple(target[name].shape)
        steps = _plan(tuple(value.shape), dst, inflate)
        if steps is None or (exact and steps):
            report.mismatched.append((name, tuple(value.shape), dst))
            continue
        new[name] = _apply(value, dst, inflate) if steps else value.detach()
        report.sources[name] = key
        if steps:
            report.adapted.append((name, "; ".join(steps)))
    # a scalar (BatchNorm's num_batches_tracked) goes only with the other tensors of its module
    moved = {name.rsplit(".", 1)[0] for name, value in new.items() if value.ndim}
    for name in [n for n, v in new.items() if not v.ndim and n.rsplit(".", 1)[0] not in moved]:
        del new[name], report.sources[name]
    used = {report.sources[name] for name in new}
    report.transferred = sorted(new)
    report.left_at_init = sorted(k for k in target if k not in new)
    report.unused = sorted(k for k in source if k not in used)
    sizes: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    all_children = _children(target)
    for key, value in target.items():
        block = sizes[_block(key, add, all_children)]
        block[1] += value.numel()
        if key in new:
            block[0] += value.numel()
    report.blocks = {b: (done / total if total else 1.0) for b, (done, total) in sizes.items()}
    total = sum(v.numel() for v in target.values()) or 1
    report.coverage = sum(target[k].numel() for k in new) / total
    if not new:
        raise CheckpointError(
            f"no tensor of the checkpoint fits the model ({report.summary().splitlines()[1]}; first source keys: "
            f"{list(source)[:3]}, first model keys: {list(target)[:3]})"
            + (
                "; 2D weights into a 3D model need inflate=True (--inflate)"
                if not inflate and any(len(s) == 4 and len(t) == 5 for _, s, t in report.mismatched)
                else ""
            )
            + (
                f"; {len(report.role_mismatched)} tensors of matching names sit in blocks of another kind"
                if report.role_mismatched
                else ""
            )
        )
    if report.coverage < min_coverage:
        raise CheckpointError(
            f"the transferred weights cover {report.coverage:.1%} of the model, below the {min_coverage:.0%} "
            f"required ({report.summary().splitlines()[1]}); nothing was changed. Pass a lower min_coverage "
            "(--min-coverage) to go on"
        )
    with torch.no_grad():
        model.load_state_dict(new, strict=False)
    return report


def load_weights(
    model: nn.Module, path: str | os.PathLike[str], min_coverage: float = 0.95, layout: str | None = None
) -> TransferReport:
    """Load a checkpoint file of any known layout into ``model`` safely, tensors of its own shapes only (heads
    dropped by rule); raises when they cover less than ``min_coverage`` of the model. Returns the report."""
    return transfer_weights(path, model, min_coverage=min_coverage, layout=layout, exact=True)


def save_transferred(
    model: nn.Module,
    report: TransferReport,
    dest: str | os.PathLike[str],
    provenance: Mapping[str, object] | None = None,
) -> tuple[Path, Path]:
    """Write the model's state dict as safetensors and ``provenance`` + the report as JSON beside it, as one pair
    (both or neither; the JSON records the weights' SHA-256).

    ``W.safetensors`` gets ``W.json``.
    """
    import json

    from medfm.data.outputs import atomic_paths, file_sha256, write_weights

    dest = Path(dest)
    if dest.suffix != ".safetensors":
        raise CheckpointError(f"{dest}: the output must be a .safetensors file")
    sidecar = dest.with_suffix(".json")
    with atomic_paths(dest, sidecar) as (tmp, tmp_sidecar):
        write_weights(model, tmp)
        record = {**(provenance or {}), "weights": str(dest), "weights_sha256": file_sha256(tmp), **report.to_dict()}
        tmp_sidecar.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return dest, sidecar
