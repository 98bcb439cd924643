"""Unwrap the checkpoints of known pre-training codebases into a plain trunk state dict.

Every layout is a rule: where the tensors sit in the checkpoint (``containers``), which wrapper prefixes to
strip (``prefixes``) and which tensors are heads to drop (``heads``: glob patterns of key names; a key is
dropped only when it matches one, never merely because it fails to match a trunk). The result uses
torchvision-style names (``conv1.weight``, ``layer1.0.bn1.weight``, ``features.denseblock1...``).

``detect_layout(checkpoint)`` names the layout; ``adapt(checkpoint, layout=None)`` returns the trunk's
tensors and the keys that were dropped as heads.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from medfm.errors import CheckpointError

LIGHTNING_MARKERS = (
    "pytorch-lightning_version",
    "global_step",
    "optimizer_states",
    "lr_schedulers",
    "hyper_parameters",
    "loops",
)


@dataclass(frozen=True)
class Layout:
    """How one codebase stores its trunk: containers, wrapper prefixes and head patterns."""

    name: str
    description: str
    containers: tuple[tuple[str, ...], ...] = ((),)
    prefixes: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    head_containers: tuple[str, ...] = ()


_GENERIC_CONTAINERS = (("state_dict",), ("model_state_dict",), ("model",), ())

LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("torchvision", "plain state dict (torchvision names), passed through", _GENERIC_CONTAINERS),
        Layout(
            "fmcib",
            "FMCIB: trunk_state_dict (head_state_dict dropped)",
            (("trunk_state_dict",),),
            head_containers=("head_state_dict",),
        ),
        Layout(
            "radiologynet",
            "RadiologyNET: model_state with model./backbone. wrappers; fc/classifier/AuxLogits dropped",
            (("model_state",),),
            ("model.backbone.", "model.", "backbone."),
            ("fc.*", "classifier.*", "AuxLogits.*", "heads.*"),
        ),
        Layout(
            "moco",
            "MoCo v1/v2/v3, MoCo-CXR, MIMIC-CheXpert MoCo DenseNets: encoder_q. (or base_encoder.) trunk; "
            "encoder_k, queue and fc/classifier projection heads dropped",
            (("state_dict",), ("model",), ()),
            ("model.encoder_q.", "encoder_q.", "base_encoder."),  # model.: CovidPrognosis' Lightning checkpoints
            (
                "model.encoder_k.*",
                "model.queue*",
                "encoder_k.*",
                "momentum_encoder.*",
                "queue*",
                "fc.*",
                "classifier.*",
                "head.*",
                "predictor.*",
            ),
        ),
        Layout(
            "simclr",
            "SimCLR / SimCLR-v2 converted: encoder./backbone./resnet. trunk; projection heads dropped",
            (("state_dict",), ("resnet",), ()),
            ("model.encoder.", "model.backbone.", "encoder.", "backbone.", "resnet."),
            ("projection_head.*", "projector.*", "projection.*", "head.*", "heads.*", "fc.*", "contrastive_head.*"),
            head_containers=("head",),
        ),
        Layout(
            "byol",
            "BYOL converted: online_network.encoder. / online_encoder. trunk; projector, predictor, target dropped",
            (("online_network_state_dict",), ("state_dict",), ()),
            ("online_network.encoder.", "online_encoder.net.", "online_encoder.", "encoder.", "net."),
            (
                "online_network.projector.*",
                "online_network.projection.*",
                "online_network.projetion.*",  # sic: the name used by a common BYOL implementation
                "online_network.predictor.*",
                "online_encoder.projector.*",
                "online_predictor.*",
                "target_*",
                "projector.*",
                "projection.*",
                "projetion.*",
                "predictor.*",
                "fc.*",
            ),
            head_containers=("target_network_state_dict",),
        ),
        Layout(
            "swav",
            "SwAV: module. prefix; prototypes and projection_head dropped",
            (("state_dict",), ()),
            (),
            ("prototypes*", "projection_head.*", "fc.*"),
        ),
        Layout(
            "pirl",
            "PIRL (VISSL / converted): trunk. / _feature_blocks. / model. prefixes; heads dropped",
            (("classy_state_dict", "base_model", "model"), ("model_state_dict",), ("state_dict",), ()),
            (
                "model.trunk._feature_blocks.",
                "trunk._feature_blocks.",
                "_feature_blocks.",
                "model.trunk.",
                "trunk.",
                "model.",
            ),
            ("heads.*", "model.heads.*", "head.*", "projection_head*", "fc.*"),
        ),
        Layout(
            "medicalnet",
            "MedicalNet (Med3D): state_dict with DataParallel's module. prefix; the segmentation head conv_seg dropped",
            (("state_dict",),),
            (),
            ("conv_seg.*",),
        ),
        Layout(
            "models-genesis",
            "Models Genesis: state_dict with module. prefix; the U-Net decoder (up_tr*) and out_tr dropped",
            (("state_dict",),),
            (),
            ("up_tr*", "out_tr.*"),
        ),
        Layout(
            "lightning",
            "Lightning: state_dict with model.trunk./model.backbone./model./backbone. prefixes; model.heads dropped",
            (("state_dict",),),
            ("model.trunk.", "model.backbone.", "model.", "backbone."),
            ("model.heads.*", "heads.*", "model.head.*", "head.*"),
        ),
    )
}

# Keys of ResNets stored as ``nn.Sequential(*list(resnet.children())[:-1])`` (e.g. BYOL's encoder): index → name.
_RESNET_CHILDREN = {"0": "conv1", "1": "bn1", "4": "layer1", "5": "layer2", "6": "layer3", "7": "layer4"}
# DenseNet checkpoints saved before torchvision 0.2 name ``norm.1`` what is now ``norm1`` (and so on).
_LEGACY_DENSENET = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)


def _get(checkpoint: Mapping[str, object], path: tuple[str, ...]) -> object:
    node: object = checkpoint
    for part in path:
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _flatten(node: Mapping[str, object], prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a (possibly nested) dict, nested keys joined with dots; other values are left out."""
    out: dict[str, torch.Tensor] = {}
    for key, value in node.items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{key}"] = value
        elif isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
    return out


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def _container(checkpoint: Mapping[str, object], layout: Layout) -> dict[str, torch.Tensor]:
    for path in layout.containers:
        node = _get(checkpoint, path)
        if isinstance(node, Mapping):
            tensors = _flatten(node)
            if tensors:
                return tensors
    where = " or ".join(".".join(p) or "the top level" for p in layout.containers)
    raise CheckpointError(
        f"no tensors where the {layout.name} layout keeps them ({where}); keys: {list(checkpoint)[:8]}"
    )


def _tensor_keys(checkpoint: Mapping[str, object]) -> list[str]:
    for path in (("state_dict",), ("model_state_dict",), ("model",), ()):
        node = _get(checkpoint, path)
        if isinstance(node, Mapping):
            keys = [_strip_module(k) for k in _flatten(node)]
            if keys:
                return keys
    return []


def detect_layout(checkpoint: Mapping[str, object]) -> str:
    """The name of the layout a checkpoint (a dict, as read by ``read_checkpoint``) is stored in."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"a checkpoint is a dict; got a {type(checkpoint).__name__}")
    top = set(checkpoint)
    if "trunk_state_dict" in top:
        return "fmcib"
    if "classy_state_dict" in top:
        return "pirl"
    if "model_state" in top:
        return "radiologynet"
    if "online_network_state_dict" in top:
        return "byol"
    if isinstance(checkpoint.get("resnet"), Mapping) and isinstance(checkpoint.get("head"), Mapping):
        return "simclr"
    keys = _tensor_keys(checkpoint)
    if not keys:
        raise CheckpointError(f"checkpoint holds no tensors (keys: {list(checkpoint)[:8]})")

    def starts(*prefixes: str) -> bool:
        return any(k.startswith(prefixes) for k in keys)

    if starts("encoder_q.", "encoder_k.", "base_encoder.", "momentum_encoder.", "queue", "model.encoder_q."):
        return "moco"
    if starts("online_network.", "online_encoder.", "online_predictor.", "target_network.", "target_encoder."):
        return "byol"
    if starts("conv_seg."):
        return "medicalnet"
    if starts("down_tr64.", "up_tr64.", "out_tr."):
        return "models-genesis"
    if starts("prototypes"):
        return "swav"
    if any("_feature_blocks." in k for k in keys) or (starts("trunk.") and starts("heads.")):
        return "pirl"
    if "state_dict" not in top and starts("model.") and starts("model.heads.", "heads.", "model.projection_head"):
        return "pirl"
    if starts("projection_head.", "projector.", "projection.", "contrastive_head."):
        return "simclr"
    if "state_dict" in top and any(marker in top for marker in LIGHTNING_MARKERS):
        return "lightning"
    if "state_dict" in top and starts("encoder.", "backbone.", "resnet."):
        return "simclr"
    if "state_dict" in top and starts("model."):
        return "lightning"
    return "torchvision"


def _rename_resnet_children(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``0.weight`` → ``conv1.weight``, ``4.0.conv1.weight`` → ``layer1.0.conv1.weight`` for Sequential ResNets."""
    heads = {k.split(".", 1)[0] for k in state}
    first = state.get("0.weight")
    if not state or not heads <= set(_RESNET_CHILDREN) or first is None or first.ndim < 4:
        return state
    return {_RESNET_CHILDREN[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in state.items()}


def adapt(checkpoint: Mapping[str, object], layout: str | None = None) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The trunk's tensors with torchvision-style names, and the keys dropped as heads.

    ``layout`` forces a layout (see ``LAYOUTS``); by default it is detected. Dropped keys are named as they
    are in the checkpoint's container (``module.encoder_k.conv1.weight``, ``head_state_dict.0.weight``).
    """
    name = layout or detect_layout(checkpoint)
    if name not in LAYOUTS:
        raise CheckpointError(f"unknown checkpoint layout {name!r}; known: {sorted(LAYOUTS)}")
    spec = LAYOUTS[name]
    source = _container(checkpoint, spec)
    dropped: list[str] = []
    for container in spec.head_containers:
        node = checkpoint.get(container) if isinstance(checkpoint, Mapping) else None
        if isinstance(node, Mapping):
            dropped += [f"{container}.{k}" for k in _flatten(node)]
    prefixes = sorted(spec.prefixes, key=len, reverse=True)
    kept: dict[str, tuple[str, torch.Tensor]] = {}
    for key, value in source.items():
        bare = _strip_module(key)
        trunk = next((bare[len(p) :] for p in prefixes if bare.startswith(p)), bare)
        if any(fnmatchcase(bare, pat) or fnmatchcase(trunk, pat) for pat in spec.heads):
            dropped.append(key)
            continue
        trunk = _LEGACY_DENSENET.sub(r"\1\2", trunk)
        if trunk in kept:
            other_key, other = kept[trunk]
            same = other is value or (
                other.shape == value.shape
                and other.dtype == value.dtype
                and (
                    (other.data_ptr() == value.data_ptr() and other.stride() == value.stride())
                    or torch.equal(other, value)
                )
            )
            if same:
                continue  # the same module registered twice (RadiologyNET's DenseNet keeps features. and model.features.)
            raise CheckpointError(f"{other_key!r} and {key!r} both become {trunk!r} but hold different tensors")
        kept[trunk] = (key, value)
    state = _rename_resnet_children({k: v for k, (_, v) in kept.items()})
    if not state:
        raise CheckpointError(f"the {name} layout left no trunk tensors (dropped {len(dropped)} head tensors)")
    return state, dropped
