"""Freezing a network's leading blocks: ``none``, the whole part, or the part up to and including one block."""

from __future__ import annotations

from torch import nn

from medfm.errors import ConfigError


def freeze_blocks(module: nn.Module, blocks: list[str], freeze: str, part: str = "trunk") -> list[str]:
    """Freeze ``none``, ``PART`` (all ``blocks``) or ``PART-until-NAME``; returns the frozen blocks' dotted names.

    ``blocks`` are dotted paths inside ``module`` in forward order; NAME may be a full path (``features.denseblock2``)
    or its last part (``denseblock2``). Paths that ``module`` lacks (a MONAI encoder without ``maxpool``) are skipped.
    """
    prefix = f"{part}-until-"
    if freeze == "none":
        frozen: list[str] = []
    elif freeze == part:
        frozen = list(blocks)
    elif freeze.startswith(prefix):
        last = freeze[len(prefix) :]
        short = [b.rsplit(".", 1)[-1] for b in blocks]
        if last not in blocks and last not in short:
            raise ConfigError(f"freeze={freeze!r}: the {part} has no block {last!r}; blocks: {short}")
        end = blocks.index(last) if last in blocks else short.index(last)
        frozen = blocks[: end + 1]
    else:
        raise ConfigError(f"freeze={freeze!r}; allowed none, {part}, {part}-until-BLOCK")
    present = dict(module.named_modules())
    for path in frozen:
        if path in present:
            for p in present[path].parameters():
                p.requires_grad_(False)
    return frozen
