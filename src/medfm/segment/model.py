"""A U-Net whose encoder is a registered trunk (2D torchvision ResNet/DenseNet, 3D MONAI ResNet), kept whole.

The trunk is the ``encoder`` submodule with its own module names, so any checkpoint the weight transfer reads for
that trunk fills it (``encoder.layer1.0.conv1.weight`` ← ``layer1.0.conv1.weight``). The encoder's stages are run
one by one; the output of each (strides 2, 4, 8, 16, 32 for a ResNet) is a skip connection. The decoder, written
here, upsamples to each skip's size (so any input size works), concatenates, and applies two conv-norm-ReLU layers;
a last stage returns to the input's size and a 1×1 convolution gives one logit per class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.inferers import sliding_window_inference
from torch import nn

from medfm.errors import ConfigError
from medfm.models.init_weights import initialise
from medfm.models.registry import build_trunk
from medfm.models.registry import trunk_args as resolve_trunk_args
from medfm.models.stages import run_stages, stage_channels, trunk_blocks, trunk_stages
from medfm.models.transfer import TransferReport
from medfm.train.freeze import freeze_blocks


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _norm(dims: int) -> type[nn.Module]:
    return nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d


class ConvBlock(nn.Sequential):
    """Two 3×3(×3) convolutions, each followed by batch norm and ReLU."""

    def __init__(self, dims: int, in_channels: int, out_channels: int) -> None:
        conv, norm = _conv(dims), _norm(dims)
        super().__init__(
            conv(in_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(inplace=True),
            conv(out_channels, out_channels, 3, padding=1, bias=False),
            norm(out_channels),
            nn.ReLU(inplace=True),
        )


class SegmentationUNet(nn.Module):
    """Encoder (a registered trunk, names kept) + U-Net decoder + 1×1 head: (B, C, *S) → (B, classes, *S) logits.

    ``decoder_channels``: widths of the five decoder stages, deepest first (the last runs at the input's size).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, decoder_channels: list[int] | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.stages = trunk_stages(encoder, "a U-Net encoder")
        first = next(m for m in encoder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d)))
        self.dims = 3 if isinstance(first, nn.Conv3d) else 2
        self.in_channels = int(first.in_channels)
        widths = list(decoder_channels or [256, 128, 64, 32, 16])
        if len(widths) != len(self.stages):
            raise ConfigError(f"decoder_channels needs {len(self.stages)} widths (deepest first), got {widths}")
        skips = stage_channels(encoder, self.stages)
        blocks = []
        previous = skips[-1]
        for skip, width in zip([*skips[-2::-1], 0], widths):
            blocks.append(ConvBlock(self.dims, previous + skip, width))
            previous = width
        self.decoder = nn.ModuleList(blocks)
        self.head = _conv(self.dims)(previous, num_classes, 1)
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's outputs after each stage (finest first)."""
        return run_stages(self.encoder, self.stages, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at the input's resolution."""
        size = x.shape[2:]
        skips = self.features(x)
        y = skips[-1]
        mode = "trilinear" if self.dims == 3 else "bilinear"
        targets = [*skips[-2::-1], None]
        for block, skip in zip(self.decoder, targets):
            y = F.interpolate(y, size=size if skip is None else skip.shape[2:], mode=mode, align_corners=False)
            y = block(y if skip is None else torch.cat([y, skip], dim=1))
        return self.head(y)


def infer_logits(
    net: nn.Module, image: torch.Tensor, roi: tuple[int, ...] | None, overlap: float = 0.5, sw_batch_size: int = 4
) -> torch.Tensor:
    """Class logits of whole images (B, C, *S): one pass when they fit the window ``roi``, else MONAI's sliding
    window with ``overlap`` and Gaussian blending."""
    if roi is None or all(s <= r for s, r in zip(image.shape[2:], roi)):
        return net(image)
    return sliding_window_inference(image, roi, sw_batch_size, net, overlap=overlap, mode="gaussian")


def build_unet(
    encoder: str,
    encoder_args: dict | None,
    in_channels: int,
    num_classes: int,
    decoder_channels: list[int] | None = None,
) -> SegmentationUNet:
    """A U-Net on a randomly initialised registered trunk (or ``resnet3d`` with ``encoder_args``)."""
    trunk, _ = build_trunk(encoder, in_channels, **resolve_trunk_args(encoder, encoder_args))
    return SegmentationUNet(trunk, num_classes, decoder_channels)


def initialise_encoder(
    model: SegmentationUNet,
    encoder: str,
    init: str,
    min_coverage: float = 0.5,
    inflate: bool = False,
) -> TransferReport | None:
    """Move weights into the encoder only (:func:`medfm.models.init_weights.initialise`); ``inflate`` turns 2D
    weights into a 3D encoder's."""
    return initialise(model.encoder, encoder, init, min_coverage, inflate)


@dataclass
class InitReport:
    """What the U-Net's initialisation did: the encoder's transfer report and the decoder's share, separately."""

    init: str
    encoder: TransferReport | None
    encoder_values: int
    decoder_values: int

    @property
    def encoder_coverage(self) -> float:
        """Share of the encoder's values that came from the source (0 for random init)."""
        return 0.0 if self.encoder is None else self.encoder.coverage

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: encoder coverage and report, decoder left at its initialisation."""
        return {
            "init": self.init,
            "encoder_coverage": self.encoder_coverage,
            "encoder_values": self.encoder_values,
            "decoder": {"coverage": 0.0, "values": self.decoder_values, "state": "random initialisation"},
            "model_coverage": self.encoder_coverage
            * self.encoder_values
            / max(1, self.encoder_values + self.decoder_values),
            "encoder_report": None if self.encoder is None else self.encoder.to_dict(),
        }

    def summary(self) -> str:
        """Lines for a terminal."""
        head = (
            f"init {self.init}: encoder coverage {self.encoder_coverage:.2%} of {self.encoder_values:,} values; "
            f"decoder + head: {self.decoder_values:,} values at random initialisation"
        )
        return head if self.encoder is None else head + "\nencoder " + self.encoder.summary()


def init_report(model: SegmentationUNet, init: str, report: TransferReport | None) -> InitReport:
    """Count encoder and decoder values beside the transfer report."""
    enc = sum(v.numel() for v in model.encoder.state_dict().values())
    total = sum(v.numel() for v in model.state_dict().values())
    return InitReport(init or "random", report, enc, total - enc)


def freeze_encoder(model: SegmentationUNet, freeze: str) -> list[str]:
    """Freeze ``encoder`` or ``encoder-until-BLOCK`` (blocks up to and including it); returns the frozen paths."""
    return freeze_blocks(model.encoder, trunk_blocks(model.encoder), freeze, "encoder")
