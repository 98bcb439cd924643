"""2D network builders: torchvision classifiers turned into trunks that return pooled features (B, D).

The networks are built with ``weights=None`` (nothing is ever downloaded) and changed in place, keeping
torchvision's module names, so that a torchvision state dict loads into a trunk with matching keys; only the
classifier's keys (and InceptionV3's auxiliary head) are left over, reported as unused.

How each family becomes a trunk:

* ResNet, InceptionV3: ``fc`` becomes ``Identity``; the forward already ends in global average pooling and
  flattening. InceptionV3 is built with ``aux_logits=False`` (no ``AuxLogits`` branch), ``init_weights=False``
  and ``transform_input=False`` (inputs are normalised by the profile, not re-normalised inside the net), and
  its ``dropout`` before ``fc`` becomes ``Identity`` so that the trunk never drops features, even in training
  mode (dropout holds no weights; the head that follows decides its own regularisation).
* DenseNet: ``classifier`` becomes ``Identity``; torchvision's forward applies ReLU, global average pooling
  and flattening before it.
* EfficientNet, MobileNetV3: ``classifier`` becomes ``Identity``; the features are those of the global
  average pooling after the last convolution (EfficientNet's classifier is dropout + linear; MobileNetV3's
  classifier has a hidden layer of 1024/1280 units that belongs to the ImageNet head and is dropped too).
* VGG: the convolutional features, global average pooling and flattening (512-d): ``avgpool`` becomes
  ``AdaptiveAvgPool2d(1)`` and ``classifier`` becomes ``Identity``. The 4096-d fully connected layers are
  not kept: they hold about 90% of VGG16's weights, were trained as an ImageNet classifier on a fixed 7×7
  grid, and a pooled convolutional descriptor is the usual transfer feature (and works at any input size).
  The network is built on the meta device and only its kept part is materialised, with torchvision's VGG
  initialisation, so the 120M discarded classifier weights are never allocated.

``in_channels`` other than 3 replaces the first convolution by one of the same geometry (kernel, stride,
padding, bias) with that many input channels, freshly initialised; mapping 3-channel checkpoint weights onto
it is the weight-transfer code's job.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from torch import nn

from medfm.errors import ConfigError

# family -> (dotted path of the first convolution, function that removes the head in place)
_FAMILIES: dict[str, tuple[str, Callable[[nn.Module], None]]] = {}


def _family(prefix: str, first_conv: str) -> Callable[[Callable[[nn.Module], None]], Callable[[nn.Module], None]]:
    def wrap(strip: Callable[[nn.Module], None]) -> Callable[[nn.Module], None]:
        _FAMILIES[prefix] = (first_conv, strip)
        return strip

    return wrap


@_family("resnet", "conv1")
def _strip_fc(model: nn.Module) -> None:
    model.fc = nn.Identity()


@_family("inception_v3", "Conv2d_1a_3x3.conv")
def _strip_inception(model: nn.Module) -> None:
    model.fc = nn.Identity()
    model.dropout = nn.Identity()


@_family("densenet", "features.conv0")
def _strip_densenet(model: nn.Module) -> None:
    model.classifier = nn.Identity()


@_family("efficientnet", "features.0.0")
def _strip_efficientnet(model: nn.Module) -> None:
    model.classifier = nn.Identity()


@_family("mobilenet_v3", "features.0.0")
def _strip_mobilenet(model: nn.Module) -> None:
    model.classifier = nn.Identity()


@_family("vgg", "features.0")
def _strip_vgg(model: nn.Module) -> None:
    model.avgpool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Identity()


_ARCHS = (
    *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
    *(f"densenet{d}" for d in (121, 161, 169, 201)),
    *(f"efficientnet_b{i}" for i in range(8)),
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    *(f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")),
    "inception_v3",
)


def supported_archs() -> list[str]:
    """The torchvision architecture names that ``torchvision_trunk`` accepts."""
    return sorted(_ARCHS)


def _family_of(arch: str) -> tuple[str, Callable[[nn.Module], None]]:
    for prefix, family in _FAMILIES.items():
        if arch.startswith(prefix):
            return family
    raise AssertionError(f"no family for {arch}")  # every name in _ARCHS has one


def _replace_first_conv(model: nn.Module, path: str, in_channels: int) -> None:
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    old = parent.get_submodule(attribute)
    if not isinstance(old, nn.Conv2d):
        raise TypeError(f"{path} is a {type(old).__name__}, expected the first Conv2d")
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        dilation=old.dilation,
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    setattr(parent, attribute, new)


def _vgg_trunk(name: str, strip: Callable[[nn.Module], None]) -> nn.Module:
    """VGG without ever allocating its classifier: built on meta, stripped, then materialised and initialised."""
    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, init_weights=False)
    strip(model)
    model = model.to_empty(device="cpu")
    for module in model.modules():  # torchvision's VGG initialisation of the kept layers
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()  # weight 1, bias 0 and fresh running statistics
    return model


def torchvision_trunk(arch: str, in_channels: int = 3) -> nn.Module:
    """A torchvision classifier (``weights=None``) with its head removed in place: returns pooled (B, D) features."""
    name = arch.replace("-", "_").lower()
    if name not in _ARCHS:
        raise ConfigError(f"arch={arch!r}; supported: {supported_archs()}")
    if in_channels < 1:
        raise ConfigError(f"in_channels={in_channels}; must be at least 1")
    kwargs: dict[str, object] = {}
    if name == "inception_v3":
        kwargs = {"aux_logits": False, "init_weights": False, "transform_input": False}
    first_conv, strip = _family_of(name)
    if name.startswith("vgg"):
        model = _vgg_trunk(name, strip)
    else:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
        strip(model)
    if in_channels != 3:
        _replace_first_conv(model, first_conv, in_channels)
    return model
