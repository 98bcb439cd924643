"""medfm: foundation models for medical images — seed-point patches, features, probes and training."""

from medfm.errors import MedfmError

__version__ = "0.1.0"

__all__ = ["MedfmError", "__version__", "get_features"]


def __getattr__(name: str) -> object:
    """``medfm.get_features`` is imported on first use: ``import medfm`` stays light (no torch)."""
    if name == "get_features":
        from medfm.features.extract import get_features

        return get_features
    raise AttributeError(f"module 'medfm' has no attribute {name!r}")
