"""Cut a patch at a seed point, sampling only the patch from the original volume (ROI-first).

The published FMCIB chain resamples the whole scan to 1 mm, reorients it to LPS and crops 50³ around the
seed. Here the very grid that chain would produce is computed from the header alone (MONAI ``Spacing``'s
rule for shape and offset, then the flip to LPS), and only the patch's voxels are interpolated from the
original voxels — trilinear, with voxels beyond the volume worth ``profile.pad_hu`` — so the values agree
with the whole-volume chain while touching a few thousand voxels instead of tens of millions.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from medfm.data.io import Geometry, Volume
from medfm.data.profiles import Profile
from medfm.errors import PatchError

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_SPACING_TOL = 1e-3  # MONAI's AFFINE_TOL: an input spacing this close to the target is kept


@dataclass(frozen=True)
class ResampledGrid:
    """The whole-volume grid a profile resamples to: (x, y, z) shape and index → RAS affine (LPS-ordered axes)."""

    shape: tuple[int, int, int]
    affine_ras: np.ndarray


@dataclass(frozen=True)
class PatchPlan:
    """Where a patch lies on the resampled grid: its first grid index and which voxels hold data.

    ``start`` is the grid index (x, y, z) of patch voxel (0, 0, 0); voxels of the patch outside
    ``[data_lo, data_hi)`` (grid indices) are padding. ``warning`` says why a patch was cut but deserves a look
    (a seed outside the volume whose box still reaches it, under a ``clamp-pad`` profile, as FMCIB).
    """

    grid: ResampledGrid
    seed_index: tuple[float, float, float]
    start: tuple[int, int, int]
    data_lo: tuple[int, int, int]
    data_hi: tuple[int, int, int]
    size_xyz: tuple[int, int, int]
    warning: str | None = None

    @property
    def affine_lps(self) -> np.ndarray:
        """4×4 map from patch index (x, y, z) to LPS world mm."""
        shift = np.eye(4)
        shift[:3, 3] = self.start
        return _LPS_RAS @ self.grid.affine_ras @ shift

    @property
    def geometry(self) -> Geometry:
        """The patch's true geometry (LPS), for writing it where a viewer can overlay it on the scan."""
        a = self.affine_lps
        spacing = np.linalg.norm(a[:3, :3], axis=0)
        return Geometry(
            size=self.size_xyz,
            spacing=tuple(float(s) for s in spacing),
            origin=tuple(float(o) for o in a[:3, 3]),
            direction=tuple((a[:3, :3] / spacing).ravel().tolist()),
        )


def resampled_grid(geometry: Geometry, spacing: tuple[float, float, float]) -> ResampledGrid:
    """The grid MONAI ``Spacing(diagonal=True)`` then ``Orientation('LPS')`` give, from the header only."""
    in_aff = _LPS_RAS @ geometry.matrix  # MONAI's ITK reader hands out RAS affines
    shape = np.asarray(geometry.size, dtype=float)
    orig_d = np.linalg.norm(in_aff[:3, :3], axis=0)
    target = np.asarray(spacing, dtype=float)
    out_d = np.where(np.abs(orig_d - target) <= _SPACING_TOL, orig_d, target)
    out_aff = np.diag(np.append(out_d, 1.0))

    corners = np.array(list(itertools.product(*[(0.0, d - 1.0) for d in shape]))).T
    corners = np.concatenate([corners, np.ones((1, corners.shape[1]))])
    corners_out = np.linalg.solve(out_aff, in_aff) @ corners
    corners_world = in_aff @ corners
    all_dist = corners_out[:-1].copy()
    out_shape = np.round(np.ptp(corners_out[:-1] / corners_out[-1], axis=1) + 1.0)
    offset = None
    for i in range(corners.shape[1]):  # a corner that is the smallest on every axis becomes the origin
        if np.allclose(np.min(all_dist - all_dist[:, i : i + 1], axis=1), 0.0, rtol=_SPACING_TOL):
            offset = corners_world[:-1, i]
            break
    if offset is None:  # oblique input: centre the new grid on the old one
        offset = in_aff[:3, :3] @ (shape / 2.0) + in_aff[:3, 3] - out_aff[:3, :3] @ (out_shape / 2.0)
    out_aff[:3, 3] = offset

    # Reorient RAS → LPS: flip the first two axes.
    flip = np.eye(4)
    for axis in (0, 1):
        flip[axis, axis] = -1.0
        flip[axis, 3] = out_shape[axis] - 1.0
    return ResampledGrid(shape=tuple(int(s) for s in out_shape), affine_ras=out_aff @ flip)


def plan_patch(
    geometry: Geometry, seed_lps: tuple[float, float, float] | np.ndarray, profile: Profile, given: str | None = None
) -> PatchPlan:
    """Place a patch of ``profile`` at a seed given in LPS world mm; ``given`` names the seed in errors as the user
    wrote it (e.g. ``Manifest.seed_as_given``)."""
    grid = resampled_grid(geometry, profile.spacing)
    seed = np.asarray(seed_lps, dtype=float)
    if seed.shape != (3,) or not np.all(np.isfinite(seed)):
        raise PatchError(f"seed {tuple(seed.tolist())} is not three finite numbers")
    centre_ras = (-seed[0], -seed[1], seed[2], 1.0)
    index = (np.linalg.inv(grid.affine_ras) @ np.asarray(centre_ras))[:3]
    shape = np.asarray(grid.shape)
    source_index = geometry.world_to_index(seed)  # checked against the scan itself, not the 1 mm grid
    beyond = np.maximum(np.maximum(-0.5 - source_index, source_index - (np.asarray(geometry.size) - 0.5)), 0.0)
    outside = None
    if np.any(beyond > 0):
        distance = np.linalg.norm(beyond * np.asarray(geometry.spacing))
        name = given or f"seed ({seed[0]:.1f}, {seed[1]:.1f}, {seed[2]:.1f}) mm"
        outside = f"{name} lies {distance:.1f} mm outside the volume"
        if profile.border != "clamp-pad":
            raise PatchError(outside)
    if profile.seed_rounding == "trunc":
        centre = np.array([int(c) for c in index])
    else:
        centre = np.floor(index + 0.5).astype(int)
    size_xyz = np.asarray(profile.size[::-1])
    half = size_xyz // 2
    if profile.border == "clamp-pad":
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half, shape)
        if np.any(hi <= lo):
            box = "×".join(str(int(n)) for n in profile.size[::-1])
            raise PatchError(f"{outside or 'seed'}: its {box} box does not reach the volume")
        start = lo - (size_xyz - (hi - lo)) // 2
    else:
        start = centre - half
        lo, hi = start, start + size_xyz
    return PatchPlan(
        grid=grid,
        seed_index=tuple(float(i) for i in index),
        start=tuple(int(s) for s in start),
        data_lo=tuple(int(v) for v in lo),
        data_hi=tuple(int(v) for v in hi),
        size_xyz=tuple(int(s) for s in size_xyz),
        warning=f"{outside}: the part of the box inside it, padded (as FMCIB)" if outside else None,
    )


def source_region(geometry: Geometry, plans: list[PatchPlan]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box of source voxels (start, size in (x, y, z) index) that the planned patches interpolate from."""
    lows, highs = [], []
    for plan in plans:
        lo = np.asarray(plan.data_lo) - plan.start
        hi = np.asarray(plan.data_hi) - plan.start - 1
        corners = np.array(
            [[(lo, hi)[b][a] for a, b in enumerate(bits)] for bits in itertools.product((0, 1), repeat=3)]
        )
        world = np.c_[corners, np.ones(8)] @ plan.affine_lps.T
        index = geometry.world_to_index(world[:, :3])
        lows.append(np.floor(index.min(axis=0)) - 1)  # one voxel of slack on each side for rounding
        highs.append(np.floor(index.max(axis=0)) + 2)
    size = np.asarray(geometry.size)
    start = np.clip(np.min(lows, axis=0), 0, size - 1).astype(int)
    stop = np.clip(np.max(highs, axis=0) + 1, start + 1, size).astype(int)
    return tuple(start.tolist()), tuple((stop - start).tolist())


def _block(array: np.ndarray, lo: np.ndarray, hi: np.ndarray, fill: float) -> np.ndarray:
    """``array[lo:hi]`` (per axis) as float64, with ``fill`` wherever the box leaves the array."""
    shape = np.asarray(array.shape)
    src_lo, src_hi = np.clip(lo, 0, shape), np.clip(hi, 0, shape)
    block = np.full(tuple(hi - lo), fill, dtype=np.float64)
    if np.all(src_hi > src_lo):
        dst = tuple(slice(a - b, c - b) for a, b, c in zip(src_lo, lo, src_hi))
        block[dst] = array[tuple(slice(a, c) for a, c in zip(src_lo, src_hi))]
    return block


def sample_trilinear(array: np.ndarray, index_xyz: np.ndarray, fill: float) -> np.ndarray:
    """Trilinear values of a (Z, Y, X) array at continuous (x, y, z) indices, ``fill`` beyond the array.

    Only the block of voxels the points touch is read, padded with ``fill`` where it leaves the array, so a
    point half a voxel outside blends with ``fill`` exactly as ``grid_sample(padding_mode='zeros')`` does.
    """
    pts = np.asarray(index_xyz, dtype=np.float64)[..., ::-1].reshape(-1, 3)  # (z, y, x)
    base = np.floor(pts)
    lo = base.min(axis=0).astype(int)
    block = _block(array, lo, base.max(axis=0).astype(int) + 2, fill)  # +2: the upper neighbour, exclusive
    i0 = (base - lo).astype(np.intp)
    f = pts - base
    z, y, x = i0[:, 0], i0[:, 1], i0[:, 2]
    fz, fy, fx = f[:, 0], f[:, 1], f[:, 2]
    c00 = block[z, y, x] * (1 - fx) + block[z, y, x + 1] * fx
    c01 = block[z, y + 1, x] * (1 - fx) + block[z, y + 1, x + 1] * fx
    c10 = block[z + 1, y, x] * (1 - fx) + block[z + 1, y, x + 1] * fx
    c11 = block[z + 1, y + 1, x] * (1 - fx) + block[z + 1, y + 1, x + 1] * fx
    out = (c00 * (1 - fy) + c01 * fy) * (1 - fz) + (c10 * (1 - fy) + c11 * fy) * fz
    return out.reshape(np.shape(index_xyz)[:-1])


def _axis_map(patch_to_source: np.ndarray) -> list[int] | None:
    """For each patch axis the one source axis it runs along, or None when the grids are oblique."""
    m = np.abs(patch_to_source[:3, :3])
    nonzero = m > 1e-9 * m.max()
    if not (np.all(nonzero.sum(axis=0) == 1) and np.all(nonzero.sum(axis=1) == 1)):
        return None
    return [int(np.argmax(nonzero[:, a])) for a in range(3)]


def _linear_weights(coords: np.ndarray, start: int, length: int) -> np.ndarray:
    """(len(coords), length) matrix of 1-D linear interpolation weights over source voxels start…start+length."""
    base = np.floor(coords)
    frac = coords - base
    i0 = (base - start).astype(np.intp)
    weights = np.zeros((len(coords), length))
    rows = np.arange(len(coords))
    weights[rows, i0] = 1.0 - frac
    weights[rows, i0 + 1] += frac
    return weights


def _sample_separable(
    array: np.ndarray, patch_to_source: np.ndarray, axes_src: list[int], axes: list[np.ndarray], fill: float
) -> np.ndarray:
    """Trilinear sampling when each patch axis runs along one source axis: three small matrix products.

    Same values as :func:`sample_trilinear` (trilinear weights factor per axis), much faster for a 50³ patch (see ``benchmarks/extract_speed.py``).
    Returns (Z, Y, X) over the given patch axes.
    """
    coords = [patch_to_source[axes_src[a], a] * axes[a] + patch_to_source[axes_src[a], 3] for a in range(3)]
    lo = np.zeros(3, dtype=int)  # per source axis (x, y, z)
    hi = np.zeros(3, dtype=int)
    for a in range(3):
        b = axes_src[a]
        lo[b] = int(np.floor(coords[a].min()))
        hi[b] = int(np.floor(coords[a].max())) + 2
    block = _block(array, lo[::-1], hi[::-1], fill)  # (z, y, x) of the source
    src_letters = {0: "k", 1: "j", 2: "i"}  # source axis x, y, z → block dims (i=z, j=y, k=x)
    out_letters = {0: "c", 1: "b", 2: "a"}  # patch axis x, y, z → output dims (Z, Y, X) = a, b, c
    weights = [_linear_weights(coords[a], lo[axes_src[a]], hi[axes_src[a]] - lo[axes_src[a]]) for a in range(3)]
    spec = "ijk," + ",".join(out_letters[a] + src_letters[axes_src[a]] for a in range(3)) + "->abc"
    return np.einsum(spec, block, *weights, optimize=True)


def sample_patch(volume: Volume, plan: PatchPlan, profile: Profile, separable: bool = True) -> np.ndarray:
    """Interpolate the planned patch from the original voxels; returns (C, Z, Y, X) float32, scaled.

    ``separable=False`` forces point-by-point trilinear even on axis-aligned grids (for checks and benchmarks).
    """
    size = plan.size_xyz
    lo = np.asarray(plan.data_lo) - plan.start
    hi = np.asarray(plan.data_hi) - plan.start
    hu = np.full(size[::-1], profile.pad_hu, dtype=np.float64)  # (Z, Y, X)
    axes = [np.arange(lo[a], hi[a]) for a in range(3)]
    if all(len(a) for a in axes):
        to_source = np.linalg.inv(volume.geometry.matrix) @ plan.affine_lps  # patch index → source index
        axes_src = _axis_map(to_source) if separable else None
        if axes_src is not None:
            values = _sample_separable(volume.array, to_source, axes_src, axes, profile.pad_hu)
        else:
            xx, yy, zz = np.meshgrid(*axes, indexing="ij")
            patch_idx = np.stack([xx, yy, zz, np.ones_like(xx)], axis=-1).reshape(-1, 4).astype(float)
            src_index = (patch_idx @ to_source.T)[:, :3]
            values = sample_trilinear(volume.array, src_index, profile.pad_hu).reshape(xx.shape).transpose(2, 1, 0)
        hu[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = values
    patch = profile.scale(hu)
    return np.repeat(patch[None], profile.channels, axis=0)


def crop_patch(volume: Volume, seed_lps: tuple[float, float, float] | np.ndarray, profile: Profile) -> np.ndarray:
    """Cut the patch of ``profile`` centred at an LPS seed; returns (C, Z, Y, X) float32."""
    return sample_patch(volume, plan_patch(volume.geometry, seed_lps, profile), profile)
