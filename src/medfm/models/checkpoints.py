"""Read weights safely (what :func:`medfm.models.transfer.load_weights` and ``transfer_weights`` copy from).

Only ``torch.load(weights_only=True)`` and safetensors are used, so a checkpoint that would run code when
unpickled is refused before anything runs. Known layouts are unwrapped: FMCIB (``trunk_state_dict``),
Lightning (``state_dict`` with ``model.trunk.`` / ``model.heads.`` prefixes), DDP ``module.`` prefixes,
plain state dicts and safetensors files. A ``.tar`` / ``.tar.gz`` archive holding one weight file (as
RadiologyNET publishes them) is opened with every member checked first: absolute paths, ``..``, links and
devices are refused, and the weight file is extracted only into a temporary directory. A tensor holding a NaN or an infinity is
refused at load, by name (:func:`check_finite`). The weight file may expand to at most 4 GiB
(``MEDFM_MAX_ARCHIVE_MEMBER``): a decompression bomb is refused at the limit, before more is written.

The checkpoints of pre-training codebases (MoCo, SimCLR, BYOL, SwAV, PIRL, RadiologyNET, ...) are unwrapped
by rule in :mod:`medfm.models.adapters` (``detect_layout``, ``adapt``; ``read_trunk`` here does both).
"""

from __future__ import annotations

import os
import pickle
import pickletools
import re
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import torch

from medfm.errors import CheckpointError, ConfigError
from medfm.models.adapters import LAYOUTS, adapt, detect_layout

__all__ = [
    "LAYOUTS",
    "adapt",
    "check_finite",
    "detect_layout",
    "read_checkpoint",
    "read_trunk",
]


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
            tensors = dict(load_file(str(path), device="cpu"))
        except Exception as err:  # safetensors raises its own error types
            if path.suffix == ".safetensors":
                raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        else:
            return check_finite(tensors, str(path))
    if _is_tar(path):
        return _read_archive(path)
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
    return check_finite(obj, str(path))


def _tensors(obj: object, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in nested dicts / lists, with its dotted key."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _tensors(value, f"{prefix}.{i}" if prefix else str(i))


# Top-level keys of training checkpoints (Lightning, MoCo, ...) that hold training state, not weights.
TRAINING_STATE = frozenset({"callbacks", "optimizer_states", "optimizer", "lr_schedulers", "scheduler", "loops"})


def check_finite(checkpoint: Mapping[str, object], source: str = "the checkpoint") -> Mapping[str, object]:
    """Return ``checkpoint`` unchanged, or refuse it naming the first tensor that holds a NaN or an infinity.

    Weights with a NaN load without a word and give NaN features for every input, so they are refused at load.
    Training state beside the weights (callbacks, optimisers, schedulers, loops) is not checked: an infinity there
    is legitimate (ModelCheckpoint keeps ``kth_value = inf`` before its first best value).
    """
    weights = {k: v for k, v in checkpoint.items() if k not in TRAINING_STATE}
    for key, tensor in _tensors(weights):
        if tensor.is_floating_point() or tensor.is_complex():
            bad = ~torch.isfinite(tensor)
            if bool(bad.any()):
                kinds = " and ".join(
                    k for k, n in (("NaN", int(tensor.isnan().sum())), ("Inf", int(tensor.isinf().sum()))) if n
                )
                raise CheckpointError(
                    f"{source}: tensor {key!r} holds {int(bad.sum())} of {tensor.numel()} values that are not "
                    f"finite ({kinds}); the weights are damaged and are refused"
                )
    return checkpoint


# Suffixes of the weight file looked for inside an archive.
WEIGHT_SUFFIXES = (".pth.tar", ".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".torch", ".pkl", ".tar")
# The most one archive member may expand to (published weight files are at most a few hundred MB).
MAX_ARCHIVE_MEMBER = 4 << 30
MAX_ARCHIVE_MEMBER_ENV = "MEDFM_MAX_ARCHIVE_MEMBER"


def max_archive_member() -> int:
    """The cap on an archive member's size in bytes: ``$MEDFM_MAX_ARCHIVE_MEMBER`` (e.g. ``8G``, ``512M``), else 4 GiB."""
    text = os.environ.get(MAX_ARCHIVE_MEMBER_ENV, "").strip()
    if not text:
        return MAX_ARCHIVE_MEMBER
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:i?B)?", text, re.I)
    if not match:
        raise ConfigError(f"{MAX_ARCHIVE_MEMBER_ENV}={text!r}: give a number of bytes, e.g. 8G or 500M")
    unit = match.group(2).upper()
    return int(match.group(1)) << (10 * ("KMGT".index(unit) + 1) if unit else 0)


def copy_capped(source: BinaryIO, dest: BinaryIO, cap: int) -> int:
    """Copy ``source`` into ``dest`` until it ends or ``cap`` bytes are passed; returns the bytes read (> cap: cut).

    Never more than ``cap`` bytes plus one chunk are read, and never more than ``cap`` are written.
    """
    done = 0
    while True:
        block = source.read(min(_CHUNK, cap + 1 - done))
        if not block:
            return done
        done += len(block)
        if done > cap:
            return done
        dest.write(block)


def _too_big(path: Path, name: str, size: int | None, cap: int) -> str:
    """The refusal of a member bigger than ``cap`` (``size`` None: found while streaming)."""
    grows = f"expands to {size} bytes" if size is not None else "expands to more"
    return (
        f"{path}: refused — the archive's member {name!r} {grows}, more than the limit of {cap} bytes on one member "
        f"(a decompression bomb, or a file bigger than any published weights: set {MAX_ARCHIVE_MEMBER_ENV} to allow "
        "more); nothing was kept"
    )


_CHUNK = 1 << 20


def _is_tar(path: Path) -> bool:
    """Whether a file is a tar archive (plain or compressed); torch's own zip files are not.

    Not ``zipfile.is_zipfile``: it also says yes to an uncompressed tar whose last member is a torch zip file.
    """
    with open(path, "rb") as fh:
        if fh.read(4) == b"PK\x03\x04":
            return False
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError):
        return False


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    """Refuse the archive if a member could land outside the extraction folder or is not a plain file."""
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        reason = "an absolute path"
    elif ".." in PurePosixPath(name.replace("\\", "/")).parts:
        reason = "a '..' path"
    elif member.issym() or member.islnk():
        reason = f"a link (to {member.linkname!r})"
    elif member.isdev():
        reason = "a device or FIFO"
    elif not (member.isfile() or member.isdir()):
        reason = "neither a file nor a folder"
    else:
        return
    raise CheckpointError(f"{archive}: refused — the archive's member {name!r} is {reason}; nothing was extracted")


def _weight_member(archive: Path, members: list[tarfile.TarInfo]) -> tarfile.TarInfo:
    files = [
        m
        for m in members
        if m.isfile() and not PurePosixPath(m.name).name.startswith("._") and "__MACOSX" not in m.name.split("/")
    ]
    weights = [m for m in files if m.name.lower().endswith(WEIGHT_SUFFIXES)]
    candidates = weights or (files if len(files) == 1 else [])
    if len(candidates) != 1:
        names = [m.name for m in (candidates or files)][:10]
        what = "several weight files" if len(candidates) > 1 else "no weight file"
        raise CheckpointError(f"{archive}: the archive holds {what} (members: {names}); extract the one you want")
    return candidates[0]


def _read_archive(path: Path) -> dict[str, object]:
    """Read the one weight file of a tar archive: all members checked, extracted into a temporary folder only."""
    try:
        with tarfile.open(path, "r:*") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(path, member)
            if {"pickle", "storages", "tensors"} <= {m.name for m in members}:
                raise CheckpointError(
                    f"{path}: a checkpoint in PyTorch's legacy tar format, which cannot be read without running "
                    "its pickles; re-save it with a current PyTorch (torch.save) or as safetensors"
                )
            member = _weight_member(path, members)
            cap = max_archive_member()
            if member.size > cap:
                raise CheckpointError(_too_big(path, member.name, member.size, cap))
            with tempfile.TemporaryDirectory(prefix="medfm-archive-") as tmp:
                root = Path(tmp).resolve()
                dest = root / PurePosixPath(member.name).name
                source = tar.extractfile(member)
                if source is None:
                    raise CheckpointError(f"{path}: the archive's member {member.name!r} cannot be read")
                with source, open(dest, "wb") as fh:
                    if copy_capped(source, fh, cap) > cap:
                        raise CheckpointError(_too_big(path, member.name, None, cap))
                if not dest.is_relative_to(root) or not dest.is_file():
                    raise CheckpointError(f"{path}: refused — {member.name!r} would be extracted outside the folder")
                if _is_tar(dest):
                    raise CheckpointError(f"{path}: the archive's member {member.name!r} is itself an archive")
                try:
                    return read_checkpoint(dest)
                except CheckpointError as err:
                    raise CheckpointError(str(err).replace(str(dest), f"{path}[{member.name}]")) from None
    except (tarfile.TarError, EOFError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable tar archive ({err})") from None


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


def read_trunk(
    source: str | os.PathLike[str] | Mapping[str, object], layout: str | None = None
) -> tuple[dict[str, torch.Tensor], list[str], str]:
    """Read a checkpoint (a path, read safely, or a dict already in memory) and unwrap it by rule.

    Returns the trunk's tensors with torchvision-style names, the keys dropped as heads, and the layout.
    """
    checkpoint = check_finite(source, "the checkpoint") if isinstance(source, Mapping) else read_checkpoint(source)
    name = layout or detect_layout(checkpoint)
    state, dropped = adapt(checkpoint, name)
    return state, dropped, name
