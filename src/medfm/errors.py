"""One family of errors, with messages a radiologist can act on, and the one error boundary every command uses.

Every error medfm raises on purpose derives from :class:`MedfmError`; :func:`run_guarded` prints its message as one
line and exits with status 2, without a traceback. Anything else is a bug in medfm (or a library below it): it is
reported as an internal error with status 1, and ``MEDFM_DEBUG=1`` shows its traceback.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable


class MedfmError(Exception):
    """Base class of every error medfm raises on purpose."""


class ConfigError(MedfmError, ValueError):
    """Bad user input: an option, a config key or a value that cannot be used."""


class ManifestError(MedfmError, ValueError):
    """The manifest as a whole cannot be used (unreadable file, missing or wrong column)."""


class VolumeError(MedfmError):
    """A volume cannot be read or has unusable geometry."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class RowError(MedfmError):
    """One manifest row cannot be processed; names the row, its file and the reason."""

    def __init__(self, row: int, image_path: str, reason: str) -> None:
        super().__init__(f"row {row} (image_path={image_path}): {reason}")
        self.row = int(row)
        self.image_path = str(image_path)
        self.reason = reason


class ProfileError(MedfmError, ValueError):
    """An unknown preprocessing profile or an invalid profile definition."""


class ModelError(MedfmError, LookupError):
    """An unknown model name or an invalid registry entry."""


class WeightsError(MedfmError):
    """A weight file is absent, fails its checksum, or cannot be downloaded."""


class CheckpointError(MedfmError, ValueError):
    """A checkpoint is unsafe to load, in an unknown layout, or covers too little of the model."""


class PatchError(MedfmError, ValueError):
    """A patch cannot be cut where asked (seed outside the volume, empty crop)."""


DEBUG_ENV = "MEDFM_DEBUG"


def debug_enabled() -> bool:
    """Whether ``MEDFM_DEBUG`` asks for tracebacks (any value but empty, 0, false, no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def one_line(text: object) -> str:
    """``text`` with its whitespace (newlines included) collapsed, so a message prints as one line."""
    return " ".join(str(text).split())


def run_guarded(command: Callable[[], object], on_interrupt: str = "") -> int:
    """Run ``command`` and return its exit status: 0; 2 for a medfm error (one line); 1 for a bug; 130 for Ctrl-C.

    A :class:`MedfmError` is the user's to fix and prints as one line. Any other exception is a bug: it prints one
    line saying so (the traceback with ``MEDFM_DEBUG=1``, where every error is re-raised).
    """
    warnings.filterwarnings("ignore", module="monai")
    try:
        command()
    except KeyboardInterrupt:
        print("medfm: interrupted" + (f"; {on_interrupt}" if on_interrupt else ""), file=sys.stderr)
        return 130
    except MedfmError as err:
        if debug_enabled():
            raise
        print(f"medfm: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if debug_enabled():
            raise
        print(
            f"medfm: internal error: {type(err).__name__}: {one_line(err)} (run with {DEBUG_ENV}=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


class OutputError(MedfmError):
    """An output cannot be written (disk full, read-only folder, a folder where a file goes) or is in use."""
