"""One family of errors, with messages a radiologist can act on.

Every error medfm raises on purpose derives from :class:`MedfmError`; the CLI prints its message as one
line and exits with status 2, without a traceback.
"""

from __future__ import annotations


class MedfmError(Exception):
    """Base class of every error medfm raises on purpose."""


class ManifestError(MedfmError):
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


class ProfileError(MedfmError):
    """An unknown preprocessing profile or an invalid profile definition."""


class ModelError(MedfmError):
    """An unknown model name or an invalid registry entry."""


class WeightsError(MedfmError):
    """A weight file is absent, fails its checksum, or cannot be downloaded."""


class CheckpointError(MedfmError):
    """A checkpoint is unsafe to load, in an unknown layout, or covers too little of the model."""


class PatchError(MedfmError):
    """A patch cannot be cut where asked (seed outside the volume, empty crop)."""
