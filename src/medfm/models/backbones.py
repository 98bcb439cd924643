"""Network builders: the 3D trunks (MONAI ResNets, MedicalNet ResNets, the Models Genesis encoder), returning
pooled features (no classifier)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


# MedicalNet (Med3D, Chen et al. 2019): 3D ResNets whose last two stages keep stride 1 and dilate instead (2, 4),
# with a parameter-free "A" shortcut (stride, then zero channels) or a 1x1 conv + BN "B" shortcut. MONAI's ResNet
# has neither dilation nor stride-1 late stages, so the trunk is written here, its module names those of
# MedicalNet's published files (conv1, bn1, layer1..4, downsample.0/1). Activations are functional: the trunk has
# no ``relu`` child, so it is not mistaken for a torchvision-style ResNet whose stages halve the resolution.

_MEDICALNET_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
# The shortcut each published file was trained with (MedicalNet's README): B for 10 and 50, A for 18 and 34.
MEDICALNET_SHORTCUT = {10: "B", 18: "A", 34: "A", 50: "B"}


class _ZeroPadShortcut(nn.Module):
    """Shortcut A: subsample by ``stride`` and append zero channels up to ``planes`` (no parameters)."""

    def __init__(self, planes: int, stride: int) -> None:
        super().__init__()
        self.planes, self.stride = planes, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The input subsampled, zero channels appended."""
        x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        pad = x.new_zeros(x.shape[0], self.planes - x.shape[1], *x.shape[2:])
        return torch.cat([x, pad], dim=1)


class _MedicalNetBlock(nn.Module):
    """A basic (two 3x3x3 convs) or bottleneck (1-3-1, expansion 4) residual block, convolutions without bias."""

    def __init__(
        self, inplanes: int, planes: int, bottleneck: bool, stride: int, dilation: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        out = planes * (4 if bottleneck else 1)
        self.bottleneck = bottleneck
        if bottleneck:
            self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
            self.conv2 = nn.Conv3d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
            self.conv3 = nn.Conv3d(planes, out, 1, bias=False)
            self.bn3 = nn.BatchNorm3d(out)
        else:
            self.conv1 = nn.Conv3d(inplanes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
            self.conv2 = nn.Conv3d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.bn2 = nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        if self.bottleneck:
            y = self.bn3(self.conv3(F.relu(y)))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class MedicalNetResNet(nn.Module):
    """MedicalNet's 3D ResNet encoder (its segmentation head ``conv_seg`` left out), globally average-pooled."""

    def __init__(self, depth: int, shortcut: str, in_channels: int = 1) -> None:
        super().__init__()
        if depth not in _MEDICALNET_BLOCKS:
            raise ConfigError(f"MedicalNet depth={depth}; allowed {sorted(_MEDICALNET_BLOCKS)}")
        if shortcut not in ("A", "B"):
            raise ConfigError(f"MedicalNet shortcut={shortcut!r}; allowed 'A' or 'B'")
        bottleneck = depth == 50
        self.conv1 = nn.Conv3d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        inplanes = 64
        stages = []
        for planes, blocks, stride, dilation in zip(
            (64, 128, 256, 512), _MEDICALNET_BLOCKS[depth], (1, 2, 1, 1), (1, 1, 2, 4), strict=True
        ):
            out = planes * (4 if bottleneck else 1)
            downsample: nn.Module | None = None
            if stride != 1 or inplanes != out:
                downsample = (
                    _ZeroPadShortcut(out, stride)
                    if shortcut == "A"
                    else nn.Sequential(nn.Conv3d(inplanes, out, 1, stride=stride, bias=False), nn.BatchNorm3d(out))
                )
            layer = [_MedicalNetBlock(inplanes, planes, bottleneck, stride, dilation, downsample)]
            layer += [_MedicalNetBlock(out, planes, bottleneck, 1, dilation, None) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layer))
            inplanes = out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = inplanes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled last-stage features, (N, 512) or (N, 2048)."""
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(F.adaptive_avg_pool3d(x, 1), 1)


def medicalnet_resnet(depth: int, in_channels: int = 1) -> nn.Module:
    """MedicalNet's 3D ResNet of ``depth`` with the shortcut its published file was trained with."""
    return MedicalNetResNet(depth, MEDICALNET_SHORTCUT.get(depth, "B"), in_channels)


# Models Genesis (Zhou et al. 2019/2021): the encoder of its 3D U-Net, four stages of two 3x3x3 conv + BN + ReLU
# (channels 32-64, 64-128, 128-256, 256-512), max-pooling after the first three. Module names are those of the
# published Genesis_Chest_CT.pt (down_tr64.ops.0.conv1, ...). Its input axes are (x, y, z) (the training cubes are
# SimpleITK arrays transposed to 64x64x32), so medfm's (Z, Y, X) patches are transposed on the way in. Models
# Genesis' own batch norm uses the statistics of the batch even in eval mode; here eval mode uses the running
# statistics stored in the file, so a row's features do not depend on the rows batched with it.


class _GenesisConv(nn.Module):
    """3x3x3 convolution (with bias), batch norm, ReLU."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """conv, BN, ReLU."""
        return F.relu(self.bn1(self.conv1(x)))


class _GenesisDown(nn.Module):
    """One encoder stage: ``ops`` (two convs), then 2x max-pooling unless it is the deepest."""

    def __init__(self, cin: int, depth: int) -> None:
        super().__init__()
        width = 32 * 2**depth
        self.ops = nn.Sequential(_GenesisConv(cin, width), _GenesisConv(width, 2 * width))
        self.pool = depth < 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The stage's output (pooled unless deepest)."""
        x = self.ops(x)
        return F.max_pool3d(x, 2) if self.pool else x


class GenesisEncoder(nn.Module):
    """The Models Genesis 3D U-Net encoder, deepest stage globally average-pooled (512-d)."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.down_tr64 = _GenesisDown(in_channels, 0)
        self.down_tr128 = _GenesisDown(64, 1)
        self.down_tr256 = _GenesisDown(128, 2)
        self.down_tr512 = _GenesisDown(256, 3)
        self.feature_dim = 512

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, Z, Y, X) patches in, (N, 512) pooled features out."""
        x = x.permute(0, 1, 4, 3, 2)  # medfm's (Z, Y, X) -> Models Genesis' (x, y, z)
        x = self.down_tr512(self.down_tr256(self.down_tr128(self.down_tr64(x))))
        return torch.flatten(F.adaptive_avg_pool3d(x, 1), 1)
