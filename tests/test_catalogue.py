"""The catalogue of published checkpoints: every entry builds, names a known layout and profile, and a file in
the entry's layout (made here) downloads from a local server into the cache and loads with its heads dropped."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from torch import nn

from medfm.cli import main
from medfm.data.profiles import get_profile
from medfm.errors import WeightsError
from medfm.models import catalogue, hub
from medfm.models.adapters import LAYOUTS
from medfm.models.registry import get_entry, list_models, load_model
from test_hub import local_only, serve  # noqa: F401 - local_only: autouse fixture, an empty cache, 127.0.0.1 only

CATALOGUE = sorted(
    name
    for name in list_models()
    if name.startswith(("radiologynet-", "moco", "mimic-", "pirl-", "simclr-", "byol-", "swav-"))
)


def test_catalogue_holds_the_studies_checkpoints():
    assert len([n for n in CATALOGUE if n.startswith("radiologynet-")]) == len(catalogue.RADIOLOGYNET) == 10
    assert {"pirl-resnet50", "mocov2-resnet50", "simclr-v1-resnet50", "byol-resnet50", "swav-resnet50"} <= set(
        CATALOGUE
    )
    assert {"moco-cxr-resnet18", "moco-cxr-densenet121"} <= set(CATALOGUE)
    assert {f"mimic-chexpert-densenet121-lr{lr}" for lr in ("0.01", "0.1", "1.0")} <= set(CATALOGUE)
    files = [get_entry(n).weights.filename for n in list_models() if get_entry(n).weights is not None]
    assert len(files) == len(set(files)), "two entries would share one cache file"


@pytest.mark.parametrize("name", CATALOGUE)
def test_entry_is_complete(name):
    entry = get_entry(name)
    assert entry.dims == 2 and entry.weights is not None
    assert entry.weights.layout in LAYOUTS
    assert entry.weights.url.startswith(("http://", "https://"))
    assert get_profile(entry.profile).name == entry.profile
    arch = name.removeprefix("radiologynet-") if name.startswith("radiologynet-") else None
    if arch:
        assert entry.profile == "radiologynet-224" and entry.weights.layout == "radiologynet"
        assert entry.feature_dim == get_entry(arch).feature_dim
        assert entry.weights.url == f"http://radiologynet.riteh.hr/models/{catalogue.RADIOLOGYNET[arch]}.tar.gz"


def _radiologynet_archive(model: nn.Module, classes: int = 5) -> bytes:
    """RadiologyNET's packaging: a .tar.gz holding a .pth with ``model_state`` under a ``model.`` wrapper + fc."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["model.fc.weight"] = torch.randn(classes, 512)
    state["model.fc.bias"] = torch.randn(classes)
    payload = io.BytesIO()
    torch.save({"model_state": state, "epoch": 30}, payload)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("TL_Weights/ResNet18.pth")
        info.size = len(payload.getvalue())
        tar.addfile(info, io.BytesIO(payload.getvalue()))
    return out.getvalue()


def test_radiologynet_download_and_load(tmp_path, capsys):
    torch.manual_seed(3)
    source = get_entry("resnet18").builder()
    archive = _radiologynet_archive(source)
    for server in serve(honour_range=True, content=archive):
        assert main(["weights", "download", "radiologynet-resnet18", "--url", server.url(), "--quiet"]) == 0
    cached = tmp_path / "home" / "weights" / "radiologynet-ResNet18.tar.gz"
    assert cached.read_bytes() == archive
    assert f"radiologynet-resnet18: {cached} (SHA-256 {hub.sha256_of(cached)})" in capsys.readouterr().out

    loaded = load_model("radiologynet-resnet18")  # 'published': the cached archive, in the radiologynet layout
    assert loaded.report.layout == "radiologynet" and loaded.report.coverage == 1.0
    assert sorted(loaded.report.dropped) == ["model.fc.bias", "model.fc.weight"]
    expected = source.state_dict()
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert loaded.weights_sha256 == hub.sha256_of(cached)

    assert main(["weights", "list"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("radiologynet-resnet18:"))
    assert "[cached]" in line and "layout radiologynet, profile radiologynet-224" in line


def test_mimic_chexpert_lightning_checkpoint_loads_in_the_moco_layout(tmp_path):
    torch.manual_seed(4)
    source = get_entry("densenet121").builder()
    state = {f"model.encoder_q.{k}": v for k, v in source.state_dict().items()}
    state["model.encoder_q.classifier.weight"] = torch.randn(128, 1024)
    state["model.encoder_q.classifier.bias"] = torch.randn(128)
    state["model.queue"] = torch.randn(128, 16)
    name = "mimic-chexpert-densenet121-lr0.1"
    path = hub.cached_path(get_entry(name).weights)
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 99, "global_step": 5, "pytorch-lightning_version": "1.0.8"}, path)

    loaded = load_model(name)
    assert loaded.report.layout == "moco" and loaded.report.coverage == 1.0
    assert set(loaded.report.dropped) == {
        "model.encoder_q.classifier.weight",
        "model.encoder_q.classifier.bias",
        "model.queue",
    }
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), source.eval()(x), atol=1e-6)


@pytest.mark.parametrize("name", ["simclr-v1-resnet50", "byol-resnet50"])
def test_checkpoints_published_for_other_frameworks_say_how_to_convert(name, capsys):
    spec = get_entry(name).weights
    assert spec.convert
    with pytest.raises(WeightsError, match="convert") as err:
        load_model(name)
    assert str(hub.cached_path(spec)) in str(err.value) and spec.url in str(err.value)
    assert main(["weights", "download", name, "--quiet"]) == 2  # refused before any connection is tried
    assert "convert" in capsys.readouterr().err
    assert not Path(hub.cached_path(spec)).exists()
