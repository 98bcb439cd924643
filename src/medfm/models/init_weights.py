"""One vocabulary for what a trunk starts from, in every command (pretrain, finetune, detect, segment).

``random`` (or nothing): the builder's seeded initialisation; ``published``: the trunk's own published weights (a
registered trunk); a registered or exported model's name: its weights; anything else: a checkpoint path, in any
layout the weight transfer reads. Weights move in through :func:`medfm.models.transfer.transfer_weights`, whose
report says what was filled.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import nn

from medfm.errors import ConfigError, ModelError
from medfm.models import hub
from medfm.models.registry import PUBLISHED, get_entry, list_models
from medfm.models.transfer import TransferReport, transfer_weights

RANDOM = "random"


def initialise(
    trunk: nn.Module,
    name: str,
    init: str | os.PathLike[str] | Mapping[str, object] | None,
    min_coverage: float = 0.5,
    inflate: bool = False,
) -> TransferReport | None:
    """Move ``init``'s weights into ``trunk`` (built as the registered or family name ``name``); None for random.

    ``inflate`` turns 2D weights into a 3D trunk's; ``min_coverage`` is the least share of the trunk they must fill.
    """
    if init is None or (isinstance(init, (str, os.PathLike)) and str(init) in (RANDOM, "")):
        return None
    if isinstance(init, Mapping):  # a checkpoint or state dict already in memory
        return transfer_weights(init, trunk, inflate=inflate, min_coverage=min_coverage)
    init = str(init)
    if init == PUBLISHED and name not in list_models():
        raise ModelError(
            f"init=published: {name!r} is an architecture, not a registered model with published weights; name a "
            "registered trunk (e.g. fmcib-resnet50), a registered model or a checkpoint"
        )
    if init == PUBLISHED or init in list_models():
        source = name if init == PUBLISHED else init
        entry = get_entry(source)
        if entry.weights is None:
            raise ConfigError(f"init={init}: model {source} has no weights to start from")
        path = hub.resolve(entry.weights, source)
        return transfer_weights(path, trunk, inflate=inflate, min_coverage=min_coverage, layout=entry.weights.layout)
    if not os.path.exists(init):
        raise ModelError(
            f"init={init!r}: neither random, published, a registered model ({', '.join(list_models())}) nor an "
            "existing checkpoint file"
        )
    return transfer_weights(init, trunk, inflate=inflate, min_coverage=min_coverage)
