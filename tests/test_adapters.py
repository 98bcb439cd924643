"""Checkpoint adapters: each pre-training layout, built here from a torchvision model, unwraps to its trunk."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import tempfile
from pathlib import Path

import pytest
import torch

from medfm.errors import CheckpointError, ConfigError
from medfm.models import checkpoints
from medfm.models.adapters import LAYOUTS, adapt, detect_layout
from medfm.models.checkpoints import read_checkpoint, read_trunk

torchvision = pytest.importorskip("torchvision")


def _randomise_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics, so that buffers are checked as well as parameters."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=gen))
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=gen) + 0.5)
            module.num_batches_tracked.fill_(7)


@pytest.fixture(scope="module")
def resnet() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(full state dict with fc, trunk state dict without it) of a seeded torchvision ResNet18."""
    torch.manual_seed(1)
    model = torchvision.models.resnet18(weights=None)
    _randomise_bn(model, 1)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return full, {k: v for k, v in full.items() if not k.startswith("fc.")}


@pytest.fixture(scope="module")
def densenet() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(full, trunk = features.*) of a seeded torchvision DenseNet121."""
    torch.manual_seed(2)
    model = torchvision.models.densenet121(weights=None)
    full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return full, {k: v for k, v in full.items() if k.startswith("features.")}


def assert_trunk(state: dict[str, torch.Tensor], trunk: dict[str, torch.Tensor]) -> None:
    assert sorted(state) == sorted(trunk)
    for key, value in trunk.items():
        assert state[key].shape == value.shape, key
        assert torch.equal(state[key], value), key


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in state.items()}


def mlp(prefix: str, dims: tuple[int, ...] = (512, 64, 16)) -> dict[str, torch.Tensor]:
    """The tensors of a Linear-ReLU-Linear head: ``{prefix}0.weight`` ... ``{prefix}2.bias``."""
    out = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        out[f"{prefix}{2 * i}.weight"] = torch.randn(b, a)
        out[f"{prefix}{2 * i}.bias"] = torch.randn(b)
    return out


def check(checkpoint: dict, layout: str, trunk: dict[str, torch.Tensor], dropped: set[str]) -> None:
    assert detect_layout(checkpoint) == layout
    state, got_dropped = adapt(checkpoint)
    assert_trunk(state, trunk)
    assert set(got_dropped) == dropped
    assert len(got_dropped) == len(dropped)
    # The same result when the layout is named explicitly.
    state2, _ = adapt(checkpoint, layout)
    assert sorted(state2) == sorted(state)


# --- layouts ---------------------------------------------------------------------------------------------


def test_every_layout_is_known():
    assert set(LAYOUTS) == {
        "torchvision",
        "fmcib",
        "radiologynet",
        "moco",
        "simclr",
        "byol",
        "swav",
        "pirl",
        "lightning",
        "medicalnet",
        "models-genesis",
    }


@pytest.mark.parametrize("wrap", ["bare", "state_dict", "module"])
def test_torchvision_passes_through(resnet, wrap):
    full, _ = resnet
    if wrap == "bare":
        checkpoint = dict(full)
    elif wrap == "state_dict":
        checkpoint = {"state_dict": dict(full), "epoch": 3}
    else:
        checkpoint = prefixed(full, "module.")
    check(checkpoint, "torchvision", full, set())


def test_fmcib(resnet):
    _, trunk = resnet
    head = {"0.weight": torch.randn(2, 512), "0.bias": torch.zeros(2)}
    check(
        {"trunk_state_dict": trunk, "head_state_dict": head},
        "fmcib",
        trunk,
        {"head_state_dict.0.weight", "head_state_dict.0.bias"},
    )


@pytest.mark.parametrize("prefix", ["model.", "backbone.", "module.model.", "module."])
def test_radiologynet(resnet, prefix):
    full, trunk = resnet
    state = prefixed(full, prefix)  # the classifier (fc) is in it, as RadiologyNET saves its whole model
    checkpoint = {"model_state": state, "epoch": 40, "optimizer_state": {"lr": 1e-3}}
    check(checkpoint, "radiologynet", trunk, {f"{prefix}fc.weight", f"{prefix}fc.bias"})


def test_radiologynet_densenet_registers_modules_twice(densenet):
    # RadiologyNET's DenseNet121 wrapper holds the same modules as features.* and model.features.*.
    full, trunk = densenet
    state = {**full, **prefixed(full, "model.")}
    check(
        {"model_state": state},
        "radiologynet",
        trunk,
        {"classifier.weight", "classifier.bias", "model.classifier.weight", "model.classifier.bias"},
    )


def test_radiologynet_conflicting_duplicates_are_refused(resnet):
    _, trunk = resnet
    state = {**prefixed(trunk, "model."), "conv1.weight": torch.zeros_like(trunk["conv1.weight"])}
    with pytest.raises(CheckpointError, match="both become 'conv1.weight'"):
        adapt({"model_state": state})


@pytest.mark.parametrize("mlp_head", [False, True], ids=["moco-v1", "moco-v2"])
def test_moco(resnet, mlp_head):
    full, trunk = resnet
    head = mlp("module.encoder_q.fc.") if mlp_head else {"module.encoder_q.fc.weight": torch.randn(128, 512)}
    key_encoder = prefixed(full, "module.encoder_k.")
    queue = {"module.queue": torch.randn(128, 16), "module.queue_ptr": torch.zeros(1, dtype=torch.long)}
    state = {**prefixed(trunk, "module.encoder_q."), **head, **key_encoder, **queue}
    checkpoint = {"epoch": 200, "arch": "resnet18", "state_dict": state, "optimizer": {"state": {}}}
    check(checkpoint, "moco", trunk, set(head) | set(key_encoder) | set(queue))


def test_moco_cxr_densenet(densenet):
    # MIMIC-CheXpert / MoCo-CXR DenseNets: module.encoder_q.features.* → features.*
    full, trunk = densenet
    state = {
        **prefixed(full, "module.encoder_q."),  # features.* and the classifier (the MoCo projection)
        **prefixed(trunk, "module.encoder_k."),
        "module.queue": torch.randn(128, 8),
        "module.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    dropped = {k for k in state if not k.startswith("module.encoder_q.features.")}
    assert "module.encoder_q.classifier.weight" in dropped
    check({"state_dict": state, "arch": "densenet121"}, "moco", trunk, dropped)


def test_mimic_chexpert_lightning_densenet(densenet):
    # CovidPrognosis saves its MoCo DenseNets as Lightning checkpoints: state_dict with model.encoder_q.* keys
    full, trunk = densenet
    state = {
        **prefixed(full, "model.encoder_q."),
        **prefixed(trunk, "model.encoder_k."),
        "model.queue": torch.randn(128, 8),
        "model.queue_ptr": torch.zeros(1, dtype=torch.long),
    }
    checkpoint = {"state_dict": state, "epoch": 3, "global_step": 10, "pytorch-lightning_version": "1.0.0"}
    dropped = {k for k in state if not k.startswith("model.encoder_q.features.")}
    check(checkpoint, "moco", trunk, dropped)


def test_moco_v3(resnet):
    full, trunk = resnet
    head = mlp("base_encoder.fc.")
    extra = {**prefixed(full, "momentum_encoder."), **mlp("predictor.")}
    state = prefixed({**prefixed(trunk, "base_encoder."), **head, **extra}, "module.")
    check({"state_dict": state}, "moco", trunk, set(state) - set(prefixed(prefixed(trunk, "base_encoder."), "module.")))


@pytest.mark.parametrize("variant", ["encoder+projection_head", "backbone+fc-mlp", "resnet+projector", "simclr-v2"])
def test_simclr(resnet, variant):
    full, trunk = resnet
    if variant == "encoder+projection_head":
        head = mlp("projection_head.")
        checkpoint = {"state_dict": {**prefixed(trunk, "encoder."), **head}, "epoch": 100}
    elif variant == "backbone+fc-mlp":  # a common PyTorch SimCLR: the projection MLP replaces the ResNet's fc
        head = mlp("backbone.fc.")
        checkpoint = {"epoch": 100, "arch": "resnet18", "state_dict": {**prefixed(trunk, "backbone."), **head}}
    elif variant == "resnet+projector":
        head = mlp("projector.")
        checkpoint = {"state_dict": {**prefixed(trunk, "resnet."), **head}}
    else:  # SimCLR-v2 converted from TensorFlow: {'resnet': trunk + supervised fc, 'head': contrastive head}
        checkpoint = {"resnet": dict(full), "head": mlp("layers.")}
        head = {"fc.weight", "fc.bias"} | {f"head.{k}" for k in mlp("layers.")}
    check(checkpoint, "simclr", trunk, set(head))


@pytest.mark.parametrize("variant", ["online_network", "online_encoder", "sequential-children"])
def test_byol(resnet, variant):
    full, trunk = resnet
    if variant == "online_network":
        dropped = {
            **mlp("online_network.projector.net."),
            **mlp("online_network.predictor.net."),
            **prefixed(trunk, "target_network.encoder."),
        }
        checkpoint = {"state_dict": {**prefixed(trunk, "online_network.encoder."), **dropped}}
        names = set(dropped)
    elif variant == "online_encoder":  # the whole ResNet wrapped as online_encoder.net (its fc unused by BYOL)
        dropped = {
            **mlp("online_encoder.projector.net."),
            **mlp("online_predictor.net."),
            **prefixed(full, "target_encoder.net."),
        }
        checkpoint = {**prefixed(full, "online_encoder.net."), **dropped}
        names = set(dropped) | {"online_encoder.net.fc.weight", "online_encoder.net.fc.bias"}
    else:  # encoder = nn.Sequential(*list(resnet.children())[:-1]): 0=conv1, 1=bn1, 4..7=layer1..4
        index = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}
        children = {"encoder." + index[k.split(".", 1)[0]] + "." + k.split(".", 1)[1]: v for k, v in trunk.items()}
        head = mlp("projetion.net.")
        checkpoint = {
            "online_network_state_dict": {**children, **head},
            "target_network_state_dict": children,
            "optimizer_state_dict": {"state": {}},
        }
        names = set(head) | {f"target_network_state_dict.{k}" for k in children}
    check(checkpoint, "byol", trunk, names)


@pytest.mark.parametrize("prototypes", ["single", "multi"])
def test_swav(resnet, prototypes):
    _, trunk = resnet
    protos = (
        {"module.prototypes.weight": torch.randn(30, 16)}
        if prototypes == "single"
        else {
            "module.prototypes.prototypes0.weight": torch.randn(30, 16),
            "module.prototypes.prototypes1.weight": torch.randn(20, 16),
        }
    )
    head = {**prefixed(mlp(""), "module.projection_head."), **protos}
    check({**prefixed(trunk, "module."), **head}, "swav", trunk, set(head))


@pytest.mark.parametrize("variant", ["vissl", "trunk.", "model."])
def test_pirl(resnet, variant):
    _, trunk = resnet
    if variant == "vissl":
        heads = {"0.clf.0.weight": torch.randn(128, 512), "0.clf.0.bias": torch.randn(128)}
        model = {"trunk": prefixed(trunk, "_feature_blocks."), "heads": heads}
        checkpoint = {"phase_idx": 3, "classy_state_dict": {"base_model": {"model": model}}}
        dropped = {f"heads.{k}" for k in heads}
    elif variant == "trunk.":
        head = mlp("heads.0.")
        checkpoint = {**prefixed(trunk, "trunk."), **head}
        dropped = set(head)
    else:
        head = mlp("model.heads.0.")
        checkpoint = {**prefixed(trunk, "model."), **head}
        dropped = set(head)
    check(checkpoint, "pirl", trunk, dropped)


@pytest.mark.parametrize("prefix", ["model.trunk.", "model.", "backbone.", "model.backbone."])
def test_lightning(resnet, prefix):
    _, trunk = resnet
    heads = {"model.heads.0.weight": torch.randn(3, 512), "model.heads.0.bias": torch.zeros(3)}
    checkpoint = {
        "epoch": 3,
        "global_step": 120,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": {**prefixed(trunk, prefix), **heads},
    }
    check(checkpoint, "lightning", trunk, set(heads))


def test_lightning_without_markers_by_model_prefix(resnet):
    _, trunk = resnet
    heads = {"model.heads.0.weight": torch.randn(3, 512)}
    check({"state_dict": {**prefixed(trunk, "model."), **heads}}, "lightning", trunk, set(heads))


def test_legacy_densenet_names_are_renamed(densenet):
    _, trunk = densenet
    legacy = {}
    for key, value in trunk.items():
        for new, old in (("norm1.", "norm.1."), ("norm2.", "norm.2."), ("conv1.", "conv.1."), ("conv2.", "conv.2.")):
            if ".denselayer" in key and new in key:
                key = key.replace(new, old)
        legacy[key] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    state, _ = adapt({"state_dict": prefixed(legacy, "module.")})
    assert_trunk(state, trunk)


def test_unknown_layout_and_empty_checkpoints(resnet):
    _, trunk = resnet
    with pytest.raises(CheckpointError, match="unknown checkpoint layout 'dino'"):
        adapt(trunk, "dino")
    with pytest.raises(CheckpointError, match="no tensors"):
        detect_layout({"state_dict": {"epoch": 1}, "lr": 0.1})
    with pytest.raises(CheckpointError, match="no tensors where the moco layout"):
        adapt({"epoch": 1}, "moco")
    with pytest.raises(CheckpointError, match="left no trunk tensors"):
        adapt({"module.queue": torch.zeros(2, 2), "module.encoder_k.conv1.weight": torch.zeros(1)})


# --- archives --------------------------------------------------------------------------------------------


def _bytes(obj: object) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    else:
        tar.addfile(info)


@pytest.fixture
def scratch(tmp_path, monkeypatch) -> Path:
    """Where temporary folders go during the test, so that we can check that nothing is left there."""
    path = tmp_path / "scratch"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


@pytest.mark.parametrize("mode", ["w:gz", "w"], ids=["tar.gz", "tar"])
def test_radiologynet_archive(tmp_path, scratch, resnet, mode):
    full, trunk = resnet
    # The stem, layer1 and fc are enough to check the unwrapping; the whole ResNet would only slow gzip down.
    full = {k: v for k, v in full.items() if k.startswith(("conv1.", "bn1.", "layer1.", "fc."))}
    trunk = {k: v for k, v in full.items() if not k.startswith("fc.")}
    path = tmp_path / ("ResNet18.tar.gz" if mode == "w:gz" else "ResNet18.tar")
    with tarfile.open(path, mode, **({"compresslevel": 1} if mode == "w:gz" else {})) as tar:
        _add(tar, "TL_Weights", kind=tarfile.DIRTYPE)
        _add(tar, "TL_Weights/._ResNet18.pth", b"macOS resource fork")
        _add(tar, "TL_Weights/ResNet18.pth", _bytes({"model_state": prefixed(full, "model."), "epoch": 9}))
        _add(tar, "TL_Weights/README.txt", b"RadiologyNET weights")
    state, dropped, layout = read_trunk(path)
    assert layout == "radiologynet"
    assert_trunk(state, trunk)
    assert sorted(dropped) == ["model.fc.bias", "model.fc.weight"]
    assert list(scratch.iterdir()) == []  # the temporary folder is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, "scratch"])


def _evil_members(tar: tarfile.TarFile, kind: str, outside: Path) -> None:
    if kind == "dotdot":
        _add(tar, "../../outside/evil.pth", b"pwned")
    elif kind == "absolute":
        _add(tar, str(outside / "evil.pth"), b"pwned")
    elif kind == "symlink":
        _add(tar, "weights.pth", kind=tarfile.SYMTYPE, link=str(outside / "evil.pth"))
    elif kind == "hardlink":
        _add(tar, "weights.pth", kind=tarfile.LNKTYPE, link="../../outside/evil.pth")
    elif kind == "device":
        _add(tar, "dev.pth", kind=tarfile.CHRTYPE)
    elif kind == "fifo":
        _add(tar, "pipe.pth", kind=tarfile.FIFOTYPE)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "device", "fifo"])
def test_unsafe_archive_is_refused(tmp_path, scratch, kind):
    trunk = {"conv1.weight": torch.randn(4, 3, 3, 3)}  # refused before it is read: its content does not matter
    outside = tmp_path / "outside"
    outside.mkdir()
    path = tmp_path / "weights.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "model.pth", _bytes({"model_state": trunk}))
        _evil_members(tar, kind, outside)
    with pytest.raises(CheckpointError, match="refused") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    assert list(outside.iterdir()) == []
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "scratch", "weights.tar.gz"]


def _zeros_archive(path: Path, size: int) -> None:
    """A tar.gz whose one member, ``weights.pth``, is ``size`` zero bytes (a few KB compressed)."""

    class Zeros(io.RawIOBase):
        def __init__(self) -> None:
            self.left = size

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            n = min(len(buffer), self.left)
            buffer[:n] = bytes(n)
            self.left -= n
            return n

    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("weights.pth")
        info.size = size
        tar.addfile(info, io.BufferedReader(Zeros()))


@pytest.mark.parametrize("cap", ["1M", "1048576", "1 MiB"])
def test_decompression_bomb_is_refused_at_the_cap(tmp_path, scratch, monkeypatch, cap):
    monkeypatch.setenv("MEDFM_MAX_ARCHIVE_MEMBER", cap)
    path = tmp_path / "bomb.tar.gz"
    _zeros_archive(path, 64 << 20)
    assert path.stat().st_size < (64 << 20) // 100  # 64 MiB of zeros in under 1% of it
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    assert str(info.value) == (
        f"{path}: refused — the archive's member 'weights.pth' expands to {64 << 20} bytes, more than the limit of "
        "1048576 bytes on one member (a decompression bomb, or a file bigger than any published weights: set "
        "MEDFM_MAX_ARCHIVE_MEMBER to allow more); nothing was kept"
    )
    assert list(scratch.iterdir()) == []


def test_member_at_the_cap_is_read(tmp_path, scratch, monkeypatch):
    weights = _bytes({"conv1.weight": torch.ones(4, 3, 3, 3)})
    path = tmp_path / "ok.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "ok.pth", weights)
    monkeypatch.setenv("MEDFM_MAX_ARCHIVE_MEMBER", str(len(weights)))
    assert torch.equal(read_checkpoint(path)["conv1.weight"], torch.ones(4, 3, 3, 3))
    monkeypatch.setenv("MEDFM_MAX_ARCHIVE_MEMBER", str(len(weights) - 1))
    with pytest.raises(CheckpointError, match=f"expands to {len(weights)} bytes, more than the limit"):
        read_checkpoint(path)


def test_streaming_stops_at_the_cap():
    class Counting(io.RawIOBase):
        """An endless stream of zeros that counts what was read."""

        def __init__(self) -> None:
            self.read_bytes = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            buffer[:] = bytes(len(buffer))
            self.read_bytes += len(buffer)
            return len(buffer)

    source, dest = Counting(), io.BytesIO()
    cap = 3_000_000
    assert checkpoints.copy_capped(source, dest, cap) == cap + 1
    assert len(dest.getvalue()) <= cap  # never more than the cap is written
    assert source.read_bytes == cap + 1  # and reading stopped one byte past it
    small = io.BytesIO(b"x" * 10)
    out = io.BytesIO()
    assert checkpoints.copy_capped(small, out, 10) == 10 and out.getvalue() == b"x" * 10


@pytest.mark.parametrize(("text", "size"), [("", 4 << 30), ("8G", 8 << 30), ("500m", 500 << 20), ("123", 123)])
def test_archive_cap_setting(monkeypatch, text, size):
    monkeypatch.setenv("MEDFM_MAX_ARCHIVE_MEMBER", text)
    assert checkpoints.max_archive_member() == size


def test_archive_cap_setting_that_is_not_a_size(monkeypatch):
    monkeypatch.setenv("MEDFM_MAX_ARCHIVE_MEMBER", "lots")
    with pytest.raises(ConfigError, match="MEDFM_MAX_ARCHIVE_MEMBER='lots': give a number of bytes"):
        checkpoints.max_archive_member()


def test_archive_with_several_or_no_weight_files(tmp_path, scratch):
    trunk = {"conv1.weight": torch.randn(4, 3, 3, 3)}
    several = tmp_path / "several.tar.gz"
    with tarfile.open(several, "w:gz") as tar:
        _add(tar, "a.pth", _bytes(trunk))
        _add(tar, "b.pt", _bytes(trunk))
    with pytest.raises(CheckpointError, match=r"several weight files \(members: \['a.pth', 'b.pt'\]\)"):
        read_checkpoint(several)
    none = tmp_path / "none.tar"
    with tarfile.open(none, "w") as tar:
        _add(tar, "notes.txt", b"a")
        _add(tar, "more.txt", b"b")
    with pytest.raises(CheckpointError, match="no weight file"):
        read_checkpoint(none)
    legacy = tmp_path / "legacy.pth"  # torch.save before 0.4 wrote a tar of these members
    with tarfile.open(legacy, "w") as tar:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            _add(tar, name, b"x")
    with pytest.raises(CheckpointError, match="legacy tar format"):
        read_checkpoint(legacy)
    assert list(scratch.iterdir()) == []


def write_marker(path: str) -> str:
    Path(path).write_text("code ran")
    return path


class MarkerPayload:
    """Unpickling this calls ``write_marker(path)``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (write_marker, (self.path,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_code_carrying_pickle_inside_an_archive_is_refused(tmp_path, scratch):
    marker = tmp_path / "marker.txt"
    payload = pickle.dumps({"conv1.weight": torch.zeros(2), "x": MarkerPayload(marker)})
    path = tmp_path / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "model.pth", payload)
    with pytest.raises(CheckpointError, match="refused") as info:
        read_checkpoint(path)
    assert f"{path}[model.pth]" in str(info.value)
    assert "medfm-archive-" not in str(info.value)
    assert not marker.exists()
    assert list(scratch.iterdir()) == []


def test_pth_tar_that_is_a_torch_file_is_not_an_archive(tmp_path, resnet):
    # Many checkpoints are named .pth.tar but are ordinary torch files.
    _, trunk = resnet
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": prefixed(trunk, "module.encoder_q."), "arch": "resnet18"}, path)
    state, dropped, layout = read_trunk(path)
    assert layout == "moco" and dropped == []
    assert_trunk(state, trunk)
    assert os.path.getsize(path) > 0
