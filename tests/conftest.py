"""Fixtures shared by the test suite: the real data folder and a small synthetic CT."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medfm.data.io import Geometry

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The project's real data folder (``../shared/data``); it may be absent."""
    return SHARED_DATA


def require_shared(*parts: str) -> Path:
    """The path ``shared/data/<parts>``, or skip the calling test with the reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data {path} not found")
    return path


@pytest.fixture(scope="session")
def need_shared() -> Callable[..., Path]:
    """``need_shared("lidc_idri_0001", "x.nii.gz")``: the path, or skip the test when it is absent."""
    return require_shared


@dataclass(frozen=True)
class SmallCT:
    """A small CT written to disk: its file, its (Z, Y, X) int16 HU array and its geometry."""

    path: Path
    array: np.ndarray
    geometry: Geometry
    image: sitk.Image


# Spacing and origin are exact in float32, so NIfTI (which stores them as float32) keeps them bit for bit.
SMALL_CT_SIZE = (40, 36, 24)  # (x, y, z)
SMALL_CT_SPACING = (0.75, 0.875, 2.5)
SMALL_CT_ORIGIN = (-40.5, 12.25, -100.0)


@pytest.fixture
def small_ct(tmp_path) -> SmallCT:
    """A 40×36×24 CT NIfTI with anisotropic spacing, a non-zero origin and random int16 HU in [-1024, 1500)."""
    rng = np.random.default_rng(1234)
    array = rng.integers(-1024, 1500, size=SMALL_CT_SIZE[::-1]).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SMALL_CT_SPACING)
    image.SetOrigin(SMALL_CT_ORIGIN)
    path = tmp_path / "small_ct.nii.gz"
    sitk.WriteImage(image, str(path))
    return SmallCT(path=path, array=array, geometry=Geometry.of_image(image), image=image)
