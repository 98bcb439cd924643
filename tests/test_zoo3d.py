"""FMCIB's 3D baselines: MedicalNet (Med3D) ResNets and the Models Genesis encoder.

Checkpoints are built here in the published files' structure, written from the source repositories' network code
(Tencent/MedicalNet models/resnet.py + train.py's save; MrGiovanni/ModelsGenesis pytorch/unet3d.py + its save):
a DataParallel ``module.`` prefix, the trunk's key names and shapes, the heads (MedicalNet's ``conv_seg``, the
Genesis decoder) and the training script's other entries, with random values. They load through the catalogue's
layout with coverage 1.0 and the features equal a forward pass written here with torch.nn.functional from those
tensors (dilations, strides, shortcuts and axis order as the sources have them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from medfm.cli import main
from medfm.data.io import read_volume
from medfm.data.patches import crop_patch
from medfm.data.profiles import get_profile, profile_from_dict
from medfm.errors import ModelError, ProfileError
from medfm.models import hub
from medfm.models.adapters import detect_layout
from medfm.models.registry import get_entry, load_model
from medfm.models.stages import trunk_blocks, trunk_family, trunk_stages
from test_hub import local_only  # noqa: F401 - autouse: an empty cache in tmp_path, no network

MED3D = {10: "B", 18: "A", 34: "A", 50: "B"}  # MedicalNet README: the shortcut each published file was trained with
BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3)}
# stage -> (planes, stride, dilation), as MedicalNet's ResNet makes its layers
STAGES = ((64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4))


def _bn(shapes: dict, name: str, c: int) -> None:
    for part in ("weight", "bias", "running_mean", "running_var"):
        shapes[f"{name}.{part}"] = (c,)
    shapes[f"{name}.num_batches_tracked"] = ()


def medicalnet_shapes(depth: int, classes: int = 2) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a MedicalNet ResNet's state dict (before DataParallel's prefix), segmentation head included."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 1, 7, 7, 7)}
    _bn(shapes, "bn1", 64)
    bottleneck, inplanes = depth == 50, 64
    for stage, ((planes, stride, _), blocks) in enumerate(zip(STAGES, BLOCKS[depth], strict=True), start=1):
        out = planes * (4 if bottleneck else 1)
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            cin = inplanes if b == 0 else out
            if bottleneck:
                convs = [(planes, cin, 1), (planes, planes, 3), (out, planes, 1)]
            else:
                convs = [(planes, cin, 3), (planes, planes, 3)]
            for i, (co, ci, k) in enumerate(convs, start=1):
                shapes[f"{p}.conv{i}.weight"] = (co, ci, k, k, k)
                _bn(shapes, f"{p}.bn{i}", co)
            if b == 0 and MED3D[depth] == "B" and (stride != 1 or inplanes != out):
                shapes[f"{p}.downsample.0.weight"] = (out, inplanes, 1, 1, 1)
                _bn(shapes, f"{p}.downsample.1", out)
        inplanes = out
    shapes["conv_seg.0.weight"] = (inplanes, 32, 2, 2, 2)  # ConvTranspose3d(C, 32, 2, stride=2)
    shapes["conv_seg.0.bias"] = (32,)
    _bn(shapes, "conv_seg.1", 32)
    shapes["conv_seg.3.weight"] = (32, 32, 3, 3, 3)
    _bn(shapes, "conv_seg.4", 32)
    shapes["conv_seg.6.weight"] = (classes, 32, 1, 1, 1)
    return shapes


def genesis_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of Models Genesis' UNet3D state dict (encoder, decoder, output)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def luconv(name: str, cin: int, cout: int) -> None:
        shapes[f"{name}.conv1.weight"] = (cout, cin, 3, 3, 3)
        shapes[f"{name}.conv1.bias"] = (cout,)
        _bn(shapes, f"{name}.bn1", cout)

    for depth, (name, cin) in enumerate(
        (("down_tr64", 1), ("down_tr128", 64), ("down_tr256", 128), ("down_tr512", 256))
    ):
        width = 32 * 2**depth
        luconv(f"{name}.ops.0", cin, width)
        luconv(f"{name}.ops.1", width, 2 * width)
    for name, chans, depth in (("up_tr256", 512, 2), ("up_tr128", 256, 1), ("up_tr64", 128, 0)):
        shapes[f"{name}.up_conv.weight"] = (chans, chans, 2, 2, 2)
        shapes[f"{name}.up_conv.bias"] = (chans,)
        width = 32 * 2 ** (depth + 1)
        luconv(f"{name}.ops.0", chans + chans // 2, width)
        luconv(f"{name}.ops.1", width, width)
    shapes["out_tr.final_conv.weight"] = (1, 64, 1, 1, 1)
    shapes["out_tr.final_conv.bias"] = (1,)
    return shapes


def random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Random values of those shapes: He-scaled convolutions, batch norms near identity with real statistics."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", ".bias")):
            state[key] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # a batch-norm weight
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = int(np.prod(shape[1:]))
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
    return state


def _norm(x: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"])


def medicalnet_reference(sd: dict[str, torch.Tensor], depth: int, x: torch.Tensor) -> torch.Tensor:
    """MedicalNet's forward up to layer4, then global average pooling, from the tensors by hand."""
    x = F.max_pool3d(F.relu(_norm(F.conv3d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1")), 3, 2, 1)
    bottleneck = depth == 50
    for stage, ((planes, stride, dil), blocks) in enumerate(zip(STAGES, BLOCKS[depth], strict=True), start=1):
        out = planes * (4 if bottleneck else 1)
        for b in range(blocks):
            p, s = f"layer{stage}.{b}", stride if b == 0 else 1
            if bottleneck:
                y = F.relu(_norm(F.conv3d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
                y = F.conv3d(y, sd[f"{p}.conv2.weight"], stride=s, padding=dil, dilation=dil)
                y = F.relu(_norm(y, sd, f"{p}.bn2"))
                y = _norm(F.conv3d(y, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            else:
                y = F.conv3d(x, sd[f"{p}.conv1.weight"], stride=s, padding=dil, dilation=dil)
                y = F.relu(_norm(y, sd, f"{p}.bn1"))
                y = _norm(F.conv3d(y, sd[f"{p}.conv2.weight"], padding=dil, dilation=dil), sd, f"{p}.bn2")
            if f"{p}.downsample.0.weight" in sd:
                residual = _norm(F.conv3d(x, sd[f"{p}.downsample.0.weight"], stride=s), sd, f"{p}.downsample.1")
            elif b == 0 and (s != 1 or x.shape[1] != out):  # shortcut A: 1-voxel average pooling, zero channels
                pooled = F.avg_pool3d(x, kernel_size=1, stride=s)
                residual = torch.cat(
                    [pooled, pooled.new_zeros(pooled.shape[0], out - x.shape[1], *pooled.shape[2:])], 1
                )
            else:
                residual = x
            x = F.relu(y + residual)
    return x.mean(dim=(2, 3, 4))


def genesis_reference(sd: dict[str, torch.Tensor], x_xyz: torch.Tensor) -> torch.Tensor:
    """Models Genesis' encoder on an (x, y, z) cube, the deepest stage average-pooled, from the tensors by hand."""
    x = x_xyz
    for depth, name in enumerate(("down_tr64", "down_tr128", "down_tr256", "down_tr512")):
        for j in (0, 1):
            p = f"{name}.ops.{j}"
            x = F.relu(_norm(F.conv3d(x, sd[f"{p}.conv1.weight"], sd[f"{p}.conv1.bias"], padding=1), sd, f"{p}.bn1"))
        if depth < 3:
            x = F.max_pool3d(x, 2)
    return x.mean(dim=(2, 3, 4))


@pytest.mark.parametrize("depth", sorted(MED3D))
def test_med3d_trunk_has_the_published_keys_and_shapes(depth):
    entry = get_entry(f"med3d-resnet{depth}")
    model = entry.builder()
    published = {k: v for k, v in medicalnet_shapes(depth).items() if not k.startswith("conv_seg.")}
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == published
    assert entry.feature_dim == (2048 if depth == 50 else 512) and entry.profile == "medicalnet" and entry.dims == 3
    spec = entry.weights
    assert spec.layout == "medicalnet" and spec.sha256 is None and spec.sha256_prefix is None
    assert spec.url == (
        f"https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{depth}/resolve/main/resnet_{depth}_23dataset.pth"
    )
    assert spec.filename == f"medicalnet-resnet_{depth}_23dataset.pth"
    with torch.no_grad():
        assert model.eval()(torch.zeros(2, 1, 50, 50, 50)).shape == (2, entry.feature_dim)


@pytest.mark.parametrize("depth", [10, 18, 50])  # shortcut B basic, shortcut A basic, shortcut B bottleneck
def test_med3d_published_layout_loads_and_matches_the_source_network(depth):
    name = f"med3d-resnet{depth}"
    state = random_state(medicalnet_shapes(depth), seed=depth)
    checkpoint = {
        "ecpoch": 199,  # sic, MedicalNet's train.py
        "batch_id": 0,
        "state_dict": {f"module.{k}": v for k, v in state.items()},
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]},
    }
    assert detect_layout(checkpoint) == "medicalnet"
    path = hub.cached_path(get_entry(name).weights)
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)

    loaded = load_model(name)  # 'published': the cached file, in the catalogue's layout
    assert loaded.report.layout == "medicalnet" and loaded.report.coverage == 1.0
    assert sorted(loaded.report.dropped) == sorted(f"module.{k}" for k in state if k.startswith("conv_seg."))
    assert loaded.weights_sha256 == hub.sha256_of(path)
    x = torch.randn(2, 1, 24, 28, 20, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, expected = loaded.model(x), medicalnet_reference(state, depth, x)
    assert got.shape == (2, loaded.entry.feature_dim)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert got.std() > 0.01  # real features, not a constant


def test_models_genesis_published_layout_loads_and_matches_the_source_network():
    state = random_state(genesis_shapes(), seed=5)
    checkpoint = {
        "epoch": 37,
        "state_dict": {f"module.{k}": v for k, v in state.items()},
        "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 1.0, "params": [0]}]},
    }
    assert detect_layout(checkpoint) == "models-genesis"
    entry = get_entry("models-genesis")
    assert entry.feature_dim == 512 and entry.profile == "models-genesis" and entry.dims == 3
    assert entry.weights.layout == "models-genesis" and entry.weights.sha256 is None
    assert entry.weights.url == "https://huggingface.co/MrGiovanni/ModelsGenesis/resolve/main/Genesis_Chest_CT.pt"
    path = hub.cached_path(entry.weights)
    path.parent.mkdir(parents=True)
    torch.save(checkpoint, path)

    loaded = load_model("models-genesis")
    assert loaded.report.layout == "models-genesis" and loaded.report.coverage == 1.0
    trunk = {k for k in state if k.startswith("down_tr")}
    assert set(loaded.model.state_dict()) == trunk
    assert sorted(loaded.report.dropped) == sorted(f"module.{k}" for k in state if k not in trunk)
    patch = torch.randn(2, 1, 16, 24, 32, generator=torch.Generator().manual_seed(2))  # medfm's (N, C, Z, Y, X)
    with torch.no_grad():
        got = loaded.model(patch)
        expected = genesis_reference(state, patch.permute(0, 1, 4, 3, 2))  # Models Genesis reads (x, y, z)
        other_order = genesis_reference(state, patch)
    assert got.shape == (2, 512)
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, other_order, rtol=1e-3, atol=1e-4)  # the axis order matters


def test_weights_list_shows_the_rows(capsys):
    assert main(["weights", "list"]) == 0
    lines = {x.split(":", 1)[0]: x for x in capsys.readouterr().out.splitlines()}
    for depth in MED3D:
        line = lines[f"med3d-resnet{depth}"]
        assert "[not cached]" in line and "layout medicalnet, profile medicalnet" in line
        assert f"MedicalNet-Resnet{depth}/resolve/main/resnet_{depth}_23dataset.pth" in line
    assert "layout models-genesis, profile models-genesis" in lines["models-genesis"]
    assert "Genesis_Chest_CT.pt" in lines["models-genesis"]


def test_medicalnet_profile_zscores_over_voxels_above_zero():
    profile = get_profile("medicalnet")
    hu = np.array([[[-1000.0, 0.0], [100.0, 300.0]], [[500.0, -50.0], [0.0, 2000.0]]])
    # voxels above 0: 100, 300, 500, 2000 -> mean 725, deviations -625, -425, -225, 1275
    mean, std = 725.0, float(np.sqrt((625.0**2 + 425.0**2 + 225.0**2 + 1275.0**2) / 4))  # population std
    assert std == pytest.approx(749.5832, abs=1e-3)
    np.testing.assert_allclose(profile.scale(hu), (hu - mean) / std, rtol=1e-6)
    assert profile.scale(hu)[0, 0, 1] == pytest.approx(-725.0 / 749.5832, abs=1e-5)  # 0 HU: the same formula
    with pytest.raises(ProfileError, match="0 voxels above 0 HU"):
        profile.scale(np.full((2, 2, 2), -300.0))
    with pytest.raises(ProfileError, match="all of one value"):
        profile.scale(np.array([-5.0, 40.0, 40.0]))
    spec = profile.to_dict()
    assert spec["scaling"] == "zscore-nonzero" and "scaling" not in get_profile("fmcib").to_dict()
    assert profile_from_dict("medicalnet", spec) is profile
    with pytest.raises(ProfileError, match="scaling"):
        type(profile)(name="x", version="1", scaling="minmax")


def test_medicalnet_patch_is_the_fmcib_grid_zscored(small_ct):
    volume = read_volume(small_ct.path)
    seed = small_ct.geometry.index_to_world(np.array([20.0, 18.0, 12.0]))
    fmcib = crop_patch(volume, seed, get_profile("fmcib"))[0]
    hu = fmcib.astype(np.float64) * 3072.0 - 1024.0  # undo (HU + 1024) / 3072
    above = hu[hu > 0]
    expected = (hu - above.mean()) / above.std()
    got = crop_patch(volume, seed, get_profile("medicalnet"))
    assert got.shape == (1, 50, 50, 50)
    np.testing.assert_allclose(got[0], expected, atol=1e-3)
    assert abs(float(got[0][hu > 0].mean())) < 1e-4 and float(got[0][hu > 0].std()) == pytest.approx(1.0, abs=1e-4)


def test_models_genesis_profile():
    profile = get_profile("models-genesis")
    assert profile.size == (32, 64, 64) and profile.hu_window == (-1000.0, 1000.0) and profile.clip
    np.testing.assert_allclose(profile.scale(np.array([-1500.0, -1000.0, 0.0, 500.0, 1200.0])), [0, 0, 0.5, 0.75, 1])


def test_extract_med3d_resnet10_random_init(small_ct, tmp_path):
    world = small_ct.geometry.index_to_world(np.array([[20.0, 18.0, 12.0], [12.0, 10.0, 8.0]]))
    manifest = tmp_path / "seeds.csv"
    table = pd.DataFrame(world, columns=["coordX", "coordY", "coordZ"])
    table.insert(0, "image_path", small_ct.path.name)
    table.to_csv(manifest, index=False)
    out = tmp_path / "features.parquet"
    args = ["extract", str(manifest), "--model", "med3d-resnet10", "--random-init", "--out", str(out)]
    assert main([*args, "--workers", "0", "--quiet", "--device", "cpu"]) == 0
    written = pd.read_parquet(out)
    assert list(written.columns) == [*table.columns, *(f"feat_{i}" for i in range(512))]
    features = written.drop(columns=table.columns)
    assert np.isfinite(features.to_numpy()).all() and not np.allclose(features.iloc[0], features.iloc[1])


def test_extract_refuses_a_patch_medicalnet_cannot_scale_as_a_row_error(small_ct, tmp_path):
    air = sitk.GetImageFromArray(np.full((24, 36, 40), -1000, dtype=np.int16))
    air.CopyInformation(small_ct.image)
    sitk.WriteImage(air, str(tmp_path / "air.nii.gz"))
    seed = small_ct.geometry.index_to_world(np.array([[20.0, 18.0, 12.0]]))
    table = pd.DataFrame(np.vstack([seed, seed]), columns=["coordX", "coordY", "coordZ"])
    table.insert(0, "image_path", ["air.nii.gz", small_ct.path.name])
    table.to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "f.parquet"
    args = ["extract", str(tmp_path / "m.csv"), "--model", "med3d-resnet10", "--random-init", "--out", str(out)]
    assert main([*args, "--workers", "0", "--quiet", "--device", "cpu", "--on-error", "skip"]) == 0
    errors = pd.read_csv(tmp_path / "f.errors.csv")
    assert len(errors) == 1 and "0 voxels above 0 HU" in " ".join(errors.astype(str).iloc[0])
    assert "air.nii.gz" in " ".join(errors.astype(str).iloc[0])
    assert len(pd.read_parquet(out)) == 1


@pytest.mark.parametrize("name", ["med3d-resnet18", "models-genesis"])
def test_no_stage_table_so_pyramids_refuse_them(name):
    # MedicalNet's stages 3-4 keep stride 8 (dilated): a table of strides 2..32 would be silently wrong for it
    trunk = get_entry(name).builder()
    assert trunk_family(trunk) is None
    with pytest.raises(ModelError, match="detection needs a trunk of the ResNet"):
        trunk_stages(trunk, "detection")
    expected = ["conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert trunk_blocks(trunk) == (
        expected if name.startswith("med3d") else [f"down_tr{c}" for c in (64, 128, 256, 512)]
    )
