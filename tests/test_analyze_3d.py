"""medfm analyze on volumes: seed-point patches of a small CT through every analysis, a 3D fine-tuned card."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from medfm.analyze.cli import main as analyze_main
from medfm.analyze.inputs import open_manifest, read_inputs
from medfm.analyze.invariance import run_invariance
from medfm.analyze.models import load_analysis_model, load_card_model
from medfm.analyze.perceptual import run_perceptual
from medfm.analyze.reconstruct import run_reconstruct
from medfm.analyze.saliency import run_saliency
from medfm.data import profiles
from medfm.data.profiles import Profile, register_profile
from medfm.finetune.module import mlp_head
from medfm.models import hub, registry
from medfm.models.registry import build_trunk

PROFILE = "test-3d-16"
SEEDS_INDEX = [(20, 18, 12), (12, 10, 8), (28, 24, 16)]  # (x, y, z) voxel indices inside the 40×36×24 CT


@pytest.fixture(scope="module", autouse=True)
def isolated_registry(tmp_path_factory):
    models, known = dict(registry._REGISTRY), dict(profiles._PROFILES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFM_HOME", str(tmp_path_factory.mktemp("medfm_home")))
        register_profile(
            Profile(
                name=PROFILE,
                version="1",
                spacing=(2.0, 2.0, 2.0),
                size=(16, 16, 16),
                seed_rounding="round",
                border="centred",
                hu_window=(-1024.0, 1500.0),
            )
        )
        yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(models)
    profiles._PROFILES.clear()
    profiles._PROFILES.update(known)


@pytest.fixture
def seeds(small_ct, tmp_path) -> str:
    """A manifest of three seeds (LPS mm) in the small CT."""
    world = small_ct.geometry.index_to_world(np.asarray(SEEDS_INDEX, dtype=float))
    table = pd.DataFrame(world, columns=["coordX", "coordY", "coordZ"])
    table.insert(0, "image_path", small_ct.path.name)
    path = small_ct.path.parent / "seeds.csv"
    table.to_csv(path, index=False)
    return str(path)


def resnet10(seed: int = 0):
    return load_analysis_model("resnet10-3d", "random", profile=PROFILE, seed=seed)


def test_inputs_are_the_profiles_patches(seeds):
    model = resnet10()
    inputs = read_inputs(open_manifest(seeds, 3), model)
    assert inputs.rows == [0, 1, 2] and inputs.batch().shape == (3, 1, 16, 16, 16)


def test_invariance_in_3d_identity_is_one_and_flips_cover_three_axes(seeds, tmp_path):
    result = run_invariance(
        [resnet10()],
        seeds,
        tmp_path,
        transforms=["identity", "flip", "rotation"],
        strengths={"rotation": [120]},
        n_bootstrap=50,
        progress=False,
    )
    s = result.summary.set_index(["level", "measure"])["mean"]
    assert s[("identity", "mahalanobis")] == pytest.approx(1.0, abs=1e-6)
    assert s[("identity", "cosine")] == pytest.approx(1.0, abs=1e-6)
    assert {"flip X (left-right)", "flip Y (up-down)", "flip Z (cranio-caudal)"} <= set(result.summary["level"])
    assert (result.summary["mean"] <= 1 + 1e-9).all() and (tmp_path / "invariance.png").is_file()


def test_occlusion_overlays_in_3d_show_three_slices(seeds, tmp_path):
    result = run_saliency([resnet10()], seeds, tmp_path, window=8, n_bootstrap=50, progress=False)
    assert list(result.table["method"]) == ["occlusion"] * 3
    assert all(len(p.split()) == 3 for p in result.table["peak"])
    assert len(list((tmp_path / "overlays").glob("*.png"))) == 3
    assert result.table["attentive_diffusion"].between(0, 1).all()


def test_gradcam_and_integrated_gradients_of_a_3d_card(seeds, tmp_path):
    torch.manual_seed(0)
    network = torch.nn.Sequential()
    network.add_module("trunk", build_trunk("resnet3d", 1, depth=10)[0])
    network.add_module("head", mlp_head(512, [3]))
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "model.safetensors"))
    card = {
        "kind": "medfm-finetuned",
        "task": "multiclass",
        "classes": ["a", "b", "c"],
        "trunk": {"name": "resnet3d", "args": {"depth": 10}, "in_channels": 1},
        "feature_dim": 512,
        "head": [3],
        "profile": PROFILE,
        "profile_spec": profiles.get_profile(PROFILE).to_dict(),
        "margin": 2,
        "eval_view": None,
        "view_size": [16, 16, 16],
        "weights": "model.safetensors",
        "sha256": hub.sha256_of(tmp_path / "model.safetensors"),
    }
    (tmp_path / "model.json").write_text(json.dumps(card))
    model = load_card_model(tmp_path / "model.json")
    assert model.profile.size == (20, 20, 20)  # cut with the card's margin, then centre-cropped by its view
    result = run_saliency(
        [model], seeds, tmp_path / "out", window=8, target="b", steps=8, limit=1, n_bootstrap=20, progress=False
    )
    assert set(result.table["method"]) == {"occlusion", "gradcam", "integrated_gradients"}
    assert (tmp_path / "out" / "overlays").is_dir()
    rc = analyze_main(
        ["saliency", str(tmp_path / "model.json"), seeds, "--out", str(tmp_path / "bad"), "--target", "z"]
    )
    assert rc == 2


def test_perceptual_pairs_of_volumes(small_ct, tmp_path):
    same = [small_ct.path.name] * 3
    world = small_ct.geometry.index_to_world(np.asarray(SEEDS_INDEX, dtype=float))
    pairs = pd.DataFrame({"a": same, "b": same})
    for axis, name in enumerate(("coordX", "coordY", "coordZ")):
        pairs[f"{name}_a"] = world[0, axis]
        pairs[f"{name}_b"] = world[:, axis]
    path = small_ct.path.parent / "pairs3d.csv"
    pairs.to_csv(path, index=False)
    result = run_perceptual([resnet10()], str(path), tmp_path, n_bootstrap=20)
    distances = result.table["distance"].to_numpy()
    assert distances[0] == pytest.approx(0.0, abs=1e-12) and (distances[1:] > 0).all()
    pd.DataFrame({"a": same[:1], "b": same[:1]}).to_csv(path, index=False)  # no seeds: the volume centre
    assert run_perceptual([resnet10()], str(path)).table["distance"].iloc[0] == pytest.approx(0.0, abs=1e-12)


def test_reconstruct_in_3d_writes_slices_and_lowers_the_loss(seeds, tmp_path):
    losses = run_reconstruct(
        [resnet10()], seeds, tmp_path, layer="layer2", iterations=12, save_at=(4, 12), limit=1, progress=False
    )
    assert losses["layer"].iloc[0] == "layer2" and losses["loss"].iloc[-1] < losses["loss"].iloc[0]
    assert (tmp_path / "resnet10-3d_random_row00000.png").is_file()
    assert "relative feature loss" in (tmp_path / "summary.md").read_text()
