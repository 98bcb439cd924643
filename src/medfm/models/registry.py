"""The model zoo: one decorator registers a builder with its feature size, profile and weights.

``create("fmcib-resnet50", weights="published")`` gives the network with the published weights from the
cache; ``weights=None`` gives it randomly initialised (as torchvision's ``weights=None``); a path loads
that file. Preprocessing travels with the entry as its profile name. ``dims`` tells 3D volume trunks (a 3D ``Profile``)
from 2D image trunks (a ``Profile2D``, torchvision networks built by :mod:`medfm.models.backbones2d`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn

from medfm.data.profiles import Profile, Profile2D, get_profile, profile_from_dict
from medfm.errors import MedfmError, ModelError
from medfm.models import hub
from medfm.models.backbones import resnet3d
from medfm.models.backbones2d import torchvision_trunk
from medfm.models.transfer import TransferReport, transfer_weights
from medfm.seeding import seeded

PUBLISHED = "published"


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: how to build it, what it outputs, which profile feeds it, where its weights are.

    ``dims`` is the number of spatial dimensions of its input: 3 for volume trunks, 2 for image trunks.
    """

    name: str
    builder: Callable[..., nn.Module]
    feature_dim: int
    profile: str
    weights: hub.WeightsSpec | None = None
    description: str = ""
    dims: int = 3


@dataclass
class LoadedModel:
    """A built model with the provenance of its weights (None when randomly initialised)."""

    model: nn.Module
    entry: ModelEntry
    weights_path: Path | None
    weights_sha256: str | None
    report: TransferReport | None
    seed: int | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register(
    name: str,
    *,
    feature_dim: int,
    profile: str,
    weights: hub.WeightsSpec | None = None,
    description: str = "",
    dims: int = 3,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register a builder under ``name`` (``dims=2`` for an image trunk with a 2D profile)."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ModelError(f"a model named {name!r} is already registered")
        if dims not in (2, 3):
            raise ModelError(f"model {name}: dims={dims}; allowed 2 or 3")
        kind = get_profile(profile)
        expected = Profile2D if dims == 2 else Profile
        if not isinstance(kind, expected):
            raise ModelError(f"model {name}: dims={dims} needs a {expected.__name__}, but {profile!r} is not one")
        _REGISTRY[name] = ModelEntry(
            name, builder, feature_dim, profile, weights, description or (builder.__doc__ or ""), dims
        )
        return builder

    return wrap


def get_entry(name: str) -> ModelEntry:
    """The registry entry of a model name (user models in ``$MEDFM_HOME/models`` included)."""
    load_user_models()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {sorted(_REGISTRY)}") from None


def list_models() -> list[str]:
    """Names of the registered models (user models in ``$MEDFM_HOME/models`` included)."""
    load_user_models()
    return sorted(_REGISTRY)


def load_model(
    name: str,
    weights: str | os.PathLike[str] | None = PUBLISHED,
    min_coverage: float = 0.95,
    seed: int = 0,
    in_channels: int | None = None,
) -> LoadedModel:
    """Build a registered model and load its weights: ``'published'`` (cache), a path, or None (random, seeded).

    ``in_channels`` changes the first convolution (e.g. 1 for grey images into a 3-channel ImageNet network);
    weights are then moved in with :func:`transfer_weights`, which sums (or spreads) the first conv's channels.
    """
    entry = get_entry(name)
    path: Path | None = None
    layout = None  # published files are read in the layout the catalogue names; other files are detected
    if weights is not None and str(weights) == PUBLISHED:
        if entry.weights is None:
            raise ModelError(f"model {name} has no published weights; pass a weight file or random init")
        path = hub.resolve(entry.weights, name)  # before building: a missing file fails at once
        layout = entry.weights.layout
    elif weights is not None:
        path = Path(weights)
    with seeded(seed):  # the caller's generator is left as it was
        model = entry.builder() if in_channels is None else entry.builder(in_channels=in_channels)
    if path is None:
        return LoadedModel(model.eval(), entry, None, None, None, seed=seed)
    # the model's own weights load exactly; into another first convolution they are adapted (channels summed)
    report = transfer_weights(path, model, min_coverage=min_coverage, layout=layout, exact=in_channels is None)
    return LoadedModel(model.eval(), entry, path, hub.sha256_of(path), report)


def create(
    name: str,
    weights: str | os.PathLike[str] | None = None,
    min_coverage: float = 0.95,
    in_channels: int | None = None,
    seed: int = 0,
) -> nn.Module:
    """Build a registered model: ``weights=None`` random init (seeded by ``seed``), ``'published'``, or a path."""
    return load_model(name, weights, min_coverage, seed=seed, in_channels=in_channels).model


def _torchvision_imagenet(filename: str) -> hub.WeightsSpec:
    """torchvision's ImageNet-1k weights: its file names end in the first 8 hex digits of their SHA-256."""
    return hub.WeightsSpec(
        filename=filename,
        url=f"https://download.pytorch.org/models/{filename}",
        sha256_prefix=filename.rsplit("-", 1)[1].split(".")[0],
    )


@register(
    "fmcib-resnet50",
    feature_dim=4096,
    profile="fmcib",
    weights=hub.WeightsSpec(
        filename="model_weights.torch",
        url="https://zenodo.org/records/10528450/files/model_weights.torch?download=1",
    ),
    description="FMCIB foundation model: MONAI 3D ResNet50, widen 2, first-conv stride 2, 4096-d pooled features",
)
def fmcib_resnet50(in_channels: int = 1) -> nn.Module:
    """The FMCIB trunk (Pai et al., Nature Machine Intelligence 2024)."""
    return resnet3d(depth=50, widen_factor=2, conv1_t_stride=2, in_channels=in_channels)


@register(
    "resnet10-3d",
    feature_dim=512,
    profile="fmcib",
    description="MONAI 3D ResNet10 trunk on the fmcib profile: a small, fast network for experiments and tests",
)
def resnet10_3d(in_channels: int = 1) -> nn.Module:
    """A MONAI 3D ResNet10 trunk, 512-d pooled features."""
    return resnet3d(depth=10, in_channels=in_channels)


# 2D image trunks: torchvision classifiers with their heads removed (medfm.models.backbones2d), random init.


@register(
    "densenet121",
    feature_dim=1024,
    profile="imagenet-224",
    dims=2,
    weights=_torchvision_imagenet("densenet121-a639ec97.pth"),
    description="torchvision DenseNet121 trunk: ReLU + global average pooling, 1024-d",
)
def densenet121(in_channels: int = 3) -> nn.Module:
    """torchvision DenseNet121 without its classifier."""
    return torchvision_trunk("densenet121", in_channels)


@register(
    "efficientnet-b3",
    feature_dim=1536,
    profile="imagenet-300",
    dims=2,
    weights=_torchvision_imagenet("efficientnet_b3_rwightman-b3899882.pth"),
    description="torchvision EfficientNet-B3 trunk: global average pooling, 1536-d",
)
def efficientnet_b3(in_channels: int = 3) -> nn.Module:
    """torchvision EfficientNet-B3 without its classifier."""
    return torchvision_trunk("efficientnet_b3", in_channels)


@register(
    "efficientnet-b4",
    feature_dim=1792,
    profile="imagenet-380",
    dims=2,
    weights=_torchvision_imagenet("efficientnet_b4_rwightman-23ab8bcd.pth"),
    description="torchvision EfficientNet-B4 trunk: global average pooling, 1792-d",
)
def efficientnet_b4(in_channels: int = 3) -> nn.Module:
    """torchvision EfficientNet-B4 without its classifier."""
    return torchvision_trunk("efficientnet_b4", in_channels)


@register(
    "inception-v3",
    feature_dim=2048,
    profile="imagenet-299",
    dims=2,
    weights=_torchvision_imagenet("inception_v3_google-0cc3c7bd.pth"),
    description="torchvision InceptionV3 trunk (no aux head, no input transform): global average pooling, 2048-d",
)
def inception_v3(in_channels: int = 3) -> nn.Module:
    """torchvision InceptionV3 without its auxiliary and final classifiers."""
    return torchvision_trunk("inception_v3", in_channels)


@register(
    "mobilenet-v3-small",
    feature_dim=576,
    profile="imagenet-224",
    dims=2,
    weights=_torchvision_imagenet("mobilenet_v3_small-047dcff4.pth"),
    description="torchvision MobileNetV3-Small trunk: global average pooling of the last conv, 576-d",
)
def mobilenet_v3_small(in_channels: int = 3) -> nn.Module:
    """torchvision MobileNetV3-Small without its classifier (hidden layer included)."""
    return torchvision_trunk("mobilenet_v3_small", in_channels)


@register(
    "mobilenet-v3-large",
    feature_dim=960,
    profile="imagenet-224",
    dims=2,
    weights=_torchvision_imagenet("mobilenet_v3_large-8738ca79.pth"),
    description="torchvision MobileNetV3-Large trunk: global average pooling of the last conv, 960-d",
)
def mobilenet_v3_large(in_channels: int = 3) -> nn.Module:
    """torchvision MobileNetV3-Large without its classifier (hidden layer included)."""
    return torchvision_trunk("mobilenet_v3_large", in_channels)


@register(
    "resnet18",
    feature_dim=512,
    profile="imagenet-224",
    dims=2,
    weights=_torchvision_imagenet("resnet18-f37072fd.pth"),
    description="torchvision ResNet18 trunk: global average pooling, 512-d",
)
def resnet18(in_channels: int = 3) -> nn.Module:
    """torchvision ResNet18 without ``fc``."""
    return torchvision_trunk("resnet18", in_channels)


@register(
    "resnet34",
    feature_dim=512,
    profile="imagenet-224",
    dims=2,
    weights=_torchvision_imagenet("resnet34-b627a593.pth"),
    description="torchvision ResNet34 trunk: global average pooling, 512-d",
)
def resnet34(in_channels: int = 3) -> nn.Module:
    """torchvision ResNet34 without ``fc``."""
    return torchvision_trunk("resnet34", in_channels)


@register(
    "resnet50",
    feature_dim=2048,
    profile="imagenet-224",
    dims=2,
    weights=_torchvision_imagenet("resnet50-0676ba61.pth"),
    description="torchvision ResNet50 trunk: global average pooling, 2048-d",
)
def resnet50(in_channels: int = 3) -> nn.Module:
    """torchvision ResNet50 without ``fc``."""
    return torchvision_trunk("resnet50", in_channels)


@register(
    "vgg16",
    feature_dim=512,
    profile="imagenet-224",
    dims=2,
    weights=_torchvision_imagenet("vgg16-397923af.pth"),
    description="torchvision VGG16 convolutional features + global average pooling, 512-d (no 4096-d fc layers)",
)
def vgg16(in_channels: int = 3) -> nn.Module:
    """torchvision VGG16's convolutional trunk, globally average-pooled."""
    return torchvision_trunk("vgg16", in_channels)


# Trunks described as data (pre-training configs, exported model cards): a registry name, or a family with arguments.


def trunk_args(name: str, args: dict | None) -> dict:
    """The trunk arguments a config means: ``resnet3d`` without any is the small ResNet10."""
    return dict(args or ({"depth": 10} if name == "resnet3d" else {}))


def build_trunk(name: str, in_channels: int | None = None, **args: object) -> tuple[nn.Module, int]:
    """A randomly initialised trunk and its feature size: a registered model name, or ``resnet3d`` with
    ``depth``, ``widen_factor``, ``conv1_t_stride`` (the MONAI 3D ResNet family that FMCIB's trunk belongs to)."""
    if name == "resnet3d":
        model = resnet3d(in_channels=in_channels or 1, **args)
        norms = [m for m in model.layer4.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return model, int(norms[-1].num_features)
    entry = get_entry(name)
    if args:
        raise ModelError(f"model {name} takes no trunk arguments (got {sorted(args)}); use name: resnet3d for those")
    model = entry.builder() if in_channels is None else entry.builder(in_channels=in_channels)
    return model, entry.feature_dim


def user_models_dir() -> Path:
    """Where exported models' cards (JSON) live: ``$MEDFM_HOME/models`` (their weights go to ``weights/``)."""
    return hub.medfm_home() / "models"


def register_card(card: dict, card_path: Path, replace: bool = False) -> ModelEntry:
    """Register an exported model from its card: trunk spec, feature size, profile, weight file in the cache.

    ``replace`` drops an entry of the same name first (an export written over an earlier one).
    """
    trunk = card["trunk"]
    builder = partial(_build_from_card, trunk["name"], trunk.get("args", {}), trunk.get("in_channels"))
    spec = hub.WeightsSpec(
        filename=card["weights"], url=f"(exported locally, card {card_path})", sha256=card.get("sha256")
    )
    if replace:
        _REGISTRY.pop(card["name"], None)
    register(
        card["name"],
        feature_dim=int(card["feature_dim"]),
        profile=profile_from_dict(card["profile"], card["profile_spec"]).name,
        weights=spec,
        description=card.get("description", f"exported from {card.get('source', {}).get('checkpoint', '?')}"),
        dims=int(card["dims"]),
    )(builder)
    return _REGISTRY[card["name"]]


def _build_from_card(name: str, args: dict, card_channels: int | None, in_channels: int | None = None) -> nn.Module:
    return build_trunk(name, in_channels or card_channels, **args)[0]


def load_user_models() -> None:
    """Register every card in ``$MEDFM_HOME/models`` not registered yet (a bad card is skipped with a warning)."""
    folder = user_models_dir()
    if not folder.is_dir():
        return
    for card_path in sorted(folder.glob("*.json")):
        try:
            card = json.loads(card_path.read_text())
            if card.get("name") in _REGISTRY:
                continue
            register_card(card, card_path)
        except (OSError, ValueError, KeyError, TypeError, MedfmError) as err:  # ProfileError too: a bad profile_spec
            warnings.warn(f"{card_path}: not a usable model card ({err}); skipped", stacklevel=2)
