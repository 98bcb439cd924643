"""The weight cache and downloads: resumable, with a progress bar, verified by size and SHA-256.

Nothing here touches the network unless :func:`download` is called; a missing file is an error that names
the file, the URL and the command that fetches it. A file whose SHA-256 the registry does not pin (FMCIB,
RadiologyNET, MoCo, SwAV, ...) is pinned on first use: the hash of the first verified copy is recorded beside it
(``FILE.sha256.json``), and a later file that differs is refused unless the user trusts it
(``medfm weights download NAME --trust-new-hash``, or ``MEDFM_TRUST_NEW_HASH=1`` when loading).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from medfm.errors import WeightsError
from medfm.progress import progress_bar

CHUNK = 1 << 20


@dataclass(frozen=True)
class WeightsSpec:
    """Where a published weight file lives and what it must hash to."""

    filename: str
    url: str
    sha256: str | None = None
    size: int | None = None
    sha256_prefix: str | None = None  # when only the start of the hash is published (torchvision's file names)
    layout: str | None = None  # the checkpoint layout of medfm.models.adapters the file is in (None: detected)
    convert: str | None = None  # published in a format medfm does not read: how to convert it, done by the user


def medfm_home() -> Path:
    """The cache folder: ``$MEDFM_HOME``, else ``~/.cache/medfm``."""
    return Path(os.environ.get("MEDFM_HOME") or Path.home() / ".cache" / "medfm").expanduser()


def cached_path(spec: WeightsSpec) -> Path:
    """Where a weight file lives in the cache (whether or not it is there)."""
    return medfm_home() / "weights" / spec.filename


_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> SHA-256: a file hashed once per process


def sha256_of(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, hex (remembered for the process while the file's size and modification time stay)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHES:
        from medfm.data.outputs import file_sha256

        _HASHES[key] = file_sha256(path)
    return _HASHES[key]


TRUST_NEW_HASH_ENV = "MEDFM_TRUST_NEW_HASH"


def pin_path(weights: str | os.PathLike[str]) -> Path:
    """Where the first verified SHA-256 of a weight file without a published hash is recorded: beside it."""
    weights = Path(weights)
    return weights.with_name(weights.name + ".sha256.json")


def check_pinned(path: Path, spec: WeightsSpec, pin: Path, trust_new: bool | None = None) -> str:
    """Pin a weight file whose hash the registry does not publish; returns its SHA-256.

    The first verified file's hash is recorded in ``pin``; a later file whose hash differs is refused, unless
    ``trust_new`` (default: ``$MEDFM_TRUST_NEW_HASH``), which records the new hash instead.
    """
    got = sha256_of(path)
    if spec.sha256 is not None:  # the registry pins it: verify() checks it
        return got
    if trust_new is None:
        trust_new = os.environ.get(TRUST_NEW_HASH_ENV, "").strip().lower() not in ("", "0", "false", "no")
    try:
        recorded = json.loads(pin.read_text()) if pin.is_file() else None
    except (OSError, ValueError):
        recorded = None  # an unreadable record pins nothing; the file is pinned again below
    if isinstance(recorded, dict) and recorded.get("sha256") not in (None, got) and not trust_new:
        raise WeightsError(
            f"{path}: SHA-256 {got} differs from {recorded['sha256']}, recorded when {spec.filename} was first "
            f"verified ({recorded.get('recorded', 'an earlier run')}, from {recorded.get('url', spec.url)}): the "
            f"file published at {spec.url} changed or the cached copy was replaced. If you trust the new file, "
            f"download it with `medfm weights download MODEL --trust-new-hash` (or load it with "
            f"{TRUST_NEW_HASH_ENV}=1)"
        )
    if not isinstance(recorded, dict) or recorded.get("sha256") != got:
        pin.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "filename": spec.filename,
            "sha256": got,
            "size": path.stat().st_size,
            "url": spec.url,
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        tmp = pin.with_name(pin.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, pin)
    return got


def verify(path: Path, spec: WeightsSpec) -> None:
    """Check a file's size and SHA-256 against what the spec pins; raise WeightsError on mismatch."""
    if spec.size is not None and path.stat().st_size != spec.size:
        raise WeightsError(f"{path}: size {path.stat().st_size} bytes, expected {spec.size} (from {spec.url})")
    if spec.sha256 is not None or spec.sha256_prefix is not None:
        got = sha256_of(path)
        if spec.sha256 is not None and got != spec.sha256.lower():
            raise WeightsError(f"{path}: SHA-256 {got}, expected {spec.sha256} (from {spec.url})")
        if spec.sha256_prefix is not None and not got.startswith(spec.sha256_prefix.lower()):
            raise WeightsError(f"{path}: SHA-256 {got} does not start with {spec.sha256_prefix} (from {spec.url})")


def resolve(spec: WeightsSpec, model_name: str, trust_new_hash: bool | None = None) -> Path:
    """The cached weight file of a model (checked against its recorded hash), or a clear error saying how to get it."""
    path = cached_path(spec)
    if not path.is_file():
        pin = f", SHA-256 {spec.sha256}" if spec.sha256 else ""
        if spec.convert:
            raise WeightsError(f"weights for {model_name} not found at {path}. {_manual(spec, path)}")
        raise WeightsError(
            f"weights for {model_name} not found at {path} (URL {spec.url}{pin}). "
            f"Download them with `medfm weights download {model_name}`, or pass --weights PATH"
        )
    check_pinned(path, spec, pin_path(path), trust_new_hash)
    return path


def _manual(spec: WeightsSpec, dest: Path) -> str:
    return (
        f"They are published as {spec.url} in a format medfm does not read; {spec.convert}, "
        f"then place the converted file at {dest} (or pass it as --weights PATH)"
    )


def download(
    spec: WeightsSpec,
    dest: str | os.PathLike[str] | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    trust_new_hash: bool | None = None,
) -> Path:
    """Download a weight file into the cache, resuming a partial ``.part`` file, then verify it.

    Without a published SHA-256 the first verified file's hash is recorded and a later file that differs is
    refused unless ``trust_new_hash`` (see :func:`check_pinned`).
    """
    dest = Path(dest) if dest else cached_path(spec)
    if spec.convert and not dest.is_file():
        raise WeightsError(_manual(spec, dest))
    if dest.is_file():
        verify(dest, spec)
        check_pinned(dest, spec, pin_path(dest), trust_new_hash)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    try:
        request = urllib.request.Request(spec.url, headers={"User-Agent": "medfm"})
    except ValueError as err:  # not a URL at all (no scheme)
        raise WeightsError(f"download of {spec.url} failed: {err}") from None
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - the URL comes from the registry or the user
    except urllib.error.HTTPError as err:
        if err.code == 416 and have and spec.size in (None, have):  # the .part is already complete
            response = None
        else:
            raise WeightsError(f"download of {spec.url} failed: HTTP {err.code} {err.reason}") from None
    except (urllib.error.URLError, OSError) as err:
        raise WeightsError(f"download of {spec.url} failed: {getattr(err, 'reason', err)}") from None
    if response is not None:
        with response:
            content_range = response.headers.get("Content-Range", "")
            resumed = have > 0 and response.status == 206 and content_range.startswith(f"bytes {have}-")
            if response.status == 206 and not resumed:
                part.unlink(missing_ok=True)
                raise WeightsError(f"{spec.url} answered a range other than asked ({content_range!r}); run it again")
            if not resumed:
                have = 0
            length = response.headers.get("Content-Length")
            total = have + int(length) if length is not None else spec.size
            with open(part, "ab" if resumed else "wb") as fh, progress_bar(progress) as bar:
                task = bar.add_task(f"downloading {spec.filename}", total=total, completed=have)
                while True:
                    try:
                        block = response.read(CHUNK)
                    except OSError as err:
                        raise WeightsError(
                            f"download of {spec.url} broke off after {fh.tell()} bytes ({err}); run it again to resume"
                        ) from None
                    if not block:
                        break
                    fh.write(block)
                    bar.advance(task, len(block))
            if total is not None and part.stat().st_size < total:
                raise WeightsError(
                    f"download of {spec.url} stopped at {part.stat().st_size} of {total} bytes; run it again to resume"
                )
    try:
        verify(part, spec)
        check_pinned(part, spec, pin_path(dest), trust_new_hash)
    except WeightsError:
        part.unlink()
        raise
    os.replace(part, dest)
    return dest
