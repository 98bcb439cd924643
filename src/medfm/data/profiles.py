"""Named, versioned preprocessing profiles: how a patch is cut from a CT volume, as plain data.

A profile fixes the output grid (spacing and patch size), where the seed falls on it, what happens at the
volume border, and how Hounsfield units are scaled. Every model names its profile; every feature file
records the profile it was made with, so training, extraction and fine-tuning cut the same patches.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from medfm.errors import ProfileError

SEED_ROUNDING = ("trunc", "round")
BORDERS = ("clamp-pad", "centred")
SCALINGS = ("window", "zscore-nonzero")


@dataclass(frozen=True)
class Profile:
    """A 3D seed-point patch profile.

    spacing: output voxel size in mm, (x, y, z); an input spacing within 1e-3 mm of it is kept as is
        (MONAI ``Spacing``'s tolerance).
    size: patch size (Z, Y, X) in voxels.
    seed_rounding: ``trunc`` (Python ``int()``, towards zero, as FMCIB) or ``round`` (nearest voxel).
    border: ``clamp-pad`` clamps the crop to the resampled grid then pads it symmetrically to ``size``
        (the seed moves off centre near a border, as FMCIB); ``centred`` keeps the seed at the patch
        centre and fills voxels outside the volume with ``pad_hu``.
    hu_window: (low, high) mapped linearly to (0, 1); ``clip`` clips the result to [0, 1].
    pad_hu: value (in HU) of every voxel that lies outside the volume.
    scaling: ``window`` (``hu_window`` as above) or ``zscore-nonzero``: each patch minus the mean, over the
        standard deviation (population), of its voxels above 0 (MedicalNet's per-volume normalisation; a patch
        with no such voxels, or all of one value, is refused). ``hu_window`` and ``clip`` then play no part.
    """

    name: str
    version: str
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    size: tuple[int, int, int] = (50, 50, 50)
    seed_rounding: str = "trunc"
    border: str = "clamp-pad"
    hu_window: tuple[float, float] = (-1024.0, 2048.0)
    clip: bool = False
    pad_hu: float = -1024.0
    channels: int = 1
    description: str = ""
    scaling: str = "window"

    def __post_init__(self) -> None:
        if self.scaling not in SCALINGS:
            raise ProfileError(f"profile {self.name}: scaling={self.scaling!r}, allowed {SCALINGS}")
        if self.scaling != "window" and self.clip:
            raise ProfileError(f"profile {self.name}: clip applies to the HU window; scaling={self.scaling!r}")
        if self.seed_rounding not in SEED_ROUNDING:
            raise ProfileError(f"profile {self.name}: seed_rounding={self.seed_rounding!r}, allowed {SEED_ROUNDING}")
        if self.border not in BORDERS:
            raise ProfileError(f"profile {self.name}: border={self.border!r}, allowed {BORDERS}")
        if len(self.size) != 3 or min(self.size) < 1:
            raise ProfileError(f"profile {self.name}: size must be three positive voxel counts, got {self.size}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ProfileError(f"profile {self.name}: spacing must be three positive mm, got {self.spacing}")
        low, high = self.hu_window
        if not high > low:
            raise ProfileError(f"profile {self.name}: hu_window must rise, got {self.hu_window}")

    def scale(self, hu: np.ndarray) -> np.ndarray:
        """Map Hounsfield units to the model's input range, as float32."""
        hu = np.asarray(hu, dtype=np.float64)
        if self.scaling == "zscore-nonzero":
            inside = hu[hu > 0]
            std = float(inside.std()) if inside.size else 0.0
            if std == 0.0:
                raise ProfileError(
                    f"profile {self.name}: the patch has {inside.size} voxels above 0 HU"
                    + (" all of one value" if inside.size else "")
                    + "; its z-score over voxels above 0 (MedicalNet's normalisation) is undefined"
                )
            return ((hu - inside.mean()) / std).astype(np.float32)
        low, high = self.hu_window
        out = (hu - low) / (high - low)
        if self.clip:
            out = np.clip(out, 0.0, 1.0)
        return out.astype(np.float32)

    def intensity_warning(self, array: np.ndarray, whole: bool = False) -> str | None:
        """A warning when voxel values do not look like Hounsfield units (the commonest input error).

        The voxel type is a fact of the whole file; the values are judged for what was read: the whole scan when
        ``whole``, else only the region around the seeds (soft tissue all round a seed is no proof of an 8-bit scan).
        """
        expects = f"profile {self.name} expects CT in HU (air about -1000)"
        lo, hi = float(np.min(array)), float(np.max(array))
        if np.asarray(array).dtype in (np.uint8, np.int8):
            return f"voxels are stored as 8-bit ({np.asarray(array).dtype}, {lo:g}..{hi:g}), not Hounsfield units; {expects}"
        seen = (
            "the scan's voxels" if whole else f"the {np.size(array)} voxels read around the seeds (not the whole scan)"
        )
        if lo >= 0 and hi <= 255:
            return f"{seen} span {lo:g}..{hi:g}, like a windowed 8-bit image rather than Hounsfield units; {expects}"
        if lo >= 0:
            return (
                f"{seen} span {lo:g}..{hi:g} with nothing below 0; CT in HU has air near -1000. "
                "Check the rescale slope/intercept of the files"
            )
        return None

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON-ready data (``scaling`` only when not the HU window, so older records match)."""
        out = asdict(self)
        if self.scaling == "window":
            del out["scaling"]
        return out


FMCIB = Profile(
    name="fmcib",
    version="1",
    description=(
        "The published FMCIB feature pipeline: (HU+1024)/3072, linear resampling to 1 mm on MONAI "
        "Spacingd's grid (diagonal, align_corners), LPS, seed index truncated, crop ±25 clamped to the "
        "volume, symmetric padding to 50³."
    ),
)

FMCIB_CENTRED = replace(
    FMCIB,
    name="fmcib-centred",
    seed_rounding="round",
    border="centred",
    description=(
        "FMCIB's grid and scaling with its quirks fixed: the seed is rounded to the nearest voxel and stays "
        "at the patch centre near borders; voxels outside the volume are -1024 HU."
    ),
)

RESIZES = ("resize", "shorter-crop", "letterbox")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Profile2D:
    """A 2D image profile: output size, resize policy, channels and the normalisation the weights expect.

    Pixel values are first scaled to [0, 1] (by the image's bit depth, or its DICOM window), then resized:
    ``resize`` stretches to ``size``; ``shorter-crop`` scales the shorter side to ``size`` and crops the
    centre; ``letterbox`` scales the longer side and pads with 0. Grey images are repeated to ``channels``;
    finally ``(x - mean) / std`` per channel.
    """

    name: str
    version: str
    size: tuple[int, int] = (224, 224)
    resize: str = "resize"
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    description: str = ""

    def __post_init__(self) -> None:
        if self.resize not in RESIZES:
            raise ProfileError(f"profile {self.name}: resize={self.resize!r}, allowed {RESIZES}")
        if self.channels not in (1, 3) or len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ProfileError(f"profile {self.name}: channels {self.channels} need as many mean/std values")
        if len(self.size) != 2 or min(self.size) < 1:
            raise ProfileError(f"profile {self.name}: size must be (height, width), got {self.size}")

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain JSON-ready data."""
        return asdict(self)


def _imagenet(side: int) -> Profile2D:
    return Profile2D(
        name=f"imagenet-{side}",
        version="1",
        size=(side, side),
        description=f"{side}² RGB (grey repeated), ImageNet mean/std: torchvision and most SSL checkpoints",
    )


_PROFILES: dict[str, Profile | Profile2D] = {}


def register_profile(profile: Profile | Profile2D) -> Profile | Profile2D:
    """Add a profile to the table of named profiles."""
    if profile.name in _PROFILES and _PROFILES[profile.name] != profile:
        raise ProfileError(f"a different profile named {profile.name!r} is already registered")
    _PROFILES[profile.name] = profile
    return profile


def get_profile(name: str | Profile | Profile2D) -> Profile | Profile2D:
    """Look a profile up by name (a Profile passes through)."""
    if isinstance(name, (Profile, Profile2D)):
        return name
    try:
        return _PROFILES[name]
    except KeyError:
        raise ProfileError(f"unknown profile {name!r}; known: {sorted(_PROFILES)}") from None


def profile_from_dict(name: str, spec: dict[str, Any]) -> Profile | Profile2D:
    """The profile ``name``, registered from its JSON copy (``to_dict()``) when this process does not know it."""
    if name not in _PROFILES:
        kind = Profile2D if "resize" in spec else Profile
        register_profile(kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec.items()}))
    return _PROFILES[name]


def list_profiles() -> list[str]:
    """Names of the registered profiles."""
    return sorted(_PROFILES)


register_profile(FMCIB)
register_profile(FMCIB_CENTRED)
register_profile(
    replace(
        FMCIB,
        name="medicalnet",
        scaling="zscore-nonzero",
        description=(
            "MedicalNet (Med3D) inputs on FMCIB's grid (1 mm, 50³ at the seed, as the FMCIB paper compared them): "
            "each patch z-scored by the mean and standard deviation of its voxels above 0, as MedicalNet normalises "
            "each volume (per patch here; MedicalNet's random noise in exact-zero voxels is not added)."
        ),
    )
)
register_profile(
    replace(
        FMCIB,
        name="models-genesis",
        size=(32, 64, 64),
        seed_rounding="round",
        border="centred",
        hu_window=(-1000.0, 1000.0),
        clip=True,
        pad_hu=-1000.0,
        description=(
            "Models Genesis (Genesis Chest CT) inputs: HU clipped to [-1000, 1000] and scaled to [0, 1], a cube "
            "of 64x64 in-plane by 32 slices (its 64x64x32 training cubes) centred at the seed, resampled to 1 mm "
            "(Models Genesis cut its cubes at each scan's own spacing); voxels outside the volume are -1000 HU."
        ),
    )
)
for _side in (224, 299, 300, 380):
    register_profile(_imagenet(_side))
register_profile(
    Profile2D(
        name="radiologynet-224",
        version="1",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        description="224² grey scaled to [0, 1] and repeated to 3 channels, no mean/std: RadiologyNET weights",
    )
)
register_profile(
    Profile2D(
        name="gray-224",
        version="1",
        channels=1,
        mean=(0.0,),
        std=(1.0,),
        description="224² single-channel [0, 1]: 1-channel networks trained from scratch",
    )
)
