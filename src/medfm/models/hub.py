"""The weight cache and downloads: resumable, with a progress bar, verified by size and SHA-256.

Nothing here touches the network unless :func:`download` is called; a missing file is an error that names
the file, the URL and the command that fetches it.
"""

from __future__ import annotations

import hashlib
import os
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


def sha256_of(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


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


def resolve(spec: WeightsSpec, model_name: str) -> Path:
    """The cached weight file of a model, or a clear error saying how to get it."""
    path = cached_path(spec)
    if not path.is_file():
        pin = f", SHA-256 {spec.sha256}" if spec.sha256 else ""
        if spec.convert:
            raise WeightsError(f"weights for {model_name} not found at {path}. {_manual(spec, path)}")
        raise WeightsError(
            f"weights for {model_name} not found at {path} (URL {spec.url}{pin}). "
            f"Download them with `medfm weights download {model_name}`, or pass --weights PATH"
        )
    return path


def _manual(spec: WeightsSpec, dest: Path) -> str:
    return (
        f"They are published as {spec.url} in a format medfm does not read; {spec.convert}, "
        f"then place the converted file at {dest} (or pass it as --weights PATH)"
    )


def download(
    spec: WeightsSpec, dest: str | os.PathLike[str] | None = None, progress: bool = True, timeout: float = 60.0
) -> Path:
    """Download a weight file into the cache, resuming a partial ``.part`` file, then verify it."""
    dest = Path(dest) if dest else cached_path(spec)
    if spec.convert and not dest.is_file():
        raise WeightsError(_manual(spec, dest))
    if dest.is_file():
        verify(dest, spec)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(spec.url, headers={"User-Agent": "medfm"})
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
    except WeightsError:
        part.unlink()
        raise
    os.replace(part, dest)
    return dest
