"""2D trunks in the zoo: torchvision classifiers without their heads, keys that torchvision checkpoints fill."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from medfm.data.profiles import Profile2D, get_profile
from medfm.errors import ModelError
from medfm.models import create, get_entry, list_models, load_model, register
from medfm.models.backbones2d import supported_archs, torchvision_trunk

# name -> (torchvision arch, feature dim, profile, head key prefixes absent from the trunk)
ENTRIES_2D = {
    "densenet121": ("densenet121", 1024, "imagenet-224", ("classifier.",)),
    "efficientnet-b3": ("efficientnet_b3", 1536, "imagenet-300", ("classifier.",)),
    "efficientnet-b4": ("efficientnet_b4", 1792, "imagenet-380", ("classifier.",)),
    "inception-v3": ("inception_v3", 2048, "imagenet-299", ("fc.", "AuxLogits.")),
    "mobilenet-v3-small": ("mobilenet_v3_small", 576, "imagenet-224", ("classifier.",)),
    "mobilenet-v3-large": ("mobilenet_v3_large", 960, "imagenet-224", ("classifier.",)),
    "resnet18": ("resnet18", 512, "imagenet-224", ("fc.",)),
    "resnet34": ("resnet34", 512, "imagenet-224", ("fc.",)),
    "resnet50": ("resnet50", 2048, "imagenet-224", ("fc.",)),
    "vgg16": ("vgg16", 512, "imagenet-224", ("classifier.",)),
}
FIRST_CONV = {
    "densenet121": "features.conv0",
    "efficientnet_b3": "features.0.0",
    "efficientnet_b4": "features.0.0",
    "inception_v3": "Conv2d_1a_3x3.conv",
    "mobilenet_v3_small": "features.0.0",
    "mobilenet_v3_large": "features.0.0",
    "resnet18": "conv1",
    "resnet34": "conv1",
    "resnet50": "conv1",
    "vgg16": "features.0",
}
NAMES = sorted(ENTRIES_2D)

_MODELS: dict[str, nn.Module] = {}


def trunk(name: str) -> nn.Module:
    """One built trunk per entry for the whole file (building is most of the cost)."""
    if name not in _MODELS:
        _MODELS[name] = create(name)
    return _MODELS[name]


def side(arch: str) -> int:
    """A small input side the network accepts: InceptionV3 needs at least 75 pixels."""
    return 75 if arch == "inception_v3" else 64


def plain_torchvision(arch: str) -> nn.Module:
    """The unmodified torchvision network (as its checkpoints are saved), on the meta device: keys and shapes."""
    with torch.device("meta"):
        return torchvision.models.get_model(arch, weights=None)


def test_list_models_includes_2d_entries():
    names = list_models()
    assert set(ENTRIES_2D) <= set(names)
    assert "fmcib-resnet50" in names and "resnet10-3d" in names


@pytest.mark.parametrize("name", NAMES)
def test_entry_is_2d_with_its_profile(name):
    _, dim, profile, _ = ENTRIES_2D[name]
    entry = get_entry(name)
    assert entry.dims == 2
    assert entry.feature_dim == dim
    assert entry.profile == profile
    assert isinstance(get_profile(entry.profile), Profile2D)
    # torchvision's ImageNet weights, verified by the SHA-256 prefix in their file names
    assert entry.weights.url == f"https://download.pytorch.org/models/{entry.weights.filename}"
    assert entry.weights.filename.endswith(f"-{entry.weights.sha256_prefix}.pth")
    assert entry.description


def test_3d_entries_keep_dims_3():
    for name in ("fmcib-resnet50", "resnet10-3d"):
        assert get_entry(name).dims == 3


@pytest.mark.parametrize("name", NAMES)
def test_forward_gives_pooled_features(name):
    arch, dim, _, _ = ENTRIES_2D[name]
    model = trunk(name)
    assert model.training is False
    s = side(arch)
    with torch.inference_mode():
        out = model(torch.zeros(2, 3, s, s))
    assert isinstance(out, torch.Tensor)
    assert out.shape == (2, dim)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_are_torchvision_keys_without_head(name):
    arch, _, _, heads = ENTRIES_2D[name]
    ours = {k: tuple(v.shape) for k, v in trunk(name).state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in plain_torchvision(arch).state_dict().items()}
    assert set(ours) <= set(theirs)
    for key, shape in ours.items():
        assert theirs[key] == shape, key
    left_over = set(theirs) - set(ours)
    assert left_over and all(k.startswith(heads) for k in left_over), sorted(left_over)[:5]
    assert not any(k.startswith(heads) for k in ours)


def test_torchvision_checkpoint_loads_with_full_coverage(tmp_path):
    torch.manual_seed(5)
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    loaded = load_model("resnet18", path)
    assert loaded.report.coverage == 1.0
    assert not loaded.report.left_at_init and not loaded.report.mismatched
    assert loaded.report.unused and all(k.startswith("fc.") for k in loaded.report.unused)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


@pytest.mark.parametrize("arch", sorted(FIRST_CONV))
def test_one_input_channel(arch):
    three = torchvision_trunk(arch).get_submodule(FIRST_CONV[arch])
    model = torchvision_trunk(arch, in_channels=1).eval()
    one = model.get_submodule(FIRST_CONV[arch])
    assert isinstance(one, nn.Conv2d)
    assert three.in_channels == 3 and one.in_channels == 1
    assert tuple(one.weight.shape) == (three.out_channels, 1, *three.kernel_size)
    for attribute in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
        assert getattr(one, attribute) == getattr(three, attribute), attribute
    assert (one.bias is None) == (three.bias is None)
    # the only first-layer parameter: no other convolution sees the input
    assert sum(isinstance(m, nn.Conv2d) and m.in_channels == 1 and m.groups == 1 for m in model.modules()) == 1


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "resnet18", "inception_v3"])
def test_one_channel_forward(arch):
    model = torchvision_trunk(arch, in_channels=1).eval()
    s = side(arch)
    with torch.inference_mode():
        out = model(torch.zeros(2, 1, s, s))
    assert out.shape[0] == 2 and out.ndim == 2


def test_vgg16_trunk_is_convolutional_features_only():
    model = trunk("vgg16")
    assert isinstance(model.classifier, nn.Identity)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d) and model.avgpool.output_size == 1
    assert sum(p.numel() for p in model.parameters()) == 14_714_688
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_vgg_bn_statistics_are_initialised():
    model = torchvision_trunk("vgg11_bn")
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    for norm in norms:
        assert torch.equal(norm.running_mean, torch.zeros_like(norm.running_mean))
        assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))
        assert torch.equal(norm.weight, torch.ones_like(norm.weight))


def test_inception_trunk_in_training_mode_returns_features():
    model = trunk("inception-v3")
    assert model.transform_input is False and model.aux_logits is False and model.AuxLogits is None
    model.train()
    try:
        out = model(torch.zeros(2, 3, 75, 75))
    finally:
        model.eval()
    assert isinstance(out, torch.Tensor) and out.shape == (2, 2048)


def test_hyphenated_and_unknown_arch_names():
    assert "resnet18" in supported_archs()
    assert isinstance(torchvision_trunk("mobilenet-v3-small").classifier, nn.Identity)
    with pytest.raises(ValueError, match="supported"):
        torchvision_trunk("alexnet")
    with pytest.raises(ValueError, match="in_channels"):
        torchvision_trunk("resnet18", in_channels=0)


def test_register_refuses_profile_of_the_wrong_dims():
    before = list_models()
    with pytest.raises(ModelError, match="Profile2D"):
        register("bad-2d", feature_dim=1, profile="fmcib", dims=2)(lambda: nn.Identity())
    with pytest.raises(ModelError, match="needs a Profile"):
        register("bad-3d", feature_dim=1, profile="imagenet-224")(lambda: nn.Identity())
    with pytest.raises(ModelError, match="dims"):
        register("bad-dims", feature_dim=1, profile="fmcib", dims=1)(lambda: nn.Identity())
    assert list_models() == before
