"""medfm: foundation models for medical images — seed-point patches, features, probes and training."""

from medfm.errors import MedfmError

__version__ = "0.1.0"

__all__ = ["MedfmError", "__version__"]
