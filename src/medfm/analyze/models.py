"""The model an analysis looks at: a registry trunk with its weights, or a fine-tuned card (trunk + head).

An :class:`AnalysisModel` carries the network, its preprocessing (the profile that cuts or shapes each input, plus a
fine-tuned card's margin and evaluation view), a label for tables and plots, and the provenance of its weights.
Intermediate layers are read with forward hooks (:class:`LayerTap`); "the trunk's main stages" are found by rule
(:func:`main_stages`) so that any registered 2D or 3D network works without a per-architecture table.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medfm.data.profiles import Profile, Profile2D, get_profile, profile_from_dict
from medfm.errors import ModelError
from medfm.models import hub
from medfm.models.registry import PUBLISHED, get_entry, load_model

RANDOM = "random"


@dataclass
class AnalysisModel:
    """A network to analyse: ``trunk`` maps a (B, C, …) batch to (B, D) features; ``head`` (fine-tuned cards) maps
    features to outputs. ``profile`` cuts each input (with a card's margin); ``view`` then shapes it (card's eval
    view), so inputs are exactly what the model saw in training."""

    name: str
    trunk: nn.Module
    profile: Profile | Profile2D
    head: nn.Module | None = None
    view: Callable[[np.ndarray], np.ndarray] | None = None
    provenance: dict = field(default_factory=dict)
    card: dict | None = None

    def __post_init__(self) -> None:
        self.trunk.eval()
        if self.head is not None:
            self.head.eval()

    @property
    def dims(self) -> int:
        """Spatial dimensions of the input: 2 for images, 3 for volumes."""
        return 2 if isinstance(self.profile, Profile2D) else 3

    def network(self) -> nn.Module:
        """Trunk followed by the head (the fine-tuned classifier); the trunk alone when there is no head."""
        if self.head is None:
            return self.trunk
        return nn.Sequential(self.trunk, self.head).eval()

    @torch.no_grad()
    def features(self, batch: torch.Tensor, chunk: int = 16) -> torch.Tensor:
        """Trunk features of a batch as float32 (B, D), run ``chunk`` inputs at a time."""
        outs = [self.trunk(batch[i : i + chunk]).float().flatten(1) for i in range(0, len(batch), chunk)]
        return torch.cat(outs) if outs else torch.zeros(0)


def _default_weights(name: str) -> str:
    """``published`` when the entry's weights are in the cache, else an error that says what to do."""
    entry = get_entry(name)
    if entry.weights is None:
        raise ModelError(
            f"model {name} has no published weights; pass --weights PATH, or --weights random to analyse a "
            "randomly initialised trunk"
        )
    path = hub.cached_path(entry.weights)
    if not path.is_file():
        raise ModelError(
            f"model {name}: its published weights are not in the cache ({path}); run `medfm weights download "
            f"{name}`, pass --weights PATH, or --weights random to analyse a randomly initialised trunk"
        )
    return PUBLISHED


def load_analysis_model(
    spec: str | os.PathLike[str],
    weights: str | None = None,
    profile: str | None = None,
    in_channels: int | None = None,
    seed: int = 0,
    min_coverage: float = 0.95,
) -> AnalysisModel:
    """A registry name with ``weights`` (``published``, a path, ``random``; None: published if cached, else an
    error suggesting ``random``), or the ``model.json`` card of ``medfm finetune fit`` (trunk + head)."""
    spec = str(spec)
    if spec.endswith(".json"):
        if weights not in (None, PUBLISHED):
            raise ModelError(f"{spec}: a fine-tuned card carries its own weights; leave --weights out")
        return load_card_model(spec)
    weights = weights or _default_weights(spec)
    entry = get_entry(spec)
    chosen = get_profile(profile or entry.profile)
    if isinstance(chosen, Profile2D) != (entry.dims == 2):
        raise ModelError(f"profile {chosen.name} does not fit the {entry.dims}D model {spec}")
    loaded = load_model(
        spec, None if weights == RANDOM else weights, min_coverage=min_coverage, seed=seed, in_channels=in_channels
    )
    if weights == RANDOM:
        label = f"{spec} (random)"
    elif weights == PUBLISHED:
        label = spec
    else:
        label = f"{spec} ({Path(weights).name})"
    provenance = {
        "model": spec,
        "weights": str(loaded.weights_path) if loaded.weights_path else None,
        "weights_sha256": loaded.weights_sha256,
        "random_init_seed": seed if loaded.weights_path is None else None,
        "profile": chosen.name,
    }
    return AnalysisModel(label, loaded.model, chosen, provenance=provenance)


def load_card_model(card_path: str | os.PathLike[str]) -> AnalysisModel:
    """A fine-tuned model card: trunk + head, cut with its profile and margin, shaped by its evaluation view."""
    from medfm.data.augment import build_view
    from medfm.finetune.outputs import load_finetuned

    card_path = Path(card_path)
    if not card_path.is_file():
        raise ModelError(f"{card_path}: model card not found")
    network, card = load_finetuned(card_path)
    if card.get("profile") is None:
        raise ModelError(f"{card_path}: trained on a prebuilt store, so it has no profile to cut new images with")
    profile = profile_from_dict(card["profile"], card["profile_spec"])
    margin = int(card.get("margin", 0))
    cut = replace(profile, size=tuple(s + 2 * margin for s in profile.size))
    dims = 2 if isinstance(profile, Profile2D) else 3
    spec = card.get("eval_view") or [{"op": "center_crop", "size": list(card["view_size"])}]
    pipeline = build_view(spec, dims)

    def view(array: np.ndarray) -> np.ndarray:
        return np.asarray(pipeline(array, 0), dtype=np.float32)

    provenance = {"model": str(card_path), "weights_sha256": card.get("sha256"), "profile": profile.name}
    name = card_path.parent.name or card_path.stem
    return AnalysisModel(f"{name} (fine-tuned)", network.trunk, cut, network.head, view, provenance, card)


def model_list(specs: list[str]) -> list[str]:
    """Model arguments as given: repeated, or comma lists (``resnet18,densenet121``)."""
    return [part.strip() for spec in specs for part in str(spec).split(",") if part.strip()]


def load_models(
    specs: list[str],
    weights: list[str] | None = None,
    profile: str | None = None,
    in_channels: int | None = None,
    seed: int = 0,
    min_coverage: float = 0.95,
) -> list[AnalysisModel]:
    """Several models, each with its own ``weights`` (one value for all, or one per model); all of one dimension."""
    names = model_list(specs)
    if not names:
        raise ModelError("name at least one model")
    weights = list(weights or [None])
    if len(weights) == 1:
        weights = weights * len(names)
    if len(weights) != len(names):
        raise ModelError(f"{len(weights)} --weights values for {len(names)} models; give one, or one per model")
    models = [load_analysis_model(n, w, profile, in_channels, seed, min_coverage) for n, w in zip(names, weights)]
    if len({m.dims for m in models}) > 1:
        raise ModelError(f"models {[m.name for m in models]} mix 2D and 3D inputs; analyse them separately")
    seen: dict[str, int] = {}
    for model in models:  # the same label twice (e.g. one name with two weight files of one name) gets a number
        seen[model.name] = seen.get(model.name, 0) + 1
        if seen[model.name] > 1:
            model.name = f"{model.name} #{seen[model.name]}"
    return models


@contextmanager
def tap_layers(model: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of ``model`` stores the outputs of the named submodules in the yielded dict."""
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        some = [n for n in modules if n and n.count(".") < 2][:40]
        raise ModelError(f"layer(s) {missing} not in the model; some of its layers: {some}")
    store: dict[str, torch.Tensor] = {}

    def hook_for(name: str) -> Callable:
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            store[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def main_stages(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The trunk's main stages: ``layer1…layer4`` of ResNets (2D and 3D); otherwise, among the children of
    ``features`` (DenseNet, EfficientNet, MobileNet, VGG) or of the model, the last one at each spatial size."""
    resnet = [f"layer{i}" for i in range(1, 5)]
    if all(isinstance(getattr(model, n, None), nn.Module) for n in resnet):
        return resnet
    container, prefix = model, ""
    if isinstance(getattr(model, "features", None), nn.Sequential):
        container, prefix = model.features, "features."
    pools = (nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Flatten)
    names = [prefix + n for n, m in container.named_children() if not isinstance(m, pools)]  # global pools: no space
    was_training = model.training
    model.eval()
    with tap_layers(model, names) as outputs:
        model(example[:1])
    model.train(was_training)
    stages: dict[tuple[int, ...], str] = {}
    for name in names:  # in forward order; a later module at the same size replaces an earlier one
        out = outputs.get(name)
        if isinstance(out, torch.Tensor) and out.ndim == example.ndim:
            stages[tuple(out.shape[2:])] = name
    if not stages:
        raise ModelError("no layer with spatial outputs found; name the layers with --layers")
    return list(stages.values())
