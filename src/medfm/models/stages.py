"""One stage table for the trunk families: what a feature pyramid, a U-Net decoder and freezing need.

A trunk of a known family (torchvision ResNet, MONAI 3D ResNet, torchvision DenseNet, module names kept) runs as
five stages of child modules in turn; each stage halves the resolution (strides 2, 4, 8, 16, 32), and its last
module's output is the stage's feature map (a U-Net skip, an FPN level). The modules of the stages, in order, are
the trunk's blocks: ``freeze: trunk-until-BLOCK`` (``encoder-until-BLOCK``) accepts the same names in every command.
A trunk of another family has no stages (no pyramid, no U-Net); its blocks are its children.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from medfm.errors import ModelError


@dataclass(frozen=True)
class Stage:
    """Modules run in turn (dotted paths in the trunk) and the stride of the stage's output."""

    paths: tuple[str, ...]
    stride: int

    @property
    def output(self) -> str:
        """The module whose output is the stage's feature map."""
        return self.paths[-1]


def _table(*stages: tuple[str, ...]) -> tuple[Stage, ...]:
    return tuple(Stage(paths, 2 ** (k + 1)) for k, paths in enumerate(stages))


# "maxpool" may be absent (a MONAI ResNet built without it): it is skipped where a trunk lacks it.
FAMILIES: dict[str, tuple[Stage, ...]] = {
    "resnet": _table(("conv1", "bn1", "relu"), ("maxpool", "layer1"), ("layer2",), ("layer3",), ("layer4",)),
    "resnet3d": _table(("conv1", "bn1", "act"), ("maxpool", "layer1"), ("layer2",), ("layer3",), ("layer4",)),
    "densenet": _table(
        ("features.conv0", "features.norm0", "features.relu0"),
        ("features.pool0", "features.denseblock1"),
        ("features.transition1", "features.denseblock2"),
        ("features.transition2", "features.denseblock3"),
        ("features.transition3", "features.denseblock4", "features.norm5"),
    ),
}
OPTIONAL = ("maxpool",)


def trunk_family(trunk: nn.Module) -> str | None:
    """The family whose stage table fits the trunk's modules (None for another network)."""
    names = {name for name, _ in trunk.named_modules()}
    for family, stages in FAMILIES.items():
        if all(path in names for stage in stages for path in stage.paths if path not in OPTIONAL):
            return family
    return None


def trunk_stages(trunk: nn.Module, use: str = "this") -> tuple[Stage, ...]:
    """The trunk's stages with their measured strides; ModelError naming ``use`` (e.g. ``detection``) when its
    family has none, or when its module names fit a family but a stage after the first does not halve the
    resolution (a dilated ResNet stays at stride 8: its pyramid would be silently wrong). The first stage may keep
    the input's resolution (a 3D ResNet whose first convolution has stride 1)."""
    family = trunk_family(trunk)
    if family is None:
        raise ModelError(
            f"{use} needs a trunk of the ResNet (2D torchvision, 3D resnet3d) or DenseNet (2D torchvision) family; "
            f"{type(trunk).__name__} has top-level blocks {[n for n, _ in trunk.named_children()]}"
        )
    stages = FAMILIES[family]
    size, shapes = _probe(trunk, stages)
    measured = [size // shape[-1] for shape in shapes]
    if any(b != 2 * a for a, b in zip(measured[:-1], measured[1:])):
        raise ModelError(
            f"{use} needs a trunk each of whose stages after the first halves the resolution; "
            f"{type(trunk).__name__} has stage strides {measured} (dilated or changed stages)"
        )
    return tuple(replace(stage, stride=m) for stage, m in zip(stages, measured))


def trunk_blocks(trunk: nn.Module) -> list[str]:
    """The trunk's blocks in forward order: the modules of its stages (present ones), else its children."""
    family = trunk_family(trunk)
    if family is None:
        return [name for name, _ in trunk.named_children()]
    present = {name for name, _ in trunk.named_modules()}
    return [path for stage in FAMILIES[family] for path in stage.paths if path in present]


def run_stages(trunk: nn.Module, stages: tuple[Stage, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of each stage (finest first), the modules of each run in turn."""
    out = []
    for stage in stages:
        for path in stage.paths:
            if path in OPTIONAL and not hasattr(trunk, path):
                continue
            x = trunk.get_submodule(path)(x)
        out.append(x)
    return out


@torch.no_grad()
def _probe(trunk: nn.Module, stages: tuple[Stage, ...]) -> tuple[int, list[tuple[int, ...]]]:
    """One pass of a small zero input through the stages (the trunk's mode kept): the input's side and each
    stage output's shape. Input channels and dimensions come from the trunk's first convolution."""
    conv = next(m for m in trunk.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
    dims = conv.weight.ndim - 2
    size = 32 if dims == 3 else 64
    was_training = trunk.training
    trunk.eval()
    shapes = [tuple(f.shape) for f in run_stages(trunk, stages, torch.zeros(1, conv.in_channels, *[size] * dims))]
    trunk.train(was_training)
    return size, shapes


def stage_channels(trunk: nn.Module, stages: tuple[Stage, ...]) -> list[int]:
    """The channels of each stage's output, from one pass of a small zero input (the trunk's mode kept)."""
    return [int(shape[1]) for shape in _probe(trunk, stages)[1]]
