"""Mask values → class indices: which label values of the mask files are which class.

``classes`` names the output channels 1…n (0 is background): a list of names (mask value i+1 is class i+1), or a
mapping ``{mask value: name}`` where several values may share a name (they merge into one class). ``label_map``
(``{mask value: name}``) adds or overrides values, e.g. TotalSegmentator's lung lobes 10–14 → ``lung``. Values that
no entry names become background (``unlisted="background"``) or are an error (``unlisted="error"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medfm.errors import ConfigError

UNLISTED = ("background", "error")


def class_names(classes: Sequence[str] | Mapping[int, str]) -> list[str]:
    """The foreground class names in channel order (1…n): list order, or by first (smallest) mask value."""
    if isinstance(classes, Mapping):
        names: list[str] = []
        for value in sorted(int(v) for v in classes):
            name = str(classes[value] if value in classes else classes[str(value)])  # YAML/JSON keys
            if name not in names:
                names.append(name)
        return names
    names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        raise ConfigError(f"classes {names}: a name appears twice")
    return names


@dataclass(frozen=True)
class ClassMap:
    """How raw mask values become class indices (0 background, 1…n the named classes)."""

    names: tuple[str, ...]
    values: dict[int, int]  # raw mask value → class index
    unlisted: str = "background"

    @classmethod
    def build(
        cls,
        classes: Sequence[str] | Mapping[int, str],
        label_map: Mapping[int, str] | None = None,
        unlisted: str = "background",
    ) -> ClassMap:
        """A class map from the config's ``classes`` and ``label_map``."""
        if unlisted not in UNLISTED:
            raise ConfigError(f"unlisted={unlisted!r}; allowed {UNLISTED}")
        if not classes:
            raise ConfigError("name at least one class: classes: [liver] or classes: {1: liver, 2: spleen}")
        names = class_names(classes)
        if "background" in names:
            raise ConfigError("'background' is class 0 and cannot be named in classes")
        index = {name: i + 1 for i, name in enumerate(names)}
        if isinstance(classes, Mapping):
            values = {int(v): index[str(n)] for v, n in classes.items()}
        else:
            values = {i + 1: i + 1 for i in range(len(names))}
        for value, name in (label_map or {}).items():
            name = str(name)
            if name == "background":
                values[int(value)] = 0
                continue
            if name not in index:
                raise ConfigError(f"label_map sends value {value} to {name!r}, which is not one of the classes {names}")
            values[int(value)] = index[name]
        return cls(tuple(names), values, unlisted)

    @property
    def num_classes(self) -> int:
        """Output channels: background plus the named classes."""
        return len(self.names) + 1

    def encode(self, mask: np.ndarray, where: str = "mask") -> np.ndarray:
        """Class indices (int64) of a raw mask; unlisted values → 0, or ValueError when ``unlisted='error'``."""
        raw = np.asarray(mask)
        if raw.dtype.kind == "f":
            if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
                raise ConfigError(f"{where}: label values must be whole numbers, found fractional values")
            raw = raw.astype(np.int64)
        present = np.unique(raw)
        if self.unlisted == "error":
            unknown = [int(v) for v in present if v != 0 and int(v) not in self.values]
            if unknown:
                raise ConfigError(f"{where}: label values {unknown[:10]} are not named by classes or label_map")
        out = np.zeros(raw.shape, dtype=np.int64)
        for value in present:
            value = int(value)
            if value in self.values and self.values[value]:
                out[raw == value] = self.values[value]
        return out

    def to_dict(self) -> dict[str, object]:
        """JSON-ready: the class names and the raw value → class index table."""
        return {
            "names": list(self.names),
            "values": {str(k): v for k, v in self.values.items()},
            "unlisted": self.unlisted,
        }
