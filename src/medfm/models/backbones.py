"""Network builders: the MONAI 3D ResNet trunks, returning pooled features (no classifier)."""

from __future__ import annotations

from monai.networks.nets import resnet
from torch import nn

from medfm.errors import ConfigError

_DEPTHS = {10: resnet.resnet10, 18: resnet.resnet18, 34: resnet.resnet34, 50: resnet.resnet50}


def resnet3d(depth: int = 50, widen_factor: float = 1.0, conv1_t_stride: int = 1, in_channels: int = 1) -> nn.Module:
    """A MONAI 3D ResNet trunk that ends in global average pooling (``feed_forward=False``)."""
    if depth not in _DEPTHS:
        raise ConfigError(f"depth={depth}; allowed {sorted(_DEPTHS)}")
    return _DEPTHS[depth](
        pretrained=False,
        spatial_dims=3,
        n_input_channels=in_channels,
        widen_factor=widen_factor,
        conv1_t_stride=conv1_t_stride,
        feed_forward=False,
        bias_downsample=True,
    )
