"""The model zoo: entries, the published FMCIB architecture, seeded random init, weight provenance."""

from __future__ import annotations

import hashlib

import pytest
import torch
from monai.networks.nets.resnet import ResNet

from medfm.errors import ModelError, WeightsError
from medfm.models import create, get_entry, list_models, load_model, register
from medfm.models.transfer import TransferReport


@pytest.fixture(scope="module")
def fmcib() -> torch.nn.Module:
    return create("fmcib-resnet50")


def test_list_models():
    names = list_models()
    assert "fmcib-resnet50" in names and "resnet10-3d" in names
    assert names == sorted(names)


def test_fmcib_entry():
    entry = get_entry("fmcib-resnet50")
    assert entry.feature_dim == 4096
    assert entry.profile == "fmcib"
    assert entry.weights is not None
    assert entry.weights.filename == "model_weights.torch"
    assert entry.weights.url.startswith("https://zenodo.org/")
    assert "model_weights.torch" in entry.weights.url


def test_resnet10_entry():
    entry = get_entry("resnet10-3d")
    assert entry.feature_dim == 512
    assert entry.profile == "fmcib"
    assert entry.weights is None


def test_fmcib_architecture(fmcib):
    assert isinstance(fmcib, ResNet)
    assert isinstance(fmcib.conv1, torch.nn.Conv3d)
    assert tuple(fmcib.conv1.weight.shape) == (128, 1, 7, 7, 7)
    assert fmcib.conv1.stride == (2, 2, 2)
    assert fmcib.conv1.bias is None
    downsample = fmcib.layer1[0].downsample[0]
    assert isinstance(downsample, torch.nn.Conv3d)
    assert downsample.bias is not None
    assert tuple(downsample.weight.shape) == (512, 128, 1, 1, 1)
    assert fmcib.fc is None  # a trunk: pooled features, no classifier
    assert sum(p.numel() for p in fmcib.parameters()) == 184_477_824


def test_fmcib_forward_shape(fmcib):
    with torch.inference_mode():
        out = fmcib.eval()(torch.zeros(1, 1, 50, 50, 50))
    assert out.shape == (1, 4096)
    assert torch.isfinite(out).all()


def test_resnet10_forward_matches_feature_dim():
    model = create("resnet10-3d")
    with torch.inference_mode():
        out = model(torch.zeros(2, 1, 50, 50, 50))
    assert out.shape == (2, get_entry("resnet10-3d").feature_dim)


def test_create_returns_eval_mode():
    assert create("resnet10-3d").training is False


def test_random_init_is_seeded():
    a = load_model("resnet10-3d", weights=None, seed=3)
    b = load_model("resnet10-3d", weights=None, seed=3)
    c = load_model("resnet10-3d", weights=None, seed=4)
    assert a.seed == 3 and a.weights_path is None and a.weights_sha256 is None and a.report is None
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert set(sa) == set(sb) == set(sc)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    assert not torch.equal(sa["conv1.weight"], sc["conv1.weight"])
    assert not torch.equal(sa["layer4.0.conv1.weight"], sc["layer4.0.conv1.weight"])


def test_create_leaves_the_callers_generator_alone():
    """The issue-15 bug: create() seeded the global generator, so every head after it was the same."""
    heads, trunks = [], []
    for user_seed in (1, 2, 1):
        torch.manual_seed(user_seed)
        before = torch.get_rng_state()
        net = create("resnet10-3d", seed=5)
        assert torch.equal(torch.get_rng_state(), before)  # create() drew nothing from the caller's generator
        heads.append(torch.nn.Linear(512, 2).weight.detach().clone())
        trunks.append(net.conv1.weight.detach().clone())
    assert not torch.equal(heads[0], heads[1])  # two user seeds, two heads
    assert torch.equal(heads[0], heads[2])  # the user's seed alone decides the head
    assert torch.equal(trunks[0], trunks[1]) and torch.equal(trunks[1], trunks[2])  # the trunk seed decides the trunk
    assert not torch.equal(trunks[0], create("resnet10-3d", seed=6).conv1.weight)


def test_seeded_restores_the_cpu_generator_and_repeats():
    from medfm.seeding import seeded

    torch.manual_seed(0)
    before = torch.get_rng_state()
    with seeded(7):
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)
    with seeded(7):
        assert torch.equal(torch.rand(3), a)
    torch.manual_seed(0)
    assert not torch.equal(torch.rand(3), a)


def test_published_weights_missing_from_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as info:
        create("fmcib-resnet50", weights="published")
    message = str(info.value)
    assert str(tmp_path / "weights" / "model_weights.torch") in message
    assert "medfm weights download fmcib-resnet50" in message


def test_published_weights_of_model_without_any():
    with pytest.raises(ModelError, match="no published weights"):
        load_model("resnet10-3d", weights="published")


def test_unknown_model_lists_known_names():
    with pytest.raises(ModelError) as info:
        create("resnet-9000")
    message = str(info.value)
    assert "'resnet-9000'" in message
    assert "fmcib-resnet50" in message and "resnet10-3d" in message


def test_register_refuses_duplicate_name():
    before = list_models()
    with pytest.raises(ModelError, match="already registered"):
        register("resnet10-3d", feature_dim=1, profile="fmcib")(lambda: torch.nn.Identity())
    assert list_models() == before


def test_load_from_checkpoint_path_records_sha256(tmp_path):
    source = load_model("resnet10-3d", None, seed=21).model
    path = tmp_path / "trunk.pt"
    torch.save({"trunk_state_dict": source.state_dict()}, path)
    loaded = load_model("resnet10-3d", path, seed=0)
    assert loaded.weights_path == path
    assert loaded.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert isinstance(loaded.report, TransferReport) and loaded.report.coverage == 1.0
    assert loaded.entry.name == "resnet10-3d"
    assert loaded.model.training is False
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_one_channel_model_from_three_channel_weights(tmp_path):
    """in_channels=1 sums the first conv's RGB weights: on grey images it equals the RGB network on grey × 3."""
    import torchvision

    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "r18.pth")
    loaded = load_model("resnet18", tmp_path / "r18.pth", in_channels=1)
    assert loaded.model.conv1.weight.shape == (64, 1, 7, 7)
    assert loaded.report.coverage == 1.0 and len(loaded.report.adapted) == 1
    source.fc = torch.nn.Identity()
    source.eval()
    grey = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(grey), source(grey.repeat(1, 3, 1, 1)), atol=1e-5, rtol=1e-5)
    assert create("resnet10-3d", in_channels=2).conv1.in_channels == 2
