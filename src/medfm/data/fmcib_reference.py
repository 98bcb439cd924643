"""The published FMCIB preprocessing as a whole-volume MONAI chain, kept as the yardstick.

medfm's own patch cutting (``patches.py``) never resamples a whole scan; this module runs the chain the
FMCIB authors published, transform by transform, so tests can prove the two agree and benchmarks can
time one against the other. It needs the ``itk`` package (MONAI's ITKReader), a test-only dependency.
"""

from __future__ import annotations

import numpy as np


def _seed_crop(size_xyz: tuple[int, int, int]):  # noqa: ANN202 - a MONAI transform built on demand
    from monai.transforms import MapTransform

    class SeedCropd(MapTransform):
        """Crop ±size/2 around an LPS world seed on an RAS-affined (C, X, Y, Z) image, int() index, clamped."""

        def __call__(self, data):  # noqa: ANN001, ANN204
            d = dict(data)
            centre = (-float(d["coordX"]), -float(d["coordY"]), float(d["coordZ"]), 1.0)
            for key in self.key_iterator(d):
                img = d[key]
                index = np.linalg.inv(np.array(img.affine)) @ np.array(centre)
                c = [int(v) for v in index[:3]]
                spatial = img.shape[1:]
                sl = [
                    slice(max(c[i] - size_xyz[i] // 2, 0), min(c[i] + size_xyz[i] // 2, spatial[i])) for i in range(3)
                ]
                assert all(s.start < s.stop for s in sl), "empty crop"
                d[key] = img[:, sl[0], sl[1], sl[2]]
            return d

    return SeedCropd(keys=["image_path"])


def reference_transforms(size_zyx: tuple[int, int, int] = (50, 50, 50)):  # noqa: ANN201
    """The FMCIB chain: ITK read → (HU+1024)/3072 → Spacingd 1 mm → LPS → seed crop → (C,Z,Y,X) → pad."""
    from monai.transforms import (
        Compose,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
        SpatialPadd,
        Transposed,
    )

    key = ["image_path"]
    return Compose(
        [
            LoadImaged(keys=key, image_only=True, reader="ITKReader"),
            EnsureChannelFirstd(keys=key),
            ScaleIntensityRanged(keys=key, a_min=-1024, a_max=2048, b_min=0, b_max=1, clip=False),
            Spacingd(keys=key, pixdim=1, mode="bilinear", padding_mode="zeros", align_corners=True, diagonal=True),
            Orientationd(keys=key, axcodes="LPS"),
            _seed_crop(tuple(size_zyx[::-1])),
            Transposed(keys=key, indices=(0, 3, 2, 1)),
            SpatialPadd(keys=key, spatial_size=size_zyx),
        ]
    )


def reference_patch(image_path: str, seed_lps: tuple[float, float, float], size_zyx=(50, 50, 50)) -> np.ndarray:  # noqa: ANN001
    """One patch through the whole-volume chain, as (C, Z, Y, X) float32."""
    chain = reference_transforms(size_zyx)
    out = chain({"image_path": image_path, "coordX": seed_lps[0], "coordY": seed_lps[1], "coordZ": seed_lps[2]})
    return np.asarray(out["image_path"].as_tensor().numpy(), dtype=np.float32)
