"""Seed-point patches: parity with the published whole-volume FMCIB chain, and the ROI sampler's own rules."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from medfm.data.io import Geometry, Volume, read_volume, write_volume
from medfm.data.patches import crop_patch, plan_patch, resampled_grid, sample_trilinear
from medfm.data.profiles import FMCIB, FMCIB_CENTRED
from medfm.errors import PatchError

# MONAI's loader announces that an optional GPU image codec is absent; irrelevant here.
pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIP_X = (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
FLIP_Y = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
_C, _S = float(np.cos(np.radians(20))), float(np.sin(np.radians(20)))
OBLIQUE = (_C, -_S, 0.0, _S, _C, 0.0, 0.0, 0.0, 1.0)


def scaled(hu):
    """FMCIB's intensity scaling, written out: (HU + 1024) / 3072."""
    return (np.float64(hu) + 1024.0) / 3072.0


# ------------------------------------------------------------------------------------------------ parity

# Volumes big enough (> 50 mm on every axis) that an interior seed gets an unclamped crop, small enough that
# the whole-volume reference chain takes a fraction of a second.
PARITY_VOLUMES = {
    "aniso": Geometry(size=(76, 60, 24), spacing=(0.7, 0.9, 2.5), origin=(10.3, -20.7, 31.1), direction=IDENTITY),
    "flip-x": Geometry(size=(76, 60, 24), spacing=(0.7, 0.9, 2.5), origin=(-5.2, 40.4, -12.6), direction=FLIP_X),
    "flip-y": Geometry(size=(60, 76, 22), spacing=(0.9, 0.7, 2.5), origin=(33.3, 8.8, 100.0), direction=FLIP_Y),
    # Within MONAI's 1e-3 mm tolerance: the input grid is kept, not resampled to exactly 1 mm.
    "near-1mm": Geometry(size=(56, 54, 52), spacing=(1.0005, 0.9995, 1.0), origin=(-7.5, 2.25, -3.0), direction=FLIP_X),
    # Rotated 20° about z: no corner is smallest on every axis, so MONAI centres the new grid on the old.
    "oblique": Geometry(size=(70, 64, 22), spacing=(0.8, 0.8, 2.5), origin=(12.0, -30.5, 7.0), direction=OBLIQUE),
    # Just beyond the tolerance: resampled.
    "off-1mm": Geometry(size=(56, 54, 52), spacing=(1.002, 0.998, 1.0), origin=(-7.5, 2.25, -3.0), direction=IDENTITY),
}


def _parity_seeds(size):
    """Continuous (x, y, z) indices on the input grid: interior, near each border, the corners, between voxels."""
    n = np.asarray(size, dtype=float)
    mid = (n - 1) / 2
    seeds = {
        "interior": mid + (0.3, -0.6, 0.2),
        "between": np.floor(mid) + 0.5,
        "x-low": (3.2, mid[1], mid[2]),
        "x-high": (n[0] - 4.6, mid[1], mid[2]),
        "y-low": (mid[0], 1.7, mid[2]),
        "y-high": (mid[0], n[1] - 2.3, mid[2]),
        "z-low": (mid[0], mid[1], 0.4),
        "z-high": (mid[0], mid[1], n[2] - 1.4),
        "corner-low": (0.0, 0.0, 0.0),
        "corner-high": n - 1,
    }
    return {k: np.asarray(v, dtype=float) for k, v in seeds.items()}


PARITY_CASES = [
    (volume, seed)
    for volume in PARITY_VOLUMES
    for seed in _parity_seeds(PARITY_VOLUMES[volume].size)
    if volume in ("aniso", "flip-x") or seed in ("interior", "between", "x-high", "y-low", "z-high", "corner-low")
]


@pytest.fixture(scope="module")
def parity_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("parity")
    files = {}
    for i, (name, geometry) in enumerate(PARITY_VOLUMES.items()):
        rng = np.random.default_rng(100 + i)
        array = rng.integers(-1024, 3071, size=geometry.size[::-1]).astype(np.int16)
        files[name] = write_volume(array, geometry, folder / f"{name}.nii.gz")
    return files


@pytest.fixture(scope="module")
def reference():
    pytest.importorskip("itk")
    from medfm.data.fmcib_reference import reference_patch

    return reference_patch


@pytest.mark.parametrize(("volume_name", "seed_name"), PARITY_CASES)
def test_parity_with_whole_volume_fmcib_chain(parity_files, reference, volume_name, seed_name):
    path = parity_files[volume_name]
    volume = read_volume(path)
    index = _parity_seeds(volume.geometry.size)[seed_name]
    seed = volume.geometry.index_to_world(index)

    ours = crop_patch(volume, seed, FMCIB)
    theirs = reference(str(path), tuple(float(s) for s in seed))

    assert ours.shape == theirs.shape == (1, 50, 50, 50)
    assert ours.dtype == np.float32
    assert np.max(np.abs(ours - theirs)) <= 1e-4
    # The case exercises what it says: border seeds are clamped and padded, interior ones are not.
    plan = plan_patch(volume.geometry, seed, FMCIB)
    padded = plan.data_lo != plan.start or tuple(np.add(plan.start, plan.size_xyz)) != plan.data_hi
    assert padded == (seed_name not in ("interior", "between"))
    # A real patch: random HU, not all padding.
    assert np.std(ours) > 0.1


def _outside_seeds(geometry, mm):
    """Continuous indices ``mm`` millimetres outside the volume's edge (half a voxel beyond the outer voxel
    centres): off the low x face, off the high z face, and off a low corner along the diagonal."""
    n = np.asarray(geometry.size, dtype=float)
    spacing = np.asarray(geometry.spacing)
    mid = (n - 1) / 2 + (0.3, -0.2, 0.1)
    along = mm / np.sqrt(3.0) / spacing
    return {
        "x-low": np.array([-0.5 - mm / spacing[0], mid[1], mid[2]]),
        "z-high": np.array([mid[0], mid[1], n[2] - 0.5 + mm / spacing[2]]),
        "corner": -0.5 - along,
    }


OUTSIDE_CASES = [
    (volume, side, mm)
    for volume in PARITY_VOLUMES
    for side in ("x-low", "z-high", "corner")
    for mm in (4.0, 5.0, 6.0)
    if volume in ("aniso", "flip-x", "oblique") or mm == 5.0
]


@pytest.mark.parametrize(("volume_name", "side", "mm"), OUTSIDE_CASES)
def test_parity_for_seeds_4_to_6_mm_outside(parity_files, reference, volume_name, side, mm):
    # FMCIB's chain crops the part of the ±25 box that lies inside the resampled scan and pads it: profile fmcib
    # gives that patch, with a warning; fmcib-centred refuses the seed.
    path = parity_files[volume_name]
    volume = read_volume(path)
    seed = volume.geometry.index_to_world(_outside_seeds(volume.geometry, mm)[side])

    ours = crop_patch(volume, seed, FMCIB)
    theirs = reference(str(path), tuple(float(s) for s in seed))
    assert ours.shape == theirs.shape == (1, 50, 50, 50)
    assert np.max(np.abs(ours - theirs)) <= 1e-4
    assert np.std(ours) > 0.1  # part of it is the scan's random HU

    plan = plan_patch(volume.geometry, seed, FMCIB)
    assert plan.warning is not None and f"lies {mm:.1f} mm outside the volume" in plan.warning
    assert "padded" in plan.warning
    with pytest.raises(PatchError, match=f"lies {mm:.1f} mm outside the volume"):
        plan_patch(volume.geometry, seed, FMCIB_CENTRED)


def test_inside_seeds_carry_no_warning(parity_files):
    volume = read_volume(parity_files["aniso"])
    for index in _parity_seeds(volume.geometry.size).values():
        assert plan_patch(volume.geometry, volume.geometry.index_to_world(index), FMCIB).warning is None


def test_parity_with_a_non_cubic_odd_patch(parity_files, reference):
    profile = replace(FMCIB, name="test-odd", size=(21, 30, 41))
    path = parity_files["flip-y"]
    volume = read_volume(path)
    for index in ((30.0, 38.5, 11.0), (2.0, 70.0, 20.0)):
        seed = volume.geometry.index_to_world(np.asarray(index))
        ours = crop_patch(volume, seed, profile)
        theirs = reference(str(path), tuple(float(s) for s in seed), size_zyx=(21, 30, 41))
        assert ours.shape == theirs.shape == (1, 21, 30, 41)
        assert np.max(np.abs(ours - theirs)) <= 1e-4


def test_spacing_tolerance_keeps_the_input_grid():
    near = resampled_grid(PARITY_VOLUMES["near-1mm"], (1.0, 1.0, 1.0))
    off = resampled_grid(PARITY_VOLUMES["off-1mm"], (1.0, 1.0, 1.0))
    np.testing.assert_allclose(
        np.linalg.norm(near.affine_ras[:3, :3], axis=0), (1.0005, 0.9995, 1.0), rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.norm(off.affine_ras[:3, :3], axis=0), (1.0, 1.0, 1.0), rtol=0, atol=1e-12)
    assert near.shape == (56, 54, 52)
    assert off.shape == (round(55 * 1.002) + 1, round(53 * 0.998) + 1, 52)


# --------------------------------------------------------------------------------------- sampler's rules


def _one_mm_volume(size=(60, 56, 52), direction=IDENTITY, background=-1000, origin=(-20.3, 15.7, -100.2)):
    geometry = Geometry(size=size, spacing=(1.0, 1.0, 1.0), origin=origin, direction=direction)
    array = np.full(size[::-1], background, dtype=np.int16)
    return array, geometry


def _volume(array, geometry, tmp_path, name="v.nii.gz"):
    return read_volume(write_volume(array, geometry, tmp_path / name))


def test_seed_outside_the_volume_raises(small_ct):
    volume = read_volume(small_ct.path)
    far = volume.geometry.index_to_world(np.array([-40.0, 10.0, 10.0]))  # 39.5 × 0.75 mm: the box misses the scan
    for profile in (FMCIB, FMCIB_CENTRED):
        with pytest.raises(PatchError, match="lies 29.6 mm outside the volume"):
            crop_patch(volume, far, profile)
    with pytest.raises(PatchError, match="50×50×50 box does not reach the volume"):
        plan_patch(volume.geometry, far, FMCIB)
    above = volume.geometry.index_to_world(np.array([10.0, 10.0, 30.0]))  # 6.5 slices × 2.5 mm above the top
    with pytest.raises(PatchError, match="lies 16.2 mm outside the volume"):
        plan_patch(volume.geometry, above, FMCIB_CENTRED)
    # FMCIB's clamp-and-pad reaches 25 mm around the seed: the 8 slices of the 1 mm grid its box still covers, padded
    plan = plan_patch(volume.geometry, above, FMCIB)
    assert plan.warning.startswith("seed (") and "lies 16.2 mm outside the volume" in plan.warning
    assert np.subtract(plan.data_hi, plan.data_lo)[2] == 8


@pytest.mark.parametrize("seed", [(np.nan, 0.0, 0.0), (0.0, np.inf, 0.0), (1.0, 2.0)])
def test_seed_must_be_three_finite_numbers(small_ct, seed):
    with pytest.raises(PatchError, match="not three finite numbers"):
        plan_patch(small_ct.geometry, np.asarray(seed), FMCIB)


@pytest.mark.parametrize("direction", [IDENTITY, FLIP_X, FLIP_Y], ids=["identity", "flip-x", "flip-y"])
def test_bright_voxel_lands_at_the_expected_patch_index(tmp_path, direction):
    array, geometry = _one_mm_volume(direction=direction)
    seed_voxel = np.array([30, 28, 26])
    offset = np.array([3, -2, 4])  # (x, y, z) voxels
    bright = seed_voxel + offset
    array[bright[2], bright[1], bright[0]] = 2000
    volume = _volume(array, geometry, tmp_path)
    # 0.3 mm into the voxel along LPS (the patch axes), so truncation and rounding both pick this voxel.
    seed = geometry.index_to_world(seed_voxel.astype(float)) + 0.3

    d = np.asarray(direction).reshape(3, 3)
    px, py, pz = (25 + d @ offset).astype(int)  # the patch is LPS-aligned with 1 mm voxels, seed voxel at index 25
    for profile in (FMCIB, FMCIB_CENTRED):
        patch = crop_patch(volume, seed, profile)
        assert patch.shape == (1, 50, 50, 50)
        assert np.unravel_index(np.argmax(patch), patch.shape) == (0, pz, py, px)
        assert patch[0, pz, py, px] == pytest.approx(scaled(2000), abs=1e-6)
        others = np.delete(patch.ravel(), np.ravel_multi_index((0, pz, py, px), patch.shape))
        np.testing.assert_allclose(others, scaled(-1000), rtol=0, atol=1e-6)


def test_fmcib_moves_the_seed_off_centre_near_a_border(tmp_path):
    """FMCIB clamps the crop to the volume and pads both sides: the seed leaves the centre."""
    array, geometry = _one_mm_volume()
    seed_voxel = np.array([3, 28, 26])
    array[seed_voxel[2], seed_voxel[1], seed_voxel[0]] = 2000
    volume = _volume(array, geometry, tmp_path)
    seed = geometry.index_to_world(seed_voxel.astype(float)) + 0.3
    patch = crop_patch(volume, seed, FMCIB)
    # x: crop [0, 28) is 28 voxels, padded by 11 before → the seed voxel lands at x = 3 + 11.
    assert np.unravel_index(np.argmax(patch), patch.shape) == (0, 25, 25, 14)
    np.testing.assert_array_equal(patch[0, :, :, :11], 0.0)
    np.testing.assert_array_equal(patch[0, :, :, 39:], 0.0)
    np.testing.assert_allclose(patch[0, :, :, 11:39][patch[0, :, :, 11:39] < 0.5], scaled(-1000), atol=1e-6)


def test_fmcib_centred_keeps_the_seed_at_the_centre_near_a_border(tmp_path):
    array, geometry = _one_mm_volume(direction=FLIP_Y, background=100)
    seed_voxel = np.array([2, 3, 49])  # near x=0, y=0 and the top z
    array[seed_voxel[2], seed_voxel[1], seed_voxel[0]] = 1500
    volume = _volume(array, geometry, tmp_path)
    # Rounded to the nearest voxel: 0.4 mm off still picks it.
    seed = geometry.index_to_world(seed_voxel.astype(float)) + np.array([0.4, -0.4, 0.4])
    patch = crop_patch(volume, seed, FMCIB_CENTRED)[0]

    assert np.unravel_index(np.argmax(patch), patch.shape) == (25, 25, 25)
    assert patch[25, 25, 25] == pytest.approx(scaled(1500), abs=1e-6)
    # Which patch voxels fall inside the volume: patch index p ↔ LPS voxel seed + (p - 25).
    lps_index = np.array([2, 56 - 1 - 3, 49])  # flip-y: LPS y counts the other way
    inside = np.ones((50, 50, 50), bool)
    for axis, n in zip((2, 1, 0), (60, 56, 52)):  # patch axes (z, y, x) ← volume sizes (x, y, z)
        p = np.arange(50) + lps_index[2 - axis] - 25
        keep = (p >= 0) & (p < n)
        shape = [1, 1, 1]
        shape[axis] = 50
        inside &= keep.reshape(shape)
    assert 0 < inside.sum() < inside.size
    np.testing.assert_array_equal(patch[~inside], 0.0)  # -1024 HU scaled
    inside[25, 25, 25] = False
    np.testing.assert_allclose(patch[inside], scaled(100), rtol=0, atol=1e-6)


def test_constant_volume_scales_every_data_voxel(tmp_path):
    value = 40
    # Whole-millimetre extents (40, 40, 50 mm) so the 1 mm grid ends exactly on the last voxel centres.
    geometry = Geometry(size=(81, 51, 21), spacing=(0.5, 0.8, 2.5), origin=(12.0, -33.5, 7.25), direction=FLIP_Y)
    volume = _volume(np.full((21, 51, 81), value, np.int16), geometry, tmp_path)
    assert resampled_grid(geometry, (1.0, 1.0, 1.0)).shape == (41, 41, 51)
    for index in ((40.0, 25.0, 10.0), (2.0, 48.0, 1.0), (80.0, 0.0, 20.0)):
        seed = geometry.index_to_world(np.asarray(index))
        plan = plan_patch(geometry, seed, FMCIB)
        patch = crop_patch(volume, seed, FMCIB)[0]
        lo = np.subtract(plan.data_lo, plan.start)
        hi = np.subtract(plan.data_hi, plan.start)
        data = np.zeros(patch.shape, bool)
        data[lo[2] : hi[2], lo[1] : hi[1], lo[0] : hi[0]] = True
        assert data.sum() == np.prod(hi - lo) > 0
        np.testing.assert_allclose(patch[data], scaled(value), rtol=0, atol=1e-6)
        np.testing.assert_array_equal(patch[~data], 0.0)


def test_scaling_and_channels(small_ct):
    volume = read_volume(small_ct.path)
    seed = small_ct.geometry.index_to_world(np.array([20.0, 18.0, 12.0]))
    one = crop_patch(volume, seed, FMCIB)
    three = crop_patch(volume, seed, replace(FMCIB, name="three", channels=3))
    assert three.shape == (3, 50, 50, 50)
    for c in range(3):
        np.testing.assert_array_equal(three[c], one[0])
    clipped = crop_patch(volume, seed, replace(FMCIB, name="clip", hu_window=(-1000.0, 400.0), clip=True))
    assert clipped.min() == 0.0 and clipped.max() == 1.0
    assert FMCIB.scale(np.array([-1024, 0, 2048])).tolist() == [0.0, np.float32(1024 / 3072), 1.0]


# ------------------------------------------------------------------------------------------ trilinear


def test_sample_trilinear_against_hand_computation():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(3, 4, 5))  # (Z, Y, X)
    fill = -7.0

    def by_hand(x, y, z):
        x0, y0, z0 = int(np.floor(x)), int(np.floor(y)), int(np.floor(z))
        fx, fy, fz = x - x0, y - y0, z - z0
        total = 0.0
        for dz, wz in ((0, 1 - fz), (1, fz)):
            for dy, wy in ((0, 1 - fy), (1, fy)):
                for dx, wx in ((0, 1 - fx), (1, fx)):
                    zi, yi, xi = z0 + dz, y0 + dy, x0 + dx
                    inside = 0 <= zi < 3 and 0 <= yi < 4 and 0 <= xi < 5
                    total += wz * wy * wx * (a[zi, yi, xi] if inside else fill)
        return total

    # One point written out in full: x=1.25, y=2.5, z=0.75.
    explicit = 0.25 * (
        0.5 * (0.75 * a[0, 2, 1] + 0.25 * a[0, 2, 2]) + 0.5 * (0.75 * a[0, 3, 1] + 0.25 * a[0, 3, 2])
    ) + 0.75 * (0.5 * (0.75 * a[1, 2, 1] + 0.25 * a[1, 2, 2]) + 0.5 * (0.75 * a[1, 3, 1] + 0.25 * a[1, 3, 2]))
    assert sample_trilinear(a, np.array([1.25, 2.5, 0.75]), fill) == pytest.approx(explicit, abs=1e-12)

    points = np.array(
        [
            [1.25, 2.5, 0.75],
            [0.0, 0.0, 0.0],  # a voxel centre
            [4.0, 3.0, 2.0],  # the last voxel centre: the neighbour beyond has weight 0
            [-0.5, 1.0, 2.0],  # half a voxel outside in x: half fill
            [4.5, 1.0, 1.0],  # half a voxel beyond the last x
            [2.0, 1.0, -0.25],  # a quarter voxel below z=0
            [3.3, 3.6, 1.9],
            [-2.0, 1.0, 1.0],  # wholly outside
        ]
    )
    got = sample_trilinear(a, points, fill)
    expected = np.array([by_hand(*p) for p in points])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert got[1] == a[0, 0, 0]
    assert got[2] == pytest.approx(a[2, 3, 4], abs=1e-12)
    assert got[3] == pytest.approx(0.5 * a[2, 1, 0] + 0.5 * fill, abs=1e-12)
    assert got[4] == pytest.approx(0.5 * a[1, 1, 4] + 0.5 * fill, abs=1e-12)
    assert got[5] == pytest.approx(0.75 * a[0, 1, 2] + 0.25 * fill, abs=1e-12)
    assert got[7] == fill
    # Leading shape is kept.
    assert sample_trilinear(a, points[:6].reshape(2, 3, 3), fill).shape == (2, 3)


# -------------------------------------------------------------------------------------- patch geometry


@pytest.mark.parametrize("profile", [FMCIB, FMCIB_CENTRED], ids=lambda p: p.name)
@pytest.mark.parametrize("direction", [IDENTITY, FLIP_X], ids=["identity", "flip-x"])
def test_patch_geometry_puts_the_centre_at_the_seed(profile, direction):
    _, geometry = _one_mm_volume(direction=direction)
    seed = geometry.index_to_world(np.array([30.4, 27.7, 26.2]))
    g = plan_patch(geometry, seed, profile).geometry
    assert g.size == (50, 50, 50)
    np.testing.assert_allclose(g.spacing, (1.0, 1.0, 1.0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(g.direction, IDENTITY, rtol=0, atol=1e-12)  # LPS
    centre = g.index_to_world(np.array([25.0, 25.0, 25.0]))
    assert np.all(np.abs(centre - seed) <= 1.0)
    if profile.seed_rounding == "round":
        assert np.all(np.abs(centre - seed) <= 0.5 + 1e-9)


def test_patch_geometry_matches_patch_values(tmp_path):
    """Voxel p of the patch holds the volume's value at the world point the patch geometry gives for p."""
    rng = np.random.default_rng(9)
    geometry = Geometry(size=(40, 30, 20), spacing=(0.7, 0.9, 2.5), origin=(4.0, -3.0, 2.0), direction=FLIP_X)
    array = rng.integers(-1000, 1000, size=(20, 30, 40)).astype(np.int16)
    volume = _volume(array, geometry, tmp_path)
    seed = geometry.index_to_world(np.array([20.3, 14.6, 9.1]))
    plan = plan_patch(geometry, seed, FMCIB)
    patch = crop_patch(volume, seed, FMCIB)[0]
    g = plan.geometry
    assert g.spacing == pytest.approx((1.0, 1.0, 1.0))
    for p in ((25, 25, 25), (plan.data_lo[0] - plan.start[0], 30, 20), (30, 12, 33)):
        world = g.index_to_world(np.asarray(p, dtype=float))
        hu = sample_trilinear(array, geometry.world_to_index(world), -1024.0)
        assert patch[p[2], p[1], p[0]] == pytest.approx(scaled(hu), abs=1e-6)


@pytest.mark.parametrize("direction", [IDENTITY, FLIP_X, (0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)])
def test_separable_sampling_equals_pointwise_trilinear(direction):
    """Axis-aligned grids take three matrix products; they must give what point-by-point trilinear gives."""
    import medfm.data.patches as patches

    rng = np.random.default_rng(5)
    geometry = Geometry(size=(64, 70, 30), spacing=(0.7, 0.8, 2.5), origin=(-10.0, 20.0, -50.0), direction=direction)
    volume = Volume(rng.integers(-1024, 2000, size=(30, 70, 64)).astype(np.int16), geometry, "memory")
    for index in ((30.0, 35.0, 15.0), (0.2, 1.0, 0.0), (63.4, 69.0, 29.4)):
        seed = geometry.index_to_world(np.asarray(index))
        for profile in (FMCIB, FMCIB_CENTRED):
            plan = plan_patch(geometry, seed, profile)
            fast = patches.sample_patch(volume, plan, profile)
            assert patches._axis_map(np.linalg.inv(geometry.matrix) @ plan.affine_lps) is not None  # fast path taken
            slow = patches.sample_patch(volume, plan, profile, separable=False)
            np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)
