"""Deprecated alias of :mod:`medfm.features.extract` (feature extraction has its own package now).

Importing it warns; every name resolves to the one in ``medfm.features.extract``. It goes in the next release.
"""

from __future__ import annotations

import warnings

from medfm.features import extract as _moved

warnings.warn(
    "medfm.evaluate.extract moved to medfm.features.extract; the old name goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> object:
    """Every name of the moved module, e.g. ``extract_features``."""
    return getattr(_moved, name)
