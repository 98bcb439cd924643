"""Seeded augmentation "views" declared as data, for self-supervised pre-training and fine-tuning.

A view is a list of dicts, one per operation: ``[{"op": "flip", "axes": [0, 1, 2], "p": 0.5}, ...]``.
:func:`build_view` validates such a list once and returns a :class:`ViewPipeline`; calling the pipeline with an
array and an integer seed gives the same output for the same pair, whatever else the process has drawn before.

Arrays are numpy ``float32``: ``(C, Z, Y, X)`` for 3D views (MONAI array transforms) and ``(C, H, W)`` for 2D
views (``torchvision.transforms.v2`` on tensors). Spatial axes in a spec count from 0 without the channel axis.

Seeding: the call's seed is split with :class:`numpy.random.SeedSequence` into one seed per op; each op draws its
own decisions (apply or not, crop boxes, shifts) from a :class:`numpy.random.Generator` and seeds MONAI transforms
through ``set_random_state`` and torchvision transforms inside ``torch.random.fork_rng``. The global numpy,
``random`` and torch generators are never read or changed (MONAI is imported on first use, with Python's
``random`` state preserved across that import).

Every op takes ``p``, the probability it is applied (its default depends on the op). ``flip`` applies ``p`` to each
axis separately; ``center_crop`` always applies; ``random_resized_crop``, when skipped, resizes the whole input to
``size`` so that the output shape never depends on the draw.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch

from medfm.errors import ConfigError
from medfm.seeding import seeded

__all__ = ["OPS_2D", "OPS_3D", "ViewPipeline", "build_view", "default_view"]

_SEED_BOUND = 2**32
_STRENGTHS = ("ssl", "finetune", "eval")


# ---------------------------------------------------------------------------------------------- parameter parsing


class _Params:
    """Reads one op's parameters, checking each, and reports leftovers; every error names the op."""

    def __init__(self, op: str, params: Mapping[str, Any]) -> None:
        self.op = op
        self.left = dict(params)
        self.known: list[str] = []

    def error(self, message: str) -> ValueError:
        return ValueError(f"augmentation op {self.op!r}: {message}")

    def _take(self, key: str, default: Any) -> Any:
        self.known.append(key)
        return self.left.pop(key, default)

    def number(self, key: str, default: Any, lo: float | None = None, hi: float | None = None) -> float:
        value = self._take(key, default)
        if value is None:
            raise self.error(f"{key!r} is required")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise self.error(f"{key!r} must be a number, got {value!r}")
        value = float(value)
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            raise self.error(f"{key!r} must lie in {bounds}, got {value!r}")
        return value

    def integer(self, key: str, default: Any, lo: int | None = None) -> int:
        value = self._take(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise self.error(f"{key!r} must be an integer, got {value!r}")
        if lo is not None and value < lo:
            raise self.error(f"{key!r} must be >= {lo}, got {value!r}")
        return int(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self._take(key, default)
        if not isinstance(value, (bool, np.bool_)):
            raise self.error(f"{key!r} must be true or false, got {value!r}")
        return bool(value)

    def prob(self, default: float) -> float:
        return self.number("p", default, 0.0, 1.0)

    def pair(self, key: str, default: Any, lo: float | None = None, strict: bool = False) -> tuple[float, float]:
        value = self._take(key, default)
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            value = (value, value)
        if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
            raise self.error(f"{key!r} must be a pair [low, high], got {value!r}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) for v in value):
            raise self.error(f"{key!r} must hold two numbers, got {value!r}")
        a, b = float(value[0]), float(value[1])
        if not (math.isfinite(a) and math.isfinite(b)) or a > b:
            raise self.error(f"{key!r} must be finite with low <= high, got {value!r}")
        if lo is not None and (a <= lo if strict else a < lo):
            raise self.error(f"{key!r} must be {'>' if strict else '>='} {lo}, got {value!r}")
        return a, b

    def int_pair(self, key: str, default: Any, lo: int) -> tuple[int, int]:
        value = self._take(key, default)
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = (value, value)
        ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2
        if not ok or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in value):
            raise self.error(f"{key!r} must be an integer or a pair of integers, got {value!r}")
        a, b = int(value[0]), int(value[1])
        if a > b or a < lo:
            raise self.error(f"{key!r} must satisfy {lo} <= low <= high, got {value!r}")
        return a, b

    def size(self, key: str, dims: int) -> tuple[int, ...]:
        value = self._take(key, None)
        if value is None:
            raise self.error(f"{key!r} is required ({dims} positive integers)")
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            value = (value,) * dims
        ok = isinstance(value, Sequence) and not isinstance(value, str) and len(value) == dims
        if not ok or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in value):
            raise self.error(f"{key!r} must be {dims} positive integers for a {dims}D view, got {value!r}")
        return tuple(int(v) for v in value)

    def axes(self, key: str, default: Any, dims: int, count: int | None = None) -> tuple[int, ...]:
        value = self._take(key, default)
        ok = isinstance(value, Sequence) and not isinstance(value, str)
        if ok:
            ok = all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < dims for v in value)
            ok = ok and len(set(value)) == len(value) and (count is None or len(value) == count)
        if not ok:
            what = f"{count} distinct" if count else "distinct"
            raise self.error(f"{key!r} must be {what} spatial axes in 0..{dims - 1}, got {value!r}")
        return tuple(int(v) for v in value)

    def done(self) -> None:
        if self.left:
            raise self.error(f"unknown parameter(s) {sorted(self.left)}; it takes {sorted(set(self.known))}")


# ---------------------------------------------------------------------------------------------- helpers


def _derive_seed(rng: np.random.Generator) -> int:
    """A fresh integer seed for a MONAI or torch generator, drawn from the op's own generator."""
    return int(rng.integers(_SEED_BOUND))


def _monai_transforms() -> Any:
    """``monai.transforms``, imported on first use (it is slow to import); Python's ``random`` state is kept.

    Importing MONAI pulls in ``rich``, whose ``rich.style`` draws from the global ``random`` generator at import time;
    restoring the state keeps a pipeline's first call from moving it.
    """
    state = random.getstate()
    try:
        import monai.transforms as transforms
    finally:
        random.setstate(state)
    return transforms


def _to_numpy(out: Any) -> np.ndarray:
    """MONAI / torch output as a float32 numpy array (MetaTensor metadata dropped)."""
    if isinstance(out, torch.Tensor):
        if hasattr(out, "as_tensor"):
            out = out.as_tensor()
        out = out.detach().cpu().numpy()
    return np.asarray(out, dtype=np.float32)


def _run_monai(transform: Any, x: np.ndarray, seed: int) -> np.ndarray:
    """Seed a MONAI randomizable transform and apply it."""
    transform.set_random_state(seed=seed)
    return _to_numpy(transform(np.ascontiguousarray(x)))


def _run_torch(fn: Callable[[torch.Tensor], torch.Tensor], x: np.ndarray, seed: int) -> np.ndarray:
    """Apply a torchvision transform under a forked, freshly seeded CPU generator; global state is restored."""
    tensor = torch.from_numpy(np.ascontiguousarray(x))
    with seeded(seed):
        out = fn(tensor)
    return _to_numpy(out)


class _Op:
    """One validated operation; subclasses set ``name``/``default_p`` and implement ``apply``."""

    name = ""
    default_p = 1.0

    def __init__(self, params: Mapping[str, Any], dims: int) -> None:
        self.dims = dims
        args = _Params(self.name, params)
        self.p = args.prob(self.default_p)
        self._parse(args)
        args.done()
        self._cache: Any = None

    def _parse(self, args: _Params) -> None:
        """Read op-specific parameters."""

    def _build(self) -> Any:
        """Heavy transform objects, made once per process on first use."""
        return None

    @property
    def transform(self) -> Any:
        if self._cache is None:
            self._cache = self._build()
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"] = None
        return state

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return x
        return self.apply(x, rng)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------- ops for both dims


class _CenterCrop(_Op):
    """The central ``size`` block; an axis shorter than ``size`` is padded with its edge values."""

    name = "center_crop"

    def _parse(self, args: _Params) -> None:
        if self.p != 1.0:
            raise args.error("center_crop always applies; 'p' must be 1")
        self.size = args.size("size", self.dims)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        shape = x.shape[1:]
        pad = [(0, 0)] + [((s - n) // 2, s - n - (s - n) // 2) if s > n else (0, 0) for n, s in zip(shape, self.size)]
        if any(p != (0, 0) for p in pad):
            x = np.pad(x, pad, mode="edge")
            shape = x.shape[1:]
        starts = [(n - s) // 2 for n, s in zip(shape, self.size)]
        return x[(slice(None), *(slice(a, a + s) for a, s in zip(starts, self.size)))]


class _Flip(_Op):
    """Mirror each listed spatial axis independently with probability ``p``."""

    name = "flip"
    default_p = 0.5

    def _parse(self, args: _Params) -> None:
        default = list(range(self.dims)) if self.dims == 3 else [1]
        self.axes = args.axes("axes", default, self.dims)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        draws = rng.random(len(self.axes))
        for axis, u in zip(self.axes, draws):
            if u < self.p:
                x = np.flip(x, axis=axis + 1)
        return x


# ---------------------------------------------------------------------------------------------- 3D ops (MONAI)


class _RandomResizedCrop3D(_Op):
    """A random box holding ``scale`` of the volume, stretched per axis by ``ratio``, resized (trilinear) to ``size``.

    Proportions are relative to the input's own shape: with ``scale=[1, 1]`` and ``ratio=[1, 1]`` the box is the
    whole volume. Per-axis stretch factors are drawn log-uniformly from ``ratio`` and renormalised to keep the volume.
    """

    name = "random_resized_crop"

    def _parse(self, args: _Params) -> None:
        self.size = args.size("size", 3)
        self.scale = args.pair("scale", (0.5, 1.0), lo=0.0, strict=True)
        if self.scale[1] > 1.0:
            raise args.error(f"'scale' must lie in (0, 1], got {list(self.scale)}")
        self.ratio = args.pair("ratio", (0.75, 4.0 / 3.0), lo=0.0, strict=True)
        self.antialias = args.flag("antialias", False)  # Gaussian pre-smoothing costs ~10× the resize itself

    def _build(self) -> Any:
        return _monai_transforms().Resize(
            spatial_size=self.size, mode="trilinear", align_corners=False, anti_aliasing=self.antialias
        )

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            return _to_numpy(self.transform(np.ascontiguousarray(x)))
        return self.apply(x, rng)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        shape = np.asarray(x.shape[1:], dtype=np.int64)
        log_ratio = np.log(self.ratio)
        side = shape
        for _ in range(10):
            scale = rng.uniform(*self.scale)
            stretch = rng.uniform(log_ratio[0], log_ratio[1], size=3)
            stretch = np.exp(stretch - stretch.mean())
            side = np.rint(shape * scale ** (1.0 / 3.0) * stretch).astype(np.int64)
            if np.all(side >= 1) and np.all(side <= shape):
                break
        side = np.clip(side, 1, shape)
        start = [int(rng.integers(0, n - s + 1)) for n, s in zip(shape, side)]
        box = x[(slice(None), *(slice(a, a + s) for a, s in zip(start, side)))]
        return _to_numpy(self.transform(np.ascontiguousarray(box)))


class _Rotate90(_Op):
    """Rotate by k*90 degrees (k uniform in 1..max_k) in the plane of two spatial axes (MONAI RandRotate90)."""

    name = "rotate90"
    default_p = 0.5

    def _parse(self, args: _Params) -> None:
        self.spatial_axes = args.axes("spatial_axes", [1, 2], 3, count=2)
        self.max_k = args.integer("max_k", 3, lo=1)

    def _build(self) -> Any:
        return _monai_transforms().RandRotate90(prob=1.0, max_k=self.max_k, spatial_axes=self.spatial_axes)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _run_monai(self.transform, x, _derive_seed(rng))


class _Shift3D(_Op):
    """Translate by a random whole number of voxels (each axis in [-max_voxels, max_voxels]), edge-padded."""

    name = "shift"
    default_p = 0.5

    def _parse(self, args: _Params) -> None:
        self.max_voxels = args.integer("max_voxels", 5, lo=0)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        m = self.max_voxels
        offsets = rng.integers(-m, m + 1, size=3)
        if m == 0 or not offsets.any():
            return x
        padded = np.pad(x, [(0, 0)] + [(m, m)] * 3, mode="edge")
        # content moves by +d: out[i] = in[i - d] = padded[i - d + m]
        return padded[(slice(None), *(slice(m - d, m - d + n) for d, n in zip(offsets, x.shape[1:])))]


class _HistogramShift3D(_Op):
    """Random monotone remapping of intensities through control points (MONAI RandHistogramShift)."""

    name = "histogram_shift"
    default_p = 0.5

    def _parse(self, args: _Params) -> None:
        self.num_control_points = args.int_pair("num_control_points", (5, 15), lo=3)

    def _build(self) -> Any:
        return _monai_transforms().RandHistogramShift(num_control_points=self.num_control_points, prob=1.0)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        seed = _derive_seed(rng)
        if float(x.min()) == float(x.max()):  # nothing to remap (MONAI would warn)
            return x
        return _run_monai(self.transform, x, seed)


class _GaussianSmooth3D(_Op):
    """Gaussian smoothing with per-axis sigma drawn from ``sigma`` (MONAI RandGaussianSmooth)."""

    name = "gaussian_smooth"
    default_p = 0.5

    def _parse(self, args: _Params) -> None:
        self.sigma = args.pair("sigma", (0.25, 1.5), lo=0.0, strict=True)

    def _build(self) -> Any:
        return _monai_transforms().RandGaussianSmooth(
            sigma_x=self.sigma, sigma_y=self.sigma, sigma_z=self.sigma, prob=1.0
        )

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _run_monai(self.transform, x, _derive_seed(rng))


class _IntensityJitter3D(_Op):
    """``v * (1 + a) + b`` with ``a`` uniform in ±scale, ``b`` uniform in ±shift (RandScaleIntensity, RandShiftIntensity)."""

    name = "intensity_jitter"
    default_p = 0.5

    def _parse(self, args: _Params) -> None:
        self.scale = args.number("scale", 0.1, lo=0.0)
        self.shift = args.number("shift", 0.1, lo=0.0)

    def _build(self) -> Any:
        mt = _monai_transforms()
        return mt.RandScaleIntensity(factors=self.scale, prob=1.0), mt.RandShiftIntensity(offsets=self.shift, prob=1.0)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        scale, shift = self.transform
        x = _run_monai(scale, x, _derive_seed(rng))
        return _run_monai(shift, x, _derive_seed(rng))


class _GaussianNoise3D(_Op):
    """Add zero-mean Gaussian noise of standard deviation ``std`` (MONAI RandGaussianNoise)."""

    name = "gaussian_noise"
    default_p = 0.5

    def _parse(self, args: _Params) -> None:
        self.std = args.number("std", 0.05, lo=0.0)

    def _build(self) -> Any:
        return _monai_transforms().RandGaussianNoise(prob=1.0, mean=0.0, std=self.std, sample_std=False)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _run_monai(self.transform, x, _derive_seed(rng))


# ---------------------------------------------------------------------------------------------- 2D ops (torchvision)


class _RandomResizedCrop2D(_Op):
    """torchvision ``RandomResizedCrop`` (bilinear, antialiased); ``ratio`` is width / height."""

    name = "random_resized_crop"

    def _parse(self, args: _Params) -> None:
        self.size = args.size("size", 2)
        self.scale = args.pair("scale", (0.08, 1.0), lo=0.0, strict=True)
        if self.scale[1] > 1.0:
            raise args.error(f"'scale' must lie in (0, 1], got {list(self.scale)}")
        self.ratio = args.pair("ratio", (0.75, 4.0 / 3.0), lo=0.0, strict=True)

    def _build(self) -> Any:
        from torchvision.transforms import v2

        return v2.RandomResizedCrop(self.size, scale=self.scale, ratio=self.ratio, antialias=True)

    def __call__(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() >= self.p:
            from torchvision.transforms.v2 import functional as F

            return _to_numpy(F.resize(torch.from_numpy(np.ascontiguousarray(x)), list(self.size), antialias=True))
        return self.apply(x, rng)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _run_torch(self.transform, x, _derive_seed(rng))


class _Rotate2D(_Op):
    """Rotate by an angle uniform in ±degrees (bilinear, zero fill, same shape; torchvision ``RandomRotation``)."""

    name = "rotate"
    default_p = 0.5

    def _parse(self, args: _Params) -> None:
        self.degrees = args.number("degrees", 10.0, lo=0.0, hi=180.0)

    def _build(self) -> Any:
        from torchvision.transforms import v2

        return v2.RandomRotation(self.degrees, interpolation=v2.InterpolationMode.BILINEAR)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _run_torch(self.transform, x, _derive_seed(rng))


class _BrightnessContrast2D(_Op):
    """torchvision ``ColorJitter`` brightness/contrast, applied on the image min-max scaled to [0, 1] and back.

    The scaling keeps intensities outside [0, 1] (HU, z-scores) from being clamped away by ColorJitter.
    """

    name = "brightness_contrast"
    default_p = 0.8

    def _parse(self, args: _Params) -> None:
        self.brightness = args.number("brightness", 0.2, lo=0.0)
        self.contrast = args.number("contrast", 0.2, lo=0.0)

    def _build(self) -> Any:
        from torchvision.transforms import v2

        return v2.ColorJitter(brightness=self.brightness, contrast=self.contrast)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        seed = _derive_seed(rng)
        lo, hi = float(x.min()), float(x.max())
        if hi <= lo:
            return x
        unit = (x - np.float32(lo)) / np.float32(hi - lo)
        return _run_torch(self.transform, unit, seed) * np.float32(hi - lo) + np.float32(lo)


class _GaussianBlur2D(_Op):
    """torchvision ``GaussianBlur`` with sigma uniform in ``sigma`` and an odd ``kernel_size``."""

    name = "gaussian_blur"
    default_p = 0.5

    def _parse(self, args: _Params) -> None:
        self.sigma = args.pair("sigma", (0.1, 2.0), lo=0.0, strict=True)
        self.kernel_size = args.integer("kernel_size", 3, lo=1)
        if self.kernel_size % 2 == 0:
            raise args.error(f"'kernel_size' must be odd, got {self.kernel_size}")

    def _build(self) -> Any:
        from torchvision.transforms import v2

        return v2.GaussianBlur(self.kernel_size, sigma=self.sigma)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _run_torch(self.transform, x, _derive_seed(rng))


class _GaussianNoise2D(_Op):
    """Add zero-mean Gaussian noise of standard deviation ``std``, unclipped (torchvision ``GaussianNoise``)."""

    name = "gaussian_noise"
    default_p = 0.5

    def _parse(self, args: _Params) -> None:
        self.std = args.number("std", 0.05, lo=0.0)

    def _build(self) -> Any:
        from torchvision.transforms import v2

        return v2.GaussianNoise(mean=0.0, sigma=self.std, clip=False)

    def apply(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _run_torch(self.transform, x, _derive_seed(rng))


# ---------------------------------------------------------------------------------------------- registry and pipeline

OPS_3D: dict[str, Callable[[Mapping[str, Any]], _Op]] = {
    "random_resized_crop": partial(_RandomResizedCrop3D, dims=3),
    "center_crop": partial(_CenterCrop, dims=3),
    "flip": partial(_Flip, dims=3),
    "rotate90": partial(_Rotate90, dims=3),
    "shift": partial(_Shift3D, dims=3),
    "histogram_shift": partial(_HistogramShift3D, dims=3),
    "gaussian_smooth": partial(_GaussianSmooth3D, dims=3),
    "intensity_jitter": partial(_IntensityJitter3D, dims=3),
    "gaussian_noise": partial(_GaussianNoise3D, dims=3),
}

OPS_2D: dict[str, Callable[[Mapping[str, Any]], _Op]] = {
    "random_resized_crop": partial(_RandomResizedCrop2D, dims=2),
    "center_crop": partial(_CenterCrop, dims=2),
    "flip": partial(_Flip, dims=2),
    "rotate": partial(_Rotate2D, dims=2),
    "brightness_contrast": partial(_BrightnessContrast2D, dims=2),
    "gaussian_blur": partial(_GaussianBlur2D, dims=2),
    "gaussian_noise": partial(_GaussianNoise2D, dims=2),
}


def _registry(dims: int) -> dict[str, Callable[[Mapping[str, Any]], _Op]]:
    """The op table for ``dims``."""
    if isinstance(dims, bool) or dims not in (2, 3):
        raise ConfigError(f"dims must be 2 or 3, got {dims!r}")
    return OPS_3D if dims == 3 else OPS_2D


class ViewPipeline:
    """A seeded chain of augmentations declared as data."""

    def __init__(self, spec: Sequence[Mapping[str, Any]], dims: int) -> None:
        ops = _registry(dims)
        if isinstance(spec, (str, Mapping)) or not isinstance(spec, Sequence):
            raise ConfigError(f"a view spec must be a list of dicts, got {type(spec).__name__}")
        self.dims = int(dims)
        self.spec: list[dict] = []
        self._ops: list[_Op] = []
        for i, item in enumerate(spec):
            if not isinstance(item, Mapping) or not isinstance(item.get("op"), str):
                raise ConfigError(f"view spec item {i} must be a dict with an 'op' name, got {item!r}")
            name = item["op"]
            if name not in ops:
                raise ConfigError(
                    f"unknown augmentation op {name!r} for a {self.dims}D view; known ops: {', '.join(sorted(ops))}"
                )
            params = {k: copy.deepcopy(v) for k, v in item.items() if k != "op"}
            self._ops.append(ops[name](params))
            self.spec.append(copy.deepcopy({"op": name, **params}))

    def __len__(self) -> int:
        return len(self._ops)

    def __repr__(self) -> str:
        return f"ViewPipeline(dims={self.dims}, ops=[{', '.join(op.name for op in self._ops)}])"

    def __call__(self, array: np.ndarray, seed: int) -> np.ndarray:
        """Augment one channel-first array; the same array and seed always give the same float32 output."""
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
        x = np.asarray(array, dtype=np.float32)
        if x.ndim != self.dims + 1:
            layout = "(C, Z, Y, X)" if self.dims == 3 else "(C, H, W)"
            raise ValueError(f"a {self.dims}D view takes a {layout} array, got shape {x.shape}")
        streams = np.random.SeedSequence(int(seed)).spawn(len(self._ops))
        for op, stream in zip(self._ops, streams):
            x = op(x, np.random.default_rng(stream))
        out = np.ascontiguousarray(x, dtype=np.float32)
        if isinstance(array, np.ndarray) and np.may_share_memory(out, array):
            out = out.copy()
        return out


def build_view(spec: list[dict], dims: int) -> ViewPipeline:
    """Validate a view spec (unknown op or bad parameter -> ValueError naming the op) and build its pipeline."""
    return ViewPipeline(spec, dims)


def _square_plane(size: tuple[int, ...]) -> list[int] | None:
    """A pair of spatial axes with equal sizes, preferring the axial (Y, X) plane; None when there is none."""
    for a, b in ((1, 2), (0, 1), (0, 2)):
        if size[a] == size[b]:
            return [a, b]
    return None


def default_view(dims: int, size: tuple[int, ...], strength: str = "ssl") -> list[dict]:
    """A ready spec: "ssl" (SimCLR-style strong view), "finetune" (light view) or "eval" (centre crop only)."""
    _registry(dims)
    if isinstance(size, (int, np.integer)):
        size = (int(size),) * dims
    size = tuple(int(s) for s in size)
    if len(size) != dims or any(s < 1 for s in size):
        raise ConfigError(f"size must be {dims} positive integers for a {dims}D view, got {size!r}")
    if strength not in _STRENGTHS:
        raise ConfigError(f"strength must be one of {', '.join(_STRENGTHS)}, got {strength!r}")
    target = list(size)
    if strength == "eval":
        return [{"op": "center_crop", "size": target}]

    if dims == 3:
        plane = _square_plane(size)
        rot = [{"op": "rotate90", "spatial_axes": plane, "p": 0.5}] if plane else []
        if strength == "ssl":
            return [
                {"op": "random_resized_crop", "size": target, "scale": [0.5, 1.0], "ratio": [0.75, 4.0 / 3.0]},
                {"op": "flip", "axes": [0, 1, 2], "p": 0.5},
                *rot,
                {"op": "histogram_shift", "num_control_points": [5, 15], "p": 0.5},
                {"op": "gaussian_smooth", "sigma": [0.25, 1.0], "p": 0.5},
                {"op": "intensity_jitter", "scale": 0.1, "shift": 0.1, "p": 0.8},
                {"op": "gaussian_noise", "std": 0.02, "p": 0.3},
            ]
        # FMCIB-style fine-tuning: small shifts, gaussian smoothing, axis flips, 90-degree rotations
        return [
            {"op": "shift", "max_voxels": max(1, round(0.1 * min(size))), "p": 0.5},
            {"op": "center_crop", "size": target},
            {"op": "gaussian_smooth", "sigma": [0.25, 1.0], "p": 0.5},
            {"op": "flip", "axes": [0, 1, 2], "p": 0.5},
            *rot,
        ]

    if strength == "ssl":
        kernel = max(3, int(0.1 * min(size)) // 2 * 2 + 1)  # about a tenth of the image, odd (SimCLR)
        return [
            {"op": "random_resized_crop", "size": target, "scale": [0.2, 1.0], "ratio": [0.75, 4.0 / 3.0]},
            {"op": "flip", "axes": [1], "p": 0.5},
            {"op": "rotate", "degrees": 15.0, "p": 0.3},
            {"op": "brightness_contrast", "brightness": 0.4, "contrast": 0.4, "p": 0.8},
            {"op": "gaussian_blur", "sigma": [0.1, 2.0], "kernel_size": kernel, "p": 0.5},
            {"op": "gaussian_noise", "std": 0.02, "p": 0.2},
        ]
    return [
        {"op": "center_crop", "size": target},
        {"op": "flip", "axes": [1], "p": 0.5},
        {"op": "rotate", "degrees": 10.0, "p": 0.5},
        {"op": "brightness_contrast", "brightness": 0.1, "contrast": 0.1, "p": 0.5},
    ]
