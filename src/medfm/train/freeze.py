"""Freezing a network's leading blocks: ``none``, the whole part, or the part up to and including one block."""

from __future__ import annotations

from torch import nn

from medfm.errors import ConfigError


def freeze_blocks(module: nn.Module, blocks: list[str], freeze: str, part: str = "trunk") -> list[str]:
    """Freeze ``none``, ``PART`` (all ``blocks``) or ``PART-until-NAME``; returns the frozen blocks' dotted names.

    ``blocks`` are dotted paths inside ``module`` in forward order (:func:`medfm.models.stages.trunk_blocks`);
    NAME may be a full path (``features.denseblock2``), its last part (``denseblock2``), or a module holding blocks
    (``features``: up to its last block). ``PART`` freezes every parameter of ``module``. Paths that ``module``
    lacks (a MONAI encoder without ``maxpool``) are skipped.
    """
    prefix = f"{part}-until-"
    if freeze == "none":
        frozen: list[str] = []
    elif freeze == part:
        frozen = list(blocks)
    elif freeze.startswith(prefix):
        last = freeze[len(prefix) :]
        short = [b.rsplit(".", 1)[-1] for b in blocks]
        inside = [k for k, b in enumerate(blocks) if b.startswith(f"{last}.")]
        if last not in blocks and last not in short and not inside:
            raise ConfigError(f"freeze={freeze!r}: the {part} has no block {last!r}; blocks: {short}")
        end = blocks.index(last) if last in blocks else short.index(last) if last in short else inside[-1]
        frozen = blocks[: end + 1]
    else:
        raise ConfigError(f"freeze={freeze!r}; allowed none, {part}, {part}-until-BLOCK")
    if freeze == part:
        module.requires_grad_(False)
    present = dict(module.named_modules())
    for path in frozen:
        if path in present:
            for p in present[path].parameters():
                p.requires_grad_(False)
    return frozen
