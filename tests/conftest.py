"""Fixtures shared by the test suite: the real data folder and a small synthetic CT."""

from __future__ import annotations

import inspect
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


# ------------------------------------------------------------------------------------------------------- test tiers
# `make test-fast` runs `-m "not slow and not ddp and not real_data"`; `make test` runs everything. The markers are
# set here, so a new test lands in the right tier by what it uses: real data (the shared fixtures or folder), DDP
# (its file or name), or a measured duration (`pytest --durations`, listed below; over ~1 s on an idle 2-core CPU).
REAL_DATA_NAMES = ("need_shared", "require_shared", "shared_data", "SHARED_DATA")
REAL_DATA_FILES = ("test_real_ct.py", "test_analyze_real.py")  # read ../shared/data through their own paths
DDP_FILES = ("test_extract_ddp.py", "test_finetune_ddp.py", "test_pretrain_ddp.py", "test_segment_ddp.py")
DDP_WORDS = ("ddp", "two_ranks", "two_processes", "gloo")
# Files whose module fixtures train or extract for real: every test in them is slow.
SLOW_FILES = ("test_extract.py", "test_detect_train.py", "test_segment.py", "test_pretrain.py", "test_finetune.py")
SLOW_TESTS = (
    "test_probe.py::test_evaluate_modules_do_not_import_torch",
    "test_configs.py::test_fmcib_comparison_runs_every_arm_on_synthetic_volumes",
    "test_fmcib_files.py::test_import_medfm_does_not_import_torch",
    "test_medmnist.py::test_real_medmnist_files",
    "test_probe.py::test_multiclass_probe",
    "test_probe.py::test_shared_storage_keeps_feature_sets_apart",
    "test_probe.py::test_same_seed_same_results",
    "test_probe.py::test_compare_good_vs_noisy",
    "test_patches.py::test_parity_with_whole_volume_fmcib_chain",
    "test_transfer.py::test_radiologynet_archive_into_a_unet",
    "test_linear.py::test_optuna_storage_accumulates_trials",
    "test_survival.py::test_train_fractions_keep_the_test_rows",
    "test_survival.py::test_run_survival_finds_the_signal",
    "test_registry.py::test_fmcib_architecture",
    "test_registry.py::test_fmcib_forward_shape",
    "test_registry.py::test_resnet10_forward_matches_feature_dim",
    "test_registry.py::test_one_channel_model_from_three_channel_weights",
    "test_io.py::test_dicom_folder_with_two_series",
    "test_io.py::test_dicom_series_folder_reads_sorted_by_position",
)


def _source(obj: object) -> str:
    try:
        return inspect.getsource(inspect.unwrap(obj))
    except (OSError, TypeError):
        return ""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test slow / ddp / real_data (see the lists above)."""
    for item in items:
        file = Path(str(item.fspath)).name
        name = item.nodeid.split("::", 1)[-1]
        base = name.split("[", 1)[0]
        module = getattr(item, "module", None)
        used = [getattr(module, f, None) for f in getattr(item, "fixturenames", ())]
        sources = [_source(getattr(item, "function", None))] + [_source(f) for f in used if callable(f)]
        if (
            file in REAL_DATA_FILES
            or set(getattr(item, "fixturenames", ())) & set(REAL_DATA_NAMES)
            or any(word in text for text in sources for word in REAL_DATA_NAMES)
        ):
            item.add_marker(pytest.mark.real_data)
        if file in DDP_FILES or any(word in base for word in DDP_WORDS):
            item.add_marker(pytest.mark.ddp)
        if file in SLOW_FILES or f"{file}::{base}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


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
