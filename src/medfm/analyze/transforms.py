"""The transforms whose invariance is measured, 2D and 3D, each with a sweep of strengths.

They act on a batch as the model sees it, (B, C, H, W) or (B, C, Z, Y, X). Intensity strengths are fractions of
each channel's own range (max − min), so a strength means the same for an ImageNet-normalised X-ray and a CT patch;
space left empty by a geometric transform is filled with the channel's minimum (background). Geometric transforms
act in pixel units about the centre (rigid also for non-square inputs):

=============  ===========================================================  ================================
transform      strength                                                     3D form
=============  ===========================================================  ================================
identity       none (0)                                                     same
rotation       degrees, in the image plane                                  about the (1, 1, 1) diagonal
flip           axis: 1 left–right (X), 2 up–down (Y)                        also 3 (Z, cranio-caudal)
translation    shift as a fraction of the side, along every axis            along X, Y and Z
scale          zoom factor about the centre (>1 enlarges)                   isotropic
crop           kept fraction of the side, from the first corner, resized    a sub-cube
blur           Gaussian sigma in pixels (voxels)                            separable 3D Gaussian
noise          Gaussian noise std as a fraction of the range, seeded        same
gamma          gamma of the min–max normalised intensities                  same
intensity      added shift as a fraction of the range                       same
=============  ===========================================================  ================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from medfm.errors import ConfigError

TRANSFORMS = (
    "identity",
    "rotation",
    "flip",
    "translation",
    "scale",
    "crop",
    "blur",
    "noise",
    "gamma",
    "intensity",
)
DEFAULT_STRENGTHS: dict[str, tuple[float, ...]] = {
    "identity": (0.0,),
    "rotation": (5.0, 15.0, 30.0, 60.0, 90.0, 180.0),
    "flip": (1.0, 2.0),  # 3D adds 3
    "translation": (0.05, 0.1, 0.2, 0.3),
    "scale": (0.6, 0.8, 1.25, 1.5),
    "crop": (0.9, 0.75, 0.6, 0.5),
    "blur": (0.5, 1.0, 2.0, 4.0),
    "noise": (0.02, 0.05, 0.1, 0.2),
    "gamma": (0.5, 0.7, 1.5, 2.0),
    "intensity": (0.05, 0.1, 0.2, 0.4),
}
UNITS = {
    "identity": "",
    "rotation": "degrees",
    "flip": "axis",
    "translation": "fraction of side",
    "scale": "zoom factor",
    "crop": "kept fraction of side",
    "blur": "sigma (pixels)",
    "noise": "std / range",
    "gamma": "gamma",
    "intensity": "shift / range",
}
FLIP_AXES = {1: "X (left-right)", 2: "Y (up-down)", 3: "Z (cranio-caudal)"}


@dataclass(frozen=True)
class Level:
    """One point of a sweep: a transform at one strength."""

    transform: str
    strength: float

    @property
    def label(self) -> str:
        """How the level reads in tables: ``flip X (left-right)``, ``rotation 15``."""
        if self.transform == "flip":
            return f"flip {FLIP_AXES[int(self.strength)]}"
        if self.transform == "identity":
            return "identity"
        return f"{self.transform} {self.strength:g}"


def sweep(
    dims: int, transforms: list[str] | None = None, strengths: dict[str, list[float]] | None = None
) -> list[Level]:
    """The levels to measure: every transform (or those named) at its default strengths (or those given)."""
    names = list(transforms or [t for t in TRANSFORMS])
    unknown = [t for t in names if t not in TRANSFORMS]
    if unknown:
        raise ConfigError(f"unknown transform(s) {unknown}; allowed {list(TRANSFORMS)}")
    bad = [t for t in (strengths or {}) if t not in TRANSFORMS]
    if bad:
        raise ConfigError(f"strengths given for unknown transform(s) {bad}; allowed {list(TRANSFORMS)}")
    levels = []
    for name in names:
        values = list((strengths or {}).get(name) or DEFAULT_STRENGTHS[name])
        if name == "flip" and not (strengths or {}).get(name) and dims == 3:
            values = [1.0, 2.0, 3.0]
        for value in values:
            check_strength(name, float(value), dims)
            levels.append(Level(name, float(value)))
    return levels


def check_strength(name: str, value: float, dims: int) -> None:
    """Raise ValueError when a strength makes no sense for its transform."""
    if name == "flip" and value not in [float(a) for a in range(1, dims + 1)]:
        raise ConfigError(f"flip strength {value:g}: an axis 1..{dims} (1 X, 2 Y{', 3 Z' if dims == 3 else ''})")
    if name in ("scale", "gamma") and value <= 0:
        raise ConfigError(f"{name} strength {value:g} must be positive")
    if name == "crop" and not 0 < value <= 1:
        raise ConfigError(f"crop strength {value:g} is the kept fraction of the side: in (0, 1]")
    if name in ("blur", "noise") and value < 0:
        raise ConfigError(f"{name} strength {value:g} must not be negative")


def _channel_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (sample, channel) minimum and range, shaped to broadcast over space."""
    flat = x.flatten(2)
    low = flat.min(dim=2).values
    span = (flat.max(dim=2).values - low).clamp_min(1e-8)
    shape = (*low.shape, *([1] * (x.ndim - 2)))
    return low.view(shape), span.view(shape)


def _rotation_matrix(degrees: float, dims: int) -> torch.Tensor:
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    if dims == 2:
        return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    k = torch.full((3,), 1 / math.sqrt(3), dtype=torch.float64)  # Rodrigues about the (1, 1, 1) diagonal
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    return torch.eye(3, dtype=torch.float64) * c + s * cross + (1 - c) * torch.outer(k, k)


def _affine(x: torch.Tensor, matrix: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Resample ``x``: an output offset o from the centre (pixels, (x, y[, z]) order) reads the input at
    ``matrix @ o + shift``; outside the input, the channel minimum."""
    dims = x.ndim - 2
    half = torch.tensor(list(x.shape[2:])[::-1], dtype=torch.float64) / 2  # (x, y[, z]) half sizes
    scale, unscale = torch.diag(half), torch.diag(1 / half)
    theta = torch.cat([unscale @ matrix @ scale, (unscale @ shift).view(dims, 1)], dim=1)
    theta = theta.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    low, _ = _channel_range(x)
    mode = "bilinear"  # trilinear for 5D inputs
    return F.grid_sample(x - low, grid, mode=mode, padding_mode="zeros", align_corners=False) + low


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur along every spatial axis, borders replicated."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    b, c = x.shape[:2]
    out = x.reshape(b * c, 1, *x.shape[2:])
    dims = x.ndim - 2
    conv = F.conv2d if dims == 2 else F.conv3d
    for axis in range(dims):
        shape = [1, 1] + [1] * dims
        shape[2 + axis] = len(taps)
        pad = [0, 0] * dims
        pad[2 * (dims - 1 - axis)] = pad[2 * (dims - 1 - axis) + 1] = radius
        out = conv(F.pad(out, pad, mode="replicate"), kernel.view(shape))
    return out.reshape(x.shape)


def apply_transform(x: torch.Tensor, level: Level, seed: int = 0) -> torch.Tensor:
    """The transformed batch (same shape); ``seed`` fixes the noise."""
    dims = x.ndim - 2
    name, s = level.transform, level.strength
    check_strength(name, s, dims)
    eye = torch.eye(dims, dtype=torch.float64)
    zero = torch.zeros(dims, dtype=torch.float64)
    sizes = torch.tensor(list(x.shape[2:])[::-1], dtype=torch.float64)
    if name == "identity":
        return x.clone()
    if name == "rotation":
        return _affine(x, _rotation_matrix(s, dims), zero)
    if name == "flip":
        return torch.flip(x, dims=[x.ndim - int(s)])  # axis 1 is X, the last tensor dimension
    if name == "translation":
        return _affine(x, eye, -s * sizes)
    if name == "scale":
        return _affine(x, eye / s, zero)
    if name == "crop":
        return _affine(x, eye * s, (s - 1) * sizes / 2)
    if name == "blur":
        return _gaussian_blur(x, s)
    low, span = _channel_range(x)
    if name == "noise":
        generator = torch.Generator().manual_seed(seed)
        field = torch.randn((x.shape[0], 1, *x.shape[2:]), generator=generator, dtype=x.dtype)
        return x + s * span * field  # one noise field for all channels: grey repeated to RGB stays grey
    if name == "gamma":
        return low + span * ((x - low) / span).clamp(0, 1) ** s
    if name == "intensity":
        return x + s * span
    raise ConfigError(f"unknown transform {name!r}; allowed {list(TRANSFORMS)}")
