"""Models: the registry (zoo), network builders, safe checkpoint loading and the weight cache."""

from medfm.models import catalogue  # noqa: F401 - registers the published checkpoints of the studies
from medfm.models.checkpoints import read_checkpoint
from medfm.models.registry import PUBLISHED, LoadedModel, create, get_entry, list_models, load_model, register
from medfm.models.transfer import TransferReport, load_weights, transfer_weights

__all__ = [
    "PUBLISHED",
    "LoadedModel",
    "TransferReport",
    "create",
    "get_entry",
    "list_models",
    "load_model",
    "load_weights",
    "read_checkpoint",
    "register",
    "transfer_weights",
]
