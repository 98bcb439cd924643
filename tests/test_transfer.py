"""Weight transfer across topologies: prefix mapping, partial transfer, channel adaptation, 2D→3D inflation, CLI."""

from __future__ import annotations

import errno
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from medfm.cli import main
from medfm.errors import CheckpointError
from medfm.models.registry import create
from medfm.models.transfer import TransferReport, transfer_weights

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, ResNet  # noqa: E402


def _randomise_bn(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            module.weight.data.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
            module.bias.data.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)


def seeded(factory, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = factory(**kwargs)
    _randomise_bn(model, seed)
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def resnet18_2d() -> nn.Module:
    return seeded(torchvision.models.resnet18, 1)


@pytest.fixture(scope="module")
def source18(resnet18_2d) -> dict[str, torch.Tensor]:
    return snapshot(resnet18_2d)


# --- same topology, prefixes, report ---------------------------------------------------------------------


def test_same_topology_copies_everything(source18):
    target = seeded(torchvision.models.resnet18, 2)
    assert not torch.equal(target.state_dict()["conv1.weight"], source18["conv1.weight"])
    report = transfer_weights(source18, target)
    assert report.layout == "torchvision"
    assert (report.strip_prefix, report.add_prefix) == ("", "")
    assert report.transferred == sorted(source18)
    assert report.sources == {k: k for k in source18}
    assert report.adapted == [] and report.mismatched == [] and report.unused == [] and report.left_at_init == []
    assert report.coverage == 1.0
    assert report.blocks == {b: 1.0 for b in ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"]}
    for key, value in target.state_dict().items():
        assert torch.equal(value, source18[key]), key


class Classifier(nn.Module):
    """A ResNet18 trunk held under ``backbone.`` plus a new head: names differ from torchvision's by a prefix."""

    def __init__(self) -> None:
        super().__init__()
        resnet = torchvision.models.resnet18(weights=None)
        resnet.fc = nn.Identity()
        self.backbone = resnet
        self.head = nn.Linear(512, 3)


def test_prefix_mapping_strip_and_add(source18):
    trunk = {k: v for k, v in source18.items() if not k.startswith("fc.")}
    checkpoint = {"encoder." + k: v for k, v in source18.items()}  # a plain dict whose names carry "encoder."
    torch.manual_seed(3)
    target = Classifier()
    head_before = snapshot(target.head)
    report = transfer_weights(checkpoint, target)
    assert (report.strip_prefix, report.add_prefix) == ("encoder.", "backbone.")
    assert report.unused == ["encoder.fc.bias", "encoder.fc.weight"]
    assert report.left_at_init == ["head.bias", "head.weight"]
    assert report.transferred == sorted("backbone." + k for k in trunk)
    got = target.state_dict()
    for key, value in trunk.items():
        assert torch.equal(got["backbone." + key], value), key
    assert torch.equal(got["head.weight"], head_before["weight"])
    assert report.blocks["backbone.layer4"] == 1.0 and report.blocks["head"] == 0.0
    assert set(report.blocks) == {f"backbone.{b}" for b in ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]} | {
        "head"
    }
    n_head = 3 * 512 + 3
    total = sum(v.numel() for v in got.values())
    assert report.coverage == pytest.approx(1 - n_head / total)


def test_shape_mismatch_and_report_numbers(source18):
    target = seeded(torchvision.models.resnet18, 4, num_classes=10)
    fc_before = snapshot(target.fc)
    report = transfer_weights(source18, target)
    assert report.mismatched == [("fc.weight", (1000, 512), (10, 512)), ("fc.bias", (1000,), (10,))]
    assert report.left_at_init == ["fc.bias", "fc.weight"]
    assert report.unused == ["fc.bias", "fc.weight"]
    assert len(report.transferred) == len(source18) - 2
    assert report.blocks["fc"] == 0.0 and report.blocks["layer4"] == 1.0
    total = sum(v.numel() for v in target.state_dict().values())
    assert report.coverage == pytest.approx(1 - (10 * 512 + 10) / total)
    assert torch.equal(target.fc.weight, fc_before["weight"])

    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["mismatched"][0] == ["fc.weight", [1000, 512], [10, 512]]
    assert data["blocks"]["fc"] == 0.0
    summary = report.summary()
    assert f"transferred {len(source18) - 2} of {len(source18)} tensors" in summary
    assert "mismatched fc.weight: source [1000, 512], target [10, 512]" in summary
    assert "coverage by block:" in summary
    assert re.search(r"^  fc +0\.00%$", summary, re.M) and re.search(r"^  layer4 +100\.00%$", summary, re.M)


def test_min_coverage_raises_and_leaves_the_model_untouched(source18):
    partial = {k: v for k, v in source18.items() if k.startswith(("conv1.", "bn1.", "layer1."))}
    target = seeded(torchvision.models.resnet18, 5)
    before = snapshot(target)
    with pytest.raises(CheckpointError, match=r"cover \d+\.\d% of the model, below the 50% required"):
        transfer_weights(partial, target, min_coverage=0.5)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key
    report = transfer_weights(partial, target, min_coverage=0.0)
    assert report.blocks["layer1"] == 1.0 and report.blocks["layer2"] == 0.0 and report.blocks["conv1"] == 1.0
    assert 0.0 < report.coverage < 0.1


def test_nothing_fits_is_an_error():
    with pytest.raises(CheckpointError, match="no tensor of the checkpoint fits the model"):
        transfer_weights({"foo.weight": torch.zeros(3, 3)}, nn.Linear(4, 2))


def test_transfer_from_a_moco_file(tmp_path, source18):
    trunk = {k: v for k, v in source18.items() if not k.startswith("fc.")}
    state = {"module.encoder_q." + k: v for k, v in trunk.items()}
    state |= {"module.encoder_q.fc.0.weight": torch.randn(512, 512), "module.encoder_k.conv1.weight": torch.randn(1)}
    state["module.queue"] = torch.randn(128, 8)
    path = tmp_path / "moco_v2_200ep.pth.tar"
    torch.save({"state_dict": state, "epoch": 200, "arch": "resnet18"}, path)
    target = seeded(torchvision.models.resnet18, 6)
    report = transfer_weights(path, target)
    assert report.layout == "moco"
    assert sorted(report.dropped) == ["module.encoder_k.conv1.weight", "module.encoder_q.fc.0.weight", "module.queue"]
    assert report.left_at_init == ["fc.bias", "fc.weight"] and report.unused == []
    for key, value in trunk.items():
        assert torch.equal(target.state_dict()[key], value), key


# --- partial transfer into a larger topology -------------------------------------------------------------


class Encoder(nn.Module):
    """The torchvision ResNet layers a U-Net encoder uses (no pooling, no classifier)."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(resnet, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class UNetLike(nn.Module):
    """A torchvision-ResNet encoder plus a small decoder: the topology of RadiologyNET's U-Net-ResNet."""

    def __init__(self, resnet: nn.Module, channels: int) -> None:
        super().__init__()
        self.encoder = Encoder(resnet)
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, 64, 1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 16, 3, padding=1),
            nn.Conv2d(16, 1, 1),
        )


def test_resnet50_into_a_unet_covers_the_encoder_only():
    source = snapshot(seeded(torchvision.models.resnet50, 7))
    torch.manual_seed(8)
    target = UNetLike(torchvision.models.resnet50(weights=None), 2048)
    before = snapshot(target)
    report = transfer_weights(source, target)
    assert (report.strip_prefix, report.add_prefix) == ("", "encoder.")
    encoder_keys = sorted(k for k in before if k.startswith("encoder."))
    decoder_keys = sorted(k for k in before if k.startswith("decoder."))
    assert report.transferred == encoder_keys
    assert report.left_at_init == decoder_keys
    assert report.unused == ["fc.bias", "fc.weight"]
    assert report.adapted == [] and report.mismatched == []
    blocks = ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"]
    assert report.blocks == {**{f"encoder.{b}": 1.0 for b in blocks}, "decoder": 0.0}
    got = target.state_dict()
    for key in encoder_keys:
        assert torch.equal(got[key], source[key[len("encoder.") :]]), key
    for key in decoder_keys:
        assert torch.equal(got[key], before[key]), key
    n_decoder = sum(before[k].numel() for k in decoder_keys)
    assert report.coverage == pytest.approx(1 - n_decoder / sum(v.numel() for v in before.values()))


def test_radiologynet_archive_into_a_unet(tmp_path, source18):
    import io
    import tarfile

    buf = io.BytesIO()
    torch.save({"model_state": {"model." + k: v for k, v in source18.items()}}, buf)
    path = tmp_path / "ResNet18.tar.gz"
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("TL_Weights/ResNet18.pth")
        info.size = len(buf.getvalue())
        tar.addfile(info, io.BytesIO(buf.getvalue()))
    torch.manual_seed(9)
    target = UNetLike(torchvision.models.resnet18(weights=None), 512)
    report = transfer_weights(path, target, min_coverage=0.9)
    assert report.layout == "radiologynet"
    assert report.dropped == ["model.fc.weight", "model.fc.bias"]
    assert report.unused == []
    assert report.blocks["encoder.layer4"] == 1.0 and report.blocks["decoder"] == 0.0
    assert torch.equal(target.encoder.layer3[1].conv2.weight, source18["layer3.1.conv2.weight"])


# --- input channels --------------------------------------------------------------------------------------


def _grey_resnet(seed: int) -> nn.Module:
    model = seeded(torchvision.models.resnet18, seed)
    model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model.eval()


def test_three_to_one_channel_first_conv(resnet18_2d, source18):
    target = _grey_resnet(10)
    report = transfer_weights(source18, target)
    assert report.adapted == [("conv1.weight", "summed 3→1 input channels")]
    assert report.coverage == 1.0 and report.mismatched == []
    assert torch.allclose(target.conv1.weight, source18["conv1.weight"].sum(1, keepdim=True))
    grey = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(target.conv1(grey), resnet18_2d.conv1(grey.repeat(1, 3, 1, 1)), atol=1e-5)
        assert torch.allclose(target(grey), resnet18_2d(grey.repeat(1, 3, 1, 1)), atol=1e-4)


def test_one_to_three_channel_first_conv():
    grey_model = _grey_resnet(11)
    target = seeded(torchvision.models.resnet18, 12)
    report = transfer_weights(snapshot(grey_model), target)
    assert report.adapted == [("conv1.weight", "repeated 1→3 input channels, /3")]
    grey = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(target(grey.repeat(1, 3, 1, 1)), grey_model(grey), atol=1e-4)


# --- 2D → 3D inflation -----------------------------------------------------------------------------------


class Small2D(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(torch.relu(self.bn1(self.conv1(x))))


class Small3D(nn.Module):
    """Same names as Small2D; no padding along depth, so every output slice sees only real input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(3, 8, (3, 3, 3), padding=(0, 1, 1))
        self.bn1 = nn.BatchNorm3d(8)
        self.layer1 = nn.Sequential(nn.Conv3d(8, 8, (5, 3, 3), padding=(0, 1, 1)), nn.ReLU(), nn.Conv3d(8, 4, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer1(torch.relu(self.bn1(self.conv1(x))))


def test_inflation_of_a_small_model():
    source = seeded(Small2D, 13)
    target = seeded(Small3D, 14)
    with pytest.raises(CheckpointError, match="cover"):  # without inflation only the BatchNorm fits
        transfer_weights(snapshot(source), target, min_coverage=0.5)
    report = transfer_weights(snapshot(source), target, inflate=True)
    assert report.coverage == 1.0
    assert report.adapted == [
        ("conv1.weight", "inflated 2D→3D over depth 3"),
        ("layer1.0.weight", "inflated 2D→3D over depth 5"),
        ("layer1.2.weight", "inflated 2D→3D over depth 1"),
    ]
    assert torch.allclose(target.layer1[0].weight, source.layer1[0].weight.unsqueeze(2).repeat(1, 1, 5, 1, 1) / 5)
    assert torch.equal(target.bn1.running_var, source.bn1.running_var)
    assert torch.equal(target.conv1.bias, source.conv1.bias)
    image = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    volume = image.unsqueeze(2).repeat(1, 1, 9, 1, 1)  # constant along depth
    with torch.no_grad():
        out2d, out3d = source(image), target(volume)
    assert out3d.shape == (2, 4, 3, 16, 16)  # 9 - 2 - 4 slices, each with a full receptive field
    for z in range(out3d.shape[2]):
        assert torch.allclose(out3d[:, :, z], out2d, atol=1e-5), z


def test_inflation_torchvision_resnet18_into_monai_3d_resnet18(resnet18_2d, source18):
    from monai.networks.nets import resnet18 as monai_resnet18

    torch.manual_seed(15)
    target = monai_resnet18(spatial_dims=3, n_input_channels=3, conv1_t_stride=2, bias_downsample=False).eval()
    report = transfer_weights(source18, target, inflate=True)
    convs = [k for k, v in source18.items() if v.ndim == 4]
    assert len(convs) == 20
    assert sorted(k for k, _ in report.adapted) == sorted(convs)
    assert report.mismatched == [("fc.weight", (1000, 512), (400, 512)), ("fc.bias", (1000,), (400,))]
    assert report.left_at_init == ["fc.bias", "fc.weight"]
    assert all(share == 1.0 for block, share in report.blocks.items() if block != "fc")
    # A volume constant along depth: away from the depth borders the 3D network computes the 2D one.
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    volume = image.unsqueeze(2).repeat(1, 1, 128, 1, 1)
    with torch.no_grad():
        x2 = resnet18_2d.maxpool(resnet18_2d.relu(resnet18_2d.bn1(resnet18_2d.conv1(image))))
        x3 = target.maxpool(target.act(target.bn1(target.conv1(volume))))
        assert x3.shape[2] == 32
        assert torch.allclose(x3[:, :, 16], x2, atol=1e-4)
        y2, y3 = resnet18_2d.layer2(resnet18_2d.layer1(x2)), target.layer2(target.layer1(x3))
    assert y3.shape[2] == 16
    assert torch.allclose(y3[:, :, 8], y2, atol=1e-4)
    assert not torch.allclose(y3[:, :, 0], y2, atol=1e-4)  # the border slices see the zero padding


# --- CLI -------------------------------------------------------------------------------------------------


def test_cli_inflates_a_2d_resnet10_into_resnet10_3d(tmp_path, capsys):
    source = snapshot(seeded(ResNet, 16, block=BasicBlock, layers=[1, 1, 1, 1]))
    path = tmp_path / "resnet10_2d.pt"
    torch.save({"state_dict": source, "epoch": 1}, path)
    out = tmp_path / "out" / "resnet10-3d.safetensors"
    assert main(["transfer", str(path), "--into", "resnet10-3d", "--inflate", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "adapted conv1.weight: summed 3→1 input channels; inflated 2D→3D over depth 7" in printed
    assert "coverage by block:" in printed and "layer4" in printed
    assert f"wrote {out}" in printed

    saved = load_file(str(out))
    init = create("resnet10-3d").state_dict()  # seeded: the same initialisation the command started from
    assert sorted(saved) == sorted(init)
    expected_conv1 = source["conv1.weight"].sum(1, keepdim=True).unsqueeze(2).repeat(1, 1, 7, 1, 1) / 7
    assert torch.allclose(saved["conv1.weight"], expected_conv1)
    w = source["layer2.0.conv1.weight"]
    assert torch.allclose(saved["layer2.0.conv1.weight"], w.unsqueeze(2).repeat(1, 1, 3, 1, 1) / 3)
    assert torch.equal(saved["layer3.0.bn2.running_var"], source["layer3.0.bn2.running_var"])
    for key in ("layer2.0.downsample.0.bias", "layer3.0.downsample.0.bias", "layer4.0.downsample.0.bias"):
        assert torch.equal(saved[key], init[key]), key  # torchvision's downsample convs have no bias

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["model"] == "resnet10-3d" and report["inflate"] is True
    assert report["left_at_init"] == [
        "layer2.0.downsample.0.bias",
        "layer3.0.downsample.0.bias",
        "layer4.0.downsample.0.bias",
    ]
    assert report["unused"] == ["fc.bias", "fc.weight"]
    total = sum(v.numel() for v in init.values())
    assert report["coverage"] == pytest.approx(1 - (128 + 256 + 512) / total)
    assert report["blocks"]["conv1"] == 1.0 and report["blocks"]["layer1"] == 1.0
    assert report["blocks"]["layer2"] == pytest.approx(
        1 - 128 / sum(v.numel() for k, v in init.items() if k.startswith("layer2."))
    )
    assert len(report["source_sha256"]) == 64
    assert report["weights_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sorted(p.name for p in out.parent.iterdir()) == ["resnet10-3d.json", "resnet10-3d.safetensors"]


def test_cli_transfer_checks_out_before_the_work_and_writes_weights_and_report_as_a_pair(
    tmp_path, capsys, monkeypatch
):
    path = tmp_path / "w2d.pt"
    torch.save(snapshot(seeded(ResNet, 16, block=BasicBlock, layers=[1, 1, 1, 1])), path)
    (tmp_path / "taken.safetensors").mkdir()
    command = ["transfer", str(path), "--into", "resnet10-3d", "--inflate", "--out"]
    assert main([*command, str(tmp_path / "taken.safetensors")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"medfm: error: --out {tmp_path / 'taken.safetensors'} is a folder; name a file to write"
    )
    import medfm.data.outputs as outputs

    real = outputs.file_sha256

    out = tmp_path / "out" / "w.safetensors"

    def full_after_hashing(file):  # the disk fills after the weights were written, before the report
        digest = real(file)
        if Path(file).parent == out.parent:
            raise OSError(errno.ENOSPC, "No space left on device")
        return digest

    monkeypatch.setattr(outputs, "file_sha256", full_after_hashing)
    assert main([*command, str(out)]) == 2
    assert capsys.readouterr().err.strip() == f"medfm: error: cannot write {out}: the disk is full"
    assert list(out.parent.iterdir()) == []  # neither the weights nor the report: nothing half-written


def test_cli_plain_3d_transfer_from_a_lightning_checkpoint(tmp_path, capsys):
    torch.manual_seed(17)
    source = create("resnet10-3d").state_dict()
    source = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.items()}
    path = tmp_path / "epoch=3.ckpt"
    heads = {"model.heads.0.weight": torch.randn(2, 512)}
    torch.save({"state_dict": {**{f"model.trunk.{k}": v for k, v in source.items()}, **heads}, "global_step": 9}, path)
    out = tmp_path / "w.safetensors"
    assert main(["transfer", str(path), "--into", "resnet10-3d", "--min-coverage", "1", "--out", str(out)]) == 0
    assert "layout lightning: 1 head tensors dropped" in capsys.readouterr().out
    saved = load_file(str(out))
    for key, value in source.items():
        assert torch.equal(saved[key], value), key
    assert json.loads(out.with_suffix(".json").read_text())["coverage"] == 1.0


def test_cli_errors_are_one_line(tmp_path, capsys):
    source = snapshot(seeded(ResNet, 18, block=BasicBlock, layers=[1, 1, 1, 1]))
    path = tmp_path / "resnet10_2d.pt"
    torch.save(source, path)
    out = tmp_path / "w.safetensors"
    # Without --inflate only the BatchNorm tensors fit: far below the coverage asked for.
    assert main(["transfer", str(path), "--into", "resnet10-3d", "--min-coverage", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("medfm: error: the transferred weights cover") and "\n" not in err
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert main(["transfer", str(path), "--into", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["transfer", str(tmp_path / "missing.pt"), "--into", "resnet10-3d"]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["transfer", str(path), "--into", "resnet10-3d", "--inflate", "--out", str(tmp_path / "w.pt")]) == 2
    assert "name a .safetensors file" in capsys.readouterr().err


def test_report_type_is_exported():
    assert TransferReport(layout="x").to_dict()["coverage"] == 0.0


# --- structural roles: never by shape alone across roles (issue 20) ---------------------------------------


@pytest.fixture(scope="module")
def source50() -> dict[str, torch.Tensor]:
    return snapshot(seeded(torchvision.models.resnet50, 19))


def test_moco_resnet50_into_densenet121_is_refused(tmp_path, capsys, source50):
    # layer3.0.bn3 (1024 channels) has the shape of DenseNet's final norm5: shape alone must not move it there
    state = {"module.encoder_q." + k: v for k, v in source50.items() if not k.startswith("fc.")}
    path = tmp_path / "moco_r50.pth.tar"
    torch.save({"state_dict": state, "arch": "resnet50"}, path)
    target = create("densenet121")
    before = snapshot(target)
    with pytest.raises(CheckpointError, match="no tensor of the checkpoint fits the model"):
        transfer_weights(path, target)
    for key, value in target.state_dict().items():
        assert torch.equal(value, before[key]), key
    out = tmp_path / "d121.safetensors"
    assert main(["transfer", str(path), "--into", "densenet121", "--out", str(out)]) == 2
    assert "no tensor of the checkpoint fits" in capsys.readouterr().err
    assert not out.exists()


def test_resnet50_into_fmcib_with_inflate_never_shifts_a_stage(tmp_path, capsys, source50):
    # FMCIB's trunk is twice as wide: its layer2 has the shapes of ResNet50's layer3, which must not go there
    path = tmp_path / "r50.pth"
    torch.save(source50, path)
    out = tmp_path / "fmcib.safetensors"
    assert main(["transfer", str(path), "--into", "fmcib-resnet50", "--inflate", "--out", str(out)]) == 2
    assert "no tensor of the checkpoint fits" in capsys.readouterr().err
    assert not out.exists()


def test_resnet50_into_a_3d_resnet50_inflates_stage_by_stage(source50):
    from medfm.models.backbones import resnet3d

    torch.manual_seed(20)
    target = resnet3d(depth=50, in_channels=3)
    report = transfer_weights(source50, target, inflate=True)
    assert report.strip_prefix == "" and report.add_prefix == ""
    assert report.sources == {k: k for k in report.transferred}  # every tensor into the layer of its own name
    assert report.role_mismatched == []
    layer3 = [k for k in source50 if k.startswith("layer3.")]
    assert set(layer3) <= set(report.transferred)
    w = source50["layer3.2.conv2.weight"]
    assert torch.allclose(target.layer3[2].conv2.weight, w.unsqueeze(2).repeat(1, 1, 3, 1, 1) / 3)
    assert all(report.blocks[f"layer{i}"] > 0.99 for i in range(1, 5))


def test_resnet50_into_resnet18_moves_no_block(tmp_path, capsys, source50):
    path = tmp_path / "r50.pth"
    torch.save(source50, path)
    out = tmp_path / "r18.safetensors"
    # bottleneck blocks are not basic blocks: layer1.0.conv2 has the shape of ResNet18's but another role
    assert main(["transfer", str(path), "--into", "resnet18", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "below --min-coverage 0.5" in captured.err and "\n" not in captured.err.strip()
    assert "coverage by block:" in captured.out and re.search(r"^  layer1 +0\.00%$", captured.out, re.M)
    assert "their blocks differ in kind between source and target (layer1.0, layer1.1" in captured.out
    assert not out.exists()

    assert main(["transfer", str(path), "--into", "resnet18", "--allow-partial", "--out", str(out)]) == 0
    assert "(--allow-partial)" in capsys.readouterr().err
    saved, init = load_file(str(out)), create("resnet18").state_dict()
    report = json.loads(out.with_suffix(".json").read_text())
    stem = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "bn1.num_batches_tracked"]
    assert sorted(report["transferred"]) == sorted(stem)
    assert report["sources"] == {k: k for k in stem}
    for key in stem:
        assert torch.equal(saved[key], source50[key]), key
    for key in init:
        if key not in stem:
            assert torch.equal(saved[key], init[key]), key  # layer1.0.conv2 included: same shape, other role
    assert ["layer1.0.conv2.weight", "layer1.0"] in report["role_mismatched"]
    assert report["coverage"] < 0.001


def test_resnet50_into_resnet101_maps_the_blocks_both_have(source50):
    target = seeded(torchvision.models.resnet101, 21)
    before = snapshot(target)
    report = transfer_weights(source50, target, min_coverage=0.5)
    assert report.transferred == sorted(source50) and report.sources == {k: k for k in source50}
    assert report.role_mismatched == [] and report.unused == []
    got = target.state_dict()
    assert torch.equal(got["layer3.5.conv3.weight"], source50["layer3.5.conv3.weight"])
    assert torch.equal(got["layer3.6.conv3.weight"], before["layer3.6.conv3.weight"])  # ResNet50 has 6 blocks
    assert all(k.startswith("layer3.") for k in report.left_at_init)
    assert report.left_at_init == sorted(k for k in before if k.startswith("layer3.") and int(k.split(".")[1]) >= 6)
    assert report.blocks["layer2"] == 1.0 and 0.2 < report.blocks["layer3"] < 0.35
    shared = sum(v.numel() for k, v in before.items() if k in source50)
    assert report.coverage == pytest.approx(shared / sum(v.numel() for v in before.values()))
