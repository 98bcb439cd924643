"""Where a command runs its network: ``--device auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:1`` …"""

from __future__ import annotations

import torch

from medfm.errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; anything else is a torch device name (refused plainly when
    it is not one, or names a GPU this machine does not have)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"--device {device!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA GPU on this machine; use auto or cpu")
    return chosen
