"""Load weights safely and report what they covered.

Only ``torch.load(weights_only=True)`` and safetensors are used, so a checkpoint that would run code when
unpickled is refused before anything runs. Known layouts are unwrapped: FMCIB (``trunk_state_dict``),
Lightning (``state_dict`` with ``model.trunk.`` / ``model.heads.`` prefixes), DDP ``module.`` prefixes,
plain state dicts and safetensors files.
"""

from __future__ import annotations

import os
import pickle
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from medfm.errors import CheckpointError

TRUNK_PREFIXES = ("", "trunk.", "model.trunk.", "model.", "backbone.", "encoder.", "model.backbone.")


@dataclass
class LoadReport:
    """What a load did: keys loaded, missing from the file, unexpected in it, and of the wrong shape."""

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    prefix: str = ""
    coverage: float = 0.0

    def summary(self) -> str:
        """One line for a log or a terminal."""
        return (
            f"loaded {len(self.loaded)} tensors ({self.coverage:.1%} of the model's values), "
            f"missing {len(self.missing)}, unexpected {len(self.unexpected)}, shape-mismatched {len(self.mismatched)}"
        )

    def to_dict(self) -> dict[str, object]:
        """The report as plain JSON-ready data."""
        return {
            "loaded": len(self.loaded),
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": [list(m) for m in self.mismatched],
            "prefix": self.prefix,
            "coverage": self.coverage,
        }


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, object]:
    """Read a checkpoint file without running any code it might carry."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own error types
            if path.suffix == ".safetensors":
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not _is_pickle(path):  # random bytes, a web page, ...: nothing that could run code
            raise CheckpointError(
                f"{path}: not a readable PyTorch checkpoint (neither a pickle nor safetensors)"
            ) from None
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        reason = next((ln for ln in lines if "global" in ln.lower()), lines[0] if lines else "unsupported content")
        raise CheckpointError(
            f"{path}: refused — the file holds Python objects that could run code when loaded ({reason}). "
            "Only tensors and plain containers are accepted; convert it to a state dict or safetensors"
        ) from None
    except Exception as err:  # torch raises many kinds on bytes that are not a checkpoint (KeyError, IndexError, ...)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def _is_pickle(path: Path) -> bool:
    """Whether a file is a torch zip archive or parses as a pickle stream (opcodes only; nothing is executed)."""
    if zipfile.is_zipfile(path):
        return True
    try:
        with open(path, "rb") as fh:
            for _ in pickletools.genops(fh):
                pass
    except Exception:  # pickletools raises ValueError and others on bytes that are not a pickle
        return False
    return True


def trunk_state_dict(checkpoint: dict[str, object]) -> dict[str, torch.Tensor]:
    """The trunk's tensors from any known layout, with DDP ``module.`` prefixes removed."""
    state: object = checkpoint
    for key in ("trunk_state_dict", "state_dict", "model_state", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise CheckpointError("checkpoint holds no state dict")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"checkpoint holds no tensors (keys: {list(state)[:8]})")
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in tensors.items()}


def _best_prefix(source: dict[str, torch.Tensor], target_keys: set[str]) -> str:
    scores = {p: sum(1 for k in source if k.startswith(p) and k[len(p) :] in target_keys) for p in TRUNK_PREFIXES}
    return max(TRUNK_PREFIXES, key=lambda p: (scores[p], -TRUNK_PREFIXES.index(p)))


def load_state(model: nn.Module, source: dict[str, torch.Tensor], min_coverage: float = 0.95) -> LoadReport:
    """Copy matching tensors into ``model``; fail if they cover less than ``min_coverage`` of its values."""
    target = model.state_dict()
    prefix = _best_prefix(source, set(target))
    report = LoadReport(prefix=prefix)
    usable: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name is None or name not in target:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(target[name].shape):
            report.mismatched.append((name, tuple(value.shape), tuple(target[name].shape)))
        else:
            usable[name] = value
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in target if k not in usable and k not in {m[0] for m in report.mismatched})
    total = sum(t.numel() for t in target.values()) or 1
    report.coverage = sum(target[k].numel() for k in usable) / total
    if report.coverage < min_coverage:
        raise CheckpointError(
            f"the weights cover {report.coverage:.1%} of the model, below the {min_coverage:.0%} required "
            f"({report.summary()}; first missing: {report.missing[:3]}, first unexpected: {report.unexpected[:3]}). "
            "Pass a lower min_coverage (--min-coverage) to load anyway"
        )
    model.load_state_dict(usable, strict=False)
    return report


def load_weights(model: nn.Module, path: str | os.PathLike[str], min_coverage: float = 0.95) -> LoadReport:
    """Load a checkpoint file of any known layout into ``model`` safely; returns the report."""
    return load_state(model, trunk_state_dict(read_checkpoint(path)), min_coverage)
