"""medfm analyze (2D): transforms, similarity, invariance, saliency, perceptual distance, reconstruction, CLI."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from medfm.analyze.cli import main as analyze_main
from medfm.analyze.invariance import run_invariance, run_pair_invariance
from medfm.analyze.models import AnalysisModel, load_analysis_model, load_card_model, main_stages
from medfm.analyze.perceptual import perceptual_distance, run_perceptual
from medfm.analyze.reconstruct import reconstruct, run_reconstruct
from medfm.analyze.saliency import (
    attentive_diffusion,
    default_window,
    gradcam_map,
    integrated_gradients_map,
    occlusion_map,
    run_saliency,
)
from medfm.analyze.similarity import cosine_rows, fit_whitener, mean_interval, similarities
from medfm.analyze.transforms import Level, apply_transform, sweep
from medfm.data import profiles
from medfm.data.profiles import Profile2D, get_profile, register_profile
from medfm.errors import ModelError, RowError
from medfm.finetune.module import mlp_head
from medfm.models import hub, registry

SIDE = 32
SQUARE = (slice(8, 16), slice(20, 28))  # rows, columns of the square that decides the label
PROFILE = "test-gray-32"
TINY = "test-tiny-2d"


@pytest.fixture(scope="module", autouse=True)
def isolated_registry(tmp_path_factory):
    """A private $MEDFM_HOME; the models and profiles registered here are forgotten afterwards."""
    models, known = dict(registry._REGISTRY), dict(profiles._PROFILES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFM_HOME", str(tmp_path_factory.mktemp("medfm_home")))
        register_profile(Profile2D(name=PROFILE, version="1", size=(SIDE, SIDE), channels=1, mean=(0.0,), std=(1.0,)))
        registry.register(TINY, feature_dim=16, profile=PROFILE, dims=2)(tiny_trunk)
        yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(models)
    profiles._PROFILES.clear()
    profiles._PROFILES.update(known)


def tiny_trunk(in_channels: int = 1) -> nn.Module:
    """Two pixel-wise (1×1) convolutions with ReLU, global average pooling: 16 features, no receptive field to
    blur where the evidence lies."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


def square_image(bright: bool, rng: np.random.Generator) -> np.ndarray:
    """A grey 32² image: faint noise around 0.5, and the square bright (0.9) or dark (0.1)."""
    image = np.clip(0.5 + 0.03 * rng.standard_normal((SIDE, SIDE)), 0, 1)
    image[SQUARE] = 0.9 if bright else 0.1
    return image


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> pd.DataFrame:
    """Eight square PNGs (labels alternate) and their manifest."""
    folder = tmp_path_factory.mktemp("squares")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        path = folder / f"img{i}.png"
        Image.fromarray((square_image(i % 2 == 1, rng) * 255).round().astype(np.uint8)).save(path)
        rows.append({"image_path": path.name, "label": i % 2})
    table = pd.DataFrame(rows)
    table.to_csv(folder / "manifest.csv", index=False)
    return table.assign(manifest=str(folder / "manifest.csv"), folder=str(folder))


@pytest.fixture(scope="module")
def manifest(images) -> str:
    return images["manifest"].iloc[0]


def tiny_model(seed: int = 0) -> AnalysisModel:
    return load_analysis_model(TINY, "random", seed=seed)


class FlipAveraged(nn.Module):
    """Features averaged over the left-right flip: invariant to it by construction."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.base(x) + self.base(torch.flip(x, dims=[-1]))) / 2


class SquareMean(nn.Module):
    """Features: the mean of the square region, and a constant (so the feature norm is never 0)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inside = x[:, :, SQUARE[0], SQUARE[1]].mean(dim=(1, 2, 3))
        return torch.stack([inside, torch.ones_like(inside)], dim=1)


# transforms


def test_transforms_known_answers():
    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 2, 3] = 1.0
    assert torch.equal(apply_transform(x, Level("identity", 0)), x)
    assert torch.equal(apply_transform(x, Level("flip", 1)), torch.flip(x, dims=[3]))
    assert torch.equal(apply_transform(x, Level("flip", 2)), torch.flip(x, dims=[2]))
    moved = apply_transform(x, Level("translation", 0.25))  # 2 pixels along x and y
    assert torch.allclose(moved, torch.roll(x, shifts=(2, 2), dims=(2, 3)), atol=1e-6)
    assert torch.allclose(apply_transform(x, Level("scale", 1.0)), x, atol=1e-6)
    assert torch.allclose(apply_transform(x, Level("crop", 1.0)), x, atol=1e-6)
    quarter = apply_transform(x, Level("rotation", 90))
    assert any(torch.allclose(quarter, torch.rot90(x, k, dims=(2, 3)), atol=1e-5) for k in (1, -1))
    # crop 0.5: the top-left 4×4 stretched over 8×8; output pixel j reads input position 0.5 j − 0.25 (linear)
    crop = apply_transform(torch.arange(64.0).view(1, 1, 8, 8), Level("crop", 0.5))
    j = torch.arange(1, 8, dtype=torch.float32) * 0.5 - 0.25
    assert torch.allclose(crop[0, 0, 1:, 1:], 8 * j[:, None] + j[None, :], atol=1e-4)
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(apply_transform(flat, Level("blur", 2.0)), flat, atol=1e-6)
    ramp = torch.linspace(0, 1, 64).view(1, 1, 8, 8)
    assert torch.allclose(apply_transform(ramp, Level("gamma", 1.0)), ramp, atol=1e-6)
    assert torch.allclose(apply_transform(ramp, Level("gamma", 2.0)), ramp**2, atol=1e-6)
    assert torch.allclose(apply_transform(ramp, Level("intensity", 0.2)), ramp + 0.2, atol=1e-6)
    noisy = apply_transform(ramp, Level("noise", 0.1), seed=3)
    assert torch.equal(noisy, apply_transform(ramp, Level("noise", 0.1), seed=3))
    assert 0.07 < float((noisy - ramp).std()) < 0.13


def test_rotation_by_120_degrees_about_the_diagonal_permutes_the_axes():
    x = torch.rand(1, 1, 6, 6, 6, generator=torch.Generator().manual_seed(0))
    turned = apply_transform(x, Level("rotation", 120))
    assert any(torch.allclose(turned, x.permute(*p), atol=1e-5) for p in ((0, 1, 3, 4, 2), (0, 1, 4, 2, 3)))
    assert torch.equal(apply_transform(x, Level("flip", 3)), torch.flip(x, dims=[2]))


def test_sweep_defaults_and_bad_strengths():
    levels = sweep(3, ["flip", "rotation"])
    assert [lv.strength for lv in levels if lv.transform == "flip"] == [1.0, 2.0, 3.0]
    assert sweep(2, ["blur"], {"blur": [1.5]}) == [Level("blur", 1.5)]
    with pytest.raises(ValueError, match="flip strength 3"):
        sweep(2, ["flip"], {"flip": [3]})
    with pytest.raises(ValueError, match="unknown transform"):
        sweep(2, ["warp"])


# similarity


def test_whitening_gives_identity_covariance_and_works_for_n_below_d():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    white = fit_whitener(x, shrinkage=0.0)(x)
    assert np.allclose(np.cov(white.T, bias=True), np.eye(5), atol=1e-8)
    wide = rng.standard_normal((6, 50))
    whitener = fit_whitener(wide)
    assert 0 < whitener.shrinkage <= 1
    sims = similarities(wide, wide, whitener)
    assert np.allclose(sims["mahalanobis"], 1.0) and np.allclose(sims["cosine"], 1.0)
    assert np.allclose(cosine_rows(np.array([[1.0, 0.0]]), np.array([[0.0, 2.0]])), 0.0)
    ci = mean_interval(np.array([0.5, 0.7, 0.9]), n_resamples=200)  # 3 images: a mean, no interval
    assert ci.value == pytest.approx(0.7) and np.isnan(ci.low) and ci.n == 3 and ci.no_ci.startswith("n = 3")
    ci = mean_interval(np.linspace(0.5, 0.9, 12), n_resamples=200)
    assert ci.value == pytest.approx(0.7) and ci.low <= 0.7 <= ci.high and ci.n == 12


# invariance


def test_identity_scores_one_and_a_flip_invariant_model_scores_one_on_flips(manifest, tmp_path):
    grid = nn.Sequential(nn.AvgPool2d(4), nn.Flatten())  # an 8×8 grid of means: where things are, kept
    base = AnalysisModel("grid", grid, get_profile(PROFILE))
    invariant = AnalysisModel("flip-averaged", FlipAveraged(grid), base.profile)
    result = run_invariance(
        [base, invariant], manifest, tmp_path, transforms=["identity", "flip"], n_bootstrap=100, progress=False
    )
    s = result.summary.set_index(["model", "level", "measure"])["mean"]
    for model in (base.name, "flip-averaged"):
        for measure in ("mahalanobis", "cosine"):
            assert s[(model, "identity", measure)] == pytest.approx(1.0, abs=1e-6)
    for measure in ("mahalanobis", "cosine"):
        assert s[("flip-averaged", "flip X (left-right)", measure)] == pytest.approx(1.0, abs=1e-6)
        assert s[(base.name, "flip X (left-right)", measure)] < 0.999
        assert s[("flip-averaged", "flip Y (up-down)", measure)] < 0.999
    assert s[(base.name, "flip X (left-right)", "mahalanobis")] < 0.9  # the square moves: a large change
    per_image = pd.read_csv(tmp_path / "invariance_per_image.csv")
    assert len(per_image) == 2 * 3 * 8 and set(per_image["row"]) == set(range(8))
    for name in ("invariance.csv", "invariance.png", "summary.md", "analysis.json"):
        assert (tmp_path / name).is_file()
    assert "flip-averaged · whitened" in (tmp_path / "summary.md").read_text()


def test_pairs_of_identical_images_score_one(images, tmp_path):
    folder = images["folder"].iloc[0]
    pairs = pd.DataFrame({"a": images["image_path"], "b": images["image_path"].iloc[::-1].to_numpy()})
    pairs.loc[0, "b"] = pairs.loc[0, "a"]
    pairs.to_csv(f"{folder}/pairs.csv", index=False)
    result = run_pair_invariance([tiny_model()], f"{folder}/pairs.csv", tmp_path, n_bootstrap=50)
    per_pair = pd.read_csv(tmp_path / "pairs_per_pair.csv")
    assert per_pair.loc[0, "cosine"] == pytest.approx(1.0) and per_pair.loc[0, "mahalanobis"] == pytest.approx(1.0)
    assert (per_pair["cosine"].iloc[1:] < 1).all()
    assert set(result.summary["measure"]) == {"mahalanobis", "cosine"}


# saliency


def test_attentive_diffusion_and_default_window():
    assert attentive_diffusion(np.array([[0.0, 0.0], [0.0, 4.0]])) == 0.25
    assert attentive_diffusion(np.array([1.0, 1.0, 3.0, 3.0])) == 0.5
    assert np.isnan(attentive_diffusion(np.zeros((4, 4))))  # a map with no evidence attends nowhere
    assert [default_window(s) for s in (224, 50, 28, 32)] == [32, 10, 4, 4]


def test_occlusion_peaks_on_the_square_that_decides_the_feature():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(square_image(True, rng)).float()[None, None]
    model = AnalysisModel("square-mean", SquareMean(), get_profile(PROFILE))
    saliency = occlusion_map(model, x, window=4, stride=4)
    assert saliency.shape == (SIDE, SIDE)
    row, col = np.unravel_index(np.argmax(saliency), saliency.shape)
    assert SQUARE[0].start <= row < SQUARE[0].stop and SQUARE[1].start <= col < SQUARE[1].stop
    outside = np.ones_like(saliency, dtype=bool)
    outside[SQUARE] = False
    assert np.allclose(saliency[outside], 0.0)  # windows that miss the square change nothing
    assert saliency[SQUARE].min() > 0 and attentive_diffusion(saliency) == pytest.approx(64 / SIDE**2)


def _build_card(folder) -> str:
    """A fine-tuning model card built by hand: the tiny trunk's only live channel is ReLU(intensity − 0.7), so only
    a bright square drives the head's logit (weight 10); written as ``medfm finetune fit`` writes its cards."""
    network = nn.Sequential()
    network.add_module("trunk", tiny_trunk())
    network.add_module("head", mlp_head(16, [1]))
    with torch.no_grad():
        for module in (*network.trunk[0:3:2], network.head[0]):
            module.weight.zero_()
            module.bias.zero_()
        network.trunk[0].weight[0, 0] = 1.0
        network.trunk[0].bias[0] = -0.7
        network.trunk[2].weight[0, 0] = 1.0
        network.head[0].weight[0, 0] = 10.0
        network.head[0].bias[0] = -0.5
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / "model.safetensors"))
    card = {
        "kind": "medfm-finetuned",
        "task": "binary",
        "classes": ["0", "1"],
        "trunk": {"name": TINY, "args": {}, "in_channels": 1},
        "feature_dim": 16,
        "head": [1],
        "profile": PROFILE,
        "profile_spec": get_profile(PROFILE).to_dict(),
        "margin": 0,
        "eval_view": None,
        "view_size": [SIDE, SIDE],
        "weights": "model.safetensors",
        "sha256": hub.sha256_of(folder / "model.safetensors"),
    }
    (folder / "model.json").write_text(json.dumps(card))
    return str(folder / "model.json")


def test_gradcam_and_integrated_gradients_of_a_fine_tuned_card_point_at_the_square(manifest, tmp_path):
    card = _build_card(tmp_path)
    model = load_card_model(card)
    assert model.head is not None and model.name.endswith("(fine-tuned)")
    result = run_saliency([model], manifest, tmp_path / "out", window=4, n_bootstrap=50, progress=False)
    table = result.table
    assert set(table["method"]) == {"occlusion", "gradcam", "integrated_gradients"}
    bright = table[table["row"] % 2 == 1]  # images whose square is bright (label 1)
    for method in ("gradcam", "integrated_gradients", "occlusion"):
        for peak in bright[bright["method"] == method]["peak"]:
            row, col = (int(v) for v in peak.split())
            assert SQUARE[0].start <= row < SQUARE[0].stop and SQUARE[1].start <= col < SQUARE[1].stop, method
    # the head sees only the square: Grad-CAM and IG are exactly zero outside it, positive inside
    x = torch.from_numpy(square_image(True, np.random.default_rng(9))).float()[None, None]
    outside = np.ones((SIDE, SIDE), dtype=bool)
    outside[SQUARE] = False
    for saliency in (gradcam_map(model, x, 0), integrated_gradients_map(model, x, 0, steps=16)):
        assert np.allclose(saliency[outside], 0.0) and saliency[SQUARE].min() > 0
        assert attentive_diffusion(saliency) == pytest.approx(64 / SIDE**2)
    assert bright["attentive_diffusion"].between(0, 1).all()
    dark_gradcam = table[(table["row"] % 2 == 0) & (table["method"] == "gradcam")]["attentive_diffusion"]
    assert dark_gradcam.isna().all()  # no positive evidence anywhere: a constant map, which attends nowhere
    assert len(list((tmp_path / "out" / "overlays").glob("*.png"))) == 8
    assert set(result.summary["method"]) == {"occlusion", "gradcam", "integrated_gradients"}


# perceptual distance


def test_perceptual_distance_is_zero_to_itself_and_grows_with_noise(images):
    model = load_analysis_model("resnet18", "random", profile=PROFILE, in_channels=1)
    assert main_stages(model.trunk, torch.zeros(1, 1, SIDE, SIDE)) == ["layer1", "layer2", "layer3", "layer4"]
    rng = np.random.default_rng(2)
    x = torch.from_numpy(square_image(True, rng)).float()[None, None]
    assert perceptual_distance(model, x, x)[0] == 0.0
    noisy = torch.cat([apply_transform(x, Level("noise", s), seed=0) for s in (0.01, 0.03, 0.1, 0.3)])
    distances = perceptual_distance(model, x.expand_as(noisy), noisy)
    assert np.all(np.diff(distances) > 0) and distances[0] > 0


def test_perceptual_pairs_rank_correlate_with_a_reference(images, tmp_path):
    folder = images["folder"].iloc[0]
    rng = np.random.default_rng(3)
    base = square_image(True, rng)
    rows = []
    for k, level in enumerate((0.0, 0.02, 0.05, 0.1, 0.2, 0.4)):
        noisy = np.clip(base + level * np.random.default_rng(k).standard_normal(base.shape), 0, 1)
        Image.fromarray((noisy * 255).round().astype(np.uint8)).save(f"{folder}/noisy{k}.png")
        rows.append({"a": "img1.png", "b": f"noisy{k}.png", "noise": level})
    Image.fromarray((base * 255).round().astype(np.uint8)).save(f"{folder}/img1.png")
    pd.DataFrame(rows).to_csv(f"{folder}/noise_pairs.csv", index=False)
    model = load_analysis_model("resnet18", "random", profile=PROFILE, in_channels=1)
    result = run_perceptual([model], f"{folder}/noise_pairs.csv", tmp_path, reference="noise", n_bootstrap=100)
    assert result.table["distance"].iloc[0] == pytest.approx(0.0, abs=1e-9)
    assert result.correlations["spearman"].iloc[0] == pytest.approx(1.0)
    assert (tmp_path / "perceptual_spearman.csv").is_file() and (tmp_path / "summary.md").is_file()


# reconstruction


def test_reconstruct_lowers_the_feature_loss_and_writes_the_files(manifest, tmp_path):
    model = tiny_model()
    target = torch.from_numpy(square_image(True, np.random.default_rng(4))).float()[None, None]
    torch.manual_seed(11)
    before = torch.get_rng_state()
    result = reconstruct(model, target, None, 30, save_at=(10, 20))
    assert torch.equal(torch.get_rng_state(), before)  # seeded in a fork: the caller's generator is left alone
    again = reconstruct(model, target, None, 30, save_at=(10, 20))
    np.testing.assert_array_equal(again.losses, result.losses)  # and the seed alone decides the run
    assert result.layer == "3" and len(result.losses) == 30
    assert result.losses[-1] < 0.1 * result.losses[0] and result.losses[19] < result.losses[9] < result.losses[0]
    assert sorted(result.images) == [10, 20, 30] and result.images[30].shape == (1, SIDE, SIDE)
    losses = run_reconstruct([model], manifest, tmp_path, iterations=20, save_at=(5, 20), limit=1, progress=False)
    assert len(losses) == 20 and losses["loss"].iloc[-1] < losses["loss"].iloc[0]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"reconstruct_loss.csv", "reconstruct_loss.png", "summary.md", "test-tiny-2d_random_row00000.png"} <= names


# command line and bad input


def test_cli_runs_each_analysis_and_reports_bad_input(images, manifest, tmp_path, capsys):
    common = ["--weights", "random", "--profile", PROFILE, "--in-channels", "1", "--quiet"]
    rc = analyze_main(
        ["invariance", "resnet18,test-tiny-2d", manifest, "--out", str(tmp_path / "inv"), "--transforms", "identity"]
        + ["blur", "--strength", "blur=1,2", "--limit", "4", "--bootstrap", "50"]
        + common
    )
    assert rc == 0
    summary = pd.read_csv(tmp_path / "inv" / "invariance.csv")
    assert set(summary["model"]) == {"resnet18 (random)", "test-tiny-2d (random)"}
    assert sorted(summary["strength"].unique()) == [0.0, 1.0, 2.0] and set(summary["n"]) == {4}
    folder = images["folder"].iloc[0]
    a, b = f"{folder}/img0.png", f"{folder}/img1.png"
    assert analyze_main(["perceptual", "resnet18", a, a] + common) == 0
    assert "perceptual distance 0.00000" in capsys.readouterr().out
    rc = analyze_main(
        ["saliency", TINY, manifest, "--out", str(tmp_path / "sal"), "--limit", "1", "--patch", "8"] + common
    )
    assert rc == 0 and len(pd.read_csv(tmp_path / "sal" / "saliency.csv")) == 1
    rc = analyze_main(["reconstruct", TINY, manifest, "--out", str(tmp_path / "rec"), "--iterations", "5"] + common)
    assert rc == 0 and (tmp_path / "rec" / "reconstruct_loss.csv").is_file()
    capsys.readouterr()
    assert analyze_main(["perceptual", "resnet18", a, b]) == 2
    assert "--weights random" in capsys.readouterr().err
    assert analyze_main(["invariance", TINY, manifest, "--out", str(tmp_path / "x"), "--strength", "blur=a"]) == 2
    assert "NAME=V1,V2" in capsys.readouterr().err


def test_a_missing_image_names_the_row_and_file_or_is_skipped(images, tmp_path):
    folder = images["folder"].iloc[0]
    table = pd.DataFrame({"image_path": ["img0.png", "gone.png", "img2.png"]})
    table.to_csv(f"{folder}/bad.csv", index=False)
    with pytest.raises(RowError, match=r"row 1 \(image_path=.*gone.png\): file not found"):
        run_invariance([tiny_model()], f"{folder}/bad.csv", tmp_path / "raise", ["identity"], progress=False)
    result = run_invariance(
        [tiny_model()], f"{folder}/bad.csv", tmp_path / "skip", ["identity"], on_error="skip", progress=False
    )
    assert sorted(result.per_image["row"]) == [0, 2]
    errors = pd.read_csv(tmp_path / "skip" / "invariance.errors.csv")
    assert errors["row"].tolist() == [1] and errors["reason"].iloc[0] == "file not found"


def test_models_must_share_dims_and_weights_must_match_the_models():
    from medfm.analyze.models import load_models

    with pytest.raises(ModelError, match="mix 2D and 3D"):
        load_models([TINY, "resnet10-3d"], ["random"])
    with pytest.raises(ModelError, match="2 --weights values for 3 models"):
        load_models([TINY, TINY, TINY], ["random", "random"])
    models = load_models([f"{TINY},{TINY}"], ["random"])
    assert [m.name for m in models] == [f"{TINY} (random)", f"{TINY} (random) #2"]


@pytest.mark.parametrize("analysis", ["saliency", "reconstruct"])
def test_an_interrupted_analysis_resumes_with_the_images_it_finished(analysis, manifest, tmp_path, monkeypatch):
    import medfm.analyze.reconstruct as reconstruct_module
    import medfm.analyze.saliency as saliency_module

    module, name = (saliency_module, "saliency_maps") if analysis == "saliency" else (reconstruct_module, "reconstruct")
    original, calls = getattr(module, name), []

    def counted(*args, **kwargs):
        if stop_after is not None and len(calls) == stop_after:
            raise KeyboardInterrupt
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    extra = ["--patch", "8"] if analysis == "saliency" else ["--iterations", "5"]
    command = lambda out: [analysis, TINY, manifest, "--out", str(out), "--limit", "4", "--weights", "random",  # noqa: E731
                           "--profile", PROFILE, "--in-channels", "1", "--quiet", *extra]  # fmt: skip
    table = "saliency.csv" if analysis == "saliency" else "reconstruct_loss.csv"
    stop_after = None
    assert analyze_main(command(tmp_path / "whole")) == 0 and len(calls) == 4
    calls.clear()
    stop_after = 2
    assert analyze_main(command(tmp_path / "again")) == 130
    assert len(list((tmp_path / "again" / f"{analysis}.partial").glob("*_row*.json"))) == 2
    calls.clear()
    stop_after = None
    assert analyze_main([*command(tmp_path / "again"), "--resume"]) == 0
    assert len(calls) == 2 and not (tmp_path / "again" / f"{analysis}.partial").exists()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "again" / table), pd.read_csv(tmp_path / "whole" / table))
    assert analyze_main([*command(tmp_path / "again"), "--resume", "--seed", "3"]) == 0  # no partial left: a fresh run
