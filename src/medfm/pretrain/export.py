"""Export a pre-trained trunk from a Lightning checkpoint into the model registry (``$MEDFM_HOME``).

The trunk's weights go to ``weights/NAME.safetensors`` and a card to ``models/NAME.json`` (trunk architecture,
feature size, profile — with its full definition, so another machine can rebuild it — dims, SHA-256 and where it
came from). The registry reads the cards, so ``medfm extract --model NAME`` works at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from medfm.data.outputs import write_json, write_weights
from medfm.data.profiles import Profile2D, get_profile
from medfm.errors import ModelError
from medfm.models import hub
from medfm.models.checkpoints import read_checkpoint
from medfm.models.registry import build_trunk, get_entry, list_models, register_card, trunk_args, user_models_dir


def trunk_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The ``trunk.`` part of a Lightning checkpoint's state dict, prefix removed."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise ModelError("the checkpoint has no state_dict: is it a Lightning checkpoint of medfm pretrain?")
    trunk = {k[len("trunk.") :]: v for k, v in state.items() if k.startswith("trunk.")}
    if not trunk:
        raise ModelError("the checkpoint's state_dict has no trunk.* weights")
    return trunk


def export_trunk(
    checkpoint: str | os.PathLike[str],
    name: str,
    profile: str | None = None,
    description: str = "",
    overwrite: bool = False,
) -> Path:
    """Write the trunk of ``checkpoint`` as model ``name``; returns the card's path.

    ``profile`` defaults to the one the run was trained with (the data's ``profile``).
    """
    ckpt = read_checkpoint(checkpoint)
    hp = dict(ckpt.get("hyper_parameters") or {})
    data_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    card_path = user_models_dir() / f"{name}.json"
    if name in list_models() and not (overwrite and card_path.exists()):
        raise ModelError(f"a model named {name!r} already exists; choose another name (or overwrite an export)")
    if profile is None:
        if data_hp.get("store") is not None or "profile" not in data_hp:
            raise ModelError("the run read a prebuilt store, so its profile is unknown: pass --profile")
        profile = str(data_hp["profile"])
    spec = get_profile(profile)
    trunk_name = str(hp.get("trunk", "resnet3d"))
    args = trunk_args(trunk_name, hp.get("trunk_args"))
    in_channels = int(hp.get("in_channels", 1))
    model, feature_dim = build_trunk(trunk_name, in_channels, **args)
    state = trunk_state(ckpt)
    model.load_state_dict(state, strict=True)  # the card must rebuild exactly this network
    dims = 3 if trunk_name == "resnet3d" else get_entry(trunk_name).dims
    if (dims == 2) != isinstance(spec, Profile2D):
        raise ModelError(f"profile {profile} does not fit a {dims}D trunk")
    weights_name = f"{name}.safetensors"
    dest = hub.medfm_home() / "weights" / weights_name
    write_weights(model, dest)
    card = {
        "name": name,
        "trunk": {"name": trunk_name, "args": args, "in_channels": in_channels},
        "feature_dim": feature_dim,
        "profile": spec.name,
        "profile_spec": spec.to_dict(),
        "dims": dims,
        "weights": weights_name,
        "sha256": hub.sha256_of(dest),
        "description": description or f"{hp.get('method', 'pretrained')} {trunk_name} trunk from medfm pretrain",
        "source": {
            "checkpoint": str(Path(checkpoint).resolve()),
            "method": hp.get("method"),
            "epoch": ckpt.get("epoch"),
            "global_step": ckpt.get("global_step"),
        },
    }
    write_json(card, card_path)
    register_card(card, card_path, replace=True)  # an overwritten export replaces the entry of this process too
    return card_path
