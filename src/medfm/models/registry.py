"""The model zoo: one decorator registers a builder with its feature size, profile and weights.

``create("fmcib-resnet50", weights="published")`` gives the network with the published weights from the
cache; ``weights=None`` gives it randomly initialised (as torchvision's ``weights=None``); a path loads
that file. Preprocessing travels with the entry as its profile name.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from medfm.data.profiles import get_profile
from medfm.errors import ModelError
from medfm.models import hub
from medfm.models.backbones import resnet3d
from medfm.models.checkpoints import LoadReport, load_weights

PUBLISHED = "published"


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: how to build it, what it outputs, which profile feeds it, where its weights are."""

    name: str
    builder: Callable[[], nn.Module]
    feature_dim: int
    profile: str
    weights: hub.WeightsSpec | None = None
    description: str = ""


@dataclass
class LoadedModel:
    """A built model with the provenance of its weights (None when randomly initialised)."""

    model: nn.Module
    entry: ModelEntry
    weights_path: Path | None
    weights_sha256: str | None
    report: LoadReport | None
    seed: int | None = None


_REGISTRY: dict[str, ModelEntry] = {}


def register(
    name: str,
    *,
    feature_dim: int,
    profile: str,
    weights: hub.WeightsSpec | None = None,
    description: str = "",
) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Decorator: register a builder under ``name``."""

    def wrap(builder: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        if name in _REGISTRY:
            raise ModelError(f"a model named {name!r} is already registered")
        get_profile(profile)
        _REGISTRY[name] = ModelEntry(
            name, builder, feature_dim, profile, weights, description or (builder.__doc__ or "")
        )
        return builder

    return wrap


def get_entry(name: str) -> ModelEntry:
    """The registry entry of a model name."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelError(f"unknown model {name!r}; known: {sorted(_REGISTRY)}") from None


def list_models() -> list[str]:
    """Names of the registered models."""
    return sorted(_REGISTRY)


def load_model(
    name: str, weights: str | os.PathLike[str] | None = PUBLISHED, min_coverage: float = 0.95, seed: int = 0
) -> LoadedModel:
    """Build a registered model and load its weights: ``'published'`` (cache), a path, or None (random, seeded)."""
    entry = get_entry(name)
    path: Path | None = None
    if weights is not None and str(weights) == PUBLISHED:
        if entry.weights is None:
            raise ModelError(f"model {name} has no published weights; pass a weight file or random init")
        path = hub.resolve(entry.weights, name)  # before building: a missing file fails at once
    elif weights is not None:
        path = Path(weights)
    torch.manual_seed(seed)
    model = entry.builder()
    if path is None:
        return LoadedModel(model.eval(), entry, None, None, None, seed=seed)
    report = load_weights(model, path, min_coverage=min_coverage)
    return LoadedModel(model.eval(), entry, path, hub.sha256_of(path), report)


def create(name: str, weights: str | os.PathLike[str] | None = None, min_coverage: float = 0.95) -> nn.Module:
    """Build a registered model: ``weights=None`` random init, ``'published'`` from the cache, or a path."""
    return load_model(name, weights, min_coverage).model


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
def fmcib_resnet50() -> nn.Module:
    """The FMCIB trunk (Pai et al., Nature Machine Intelligence 2024)."""
    return resnet3d(depth=50, widen_factor=2, conv1_t_stride=2)


@register(
    "resnet10-3d",
    feature_dim=512,
    profile="fmcib",
    description="MONAI 3D ResNet10 trunk on the fmcib profile: a small, fast network for experiments and tests",
)
def resnet10_3d() -> nn.Module:
    """A MONAI 3D ResNet10 trunk, 512-d pooled features."""
    return resnet3d(depth=10)
