"""Safe checkpoint loading: every known layout, coverage reports, and refusal of code-carrying pickles."""

from __future__ import annotations

import copy
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medfm.errors import CheckpointError
from medfm.models import load_model
from medfm.models.checkpoints import read_checkpoint, read_trunk
from medfm.models.transfer import load_weights, transfer_weights

MODEL = "resnet10-3d"


@pytest.fixture(scope="module")
def source_state() -> dict[str, torch.Tensor]:
    """The state dict of a seeded resnet10-3d: what every checkpoint in this file holds."""
    model = load_model(MODEL, None, seed=11).model
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def _target_template() -> torch.nn.Module:
    return load_model(MODEL, None, seed=12).model


@pytest.fixture
def target(_target_template):
    """A resnet10-3d initialised from another seed, so a successful load changes every tensor."""
    return copy.deepcopy(_target_template)


def assert_state_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(state)
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def test_target_differs_from_source_before_loading(target, source_state):
    # Guards every equality test below: the model does not start out holding the saved tensors.
    assert not torch.equal(target.state_dict()["conv1.weight"], source_state["conv1.weight"])


def test_fmcib_layout(tmp_path, target, source_state):
    path = tmp_path / "model_weights.torch"
    head = {"0.weight": torch.randn(2, 512), "0.bias": torch.zeros(2)}
    torch.save({"trunk_state_dict": source_state, "head_state_dict": head}, path)
    report = load_weights(target, path)
    assert report.coverage == 1.0
    assert report.strip_prefix == "" and report.add_prefix == ""
    assert report.left_at_init == [] and report.unused == [] and report.mismatched == []
    assert report.transferred == sorted(source_state) and report.adapted == []
    assert_state_equal(target, source_state)


def test_lightning_layout_drops_heads_by_rule(tmp_path, target, source_state):
    state = {f"model.trunk.{k}": v for k, v in source_state.items()}
    state["model.heads.0.weight"] = torch.randn(3, 512)
    state["model.heads.0.bias"] = torch.zeros(3)
    path = tmp_path / "epoch=3.ckpt"
    torch.save({"state_dict": state, "epoch": 3, "global_step": 120}, path)
    report = load_weights(target, path)
    assert report.coverage == 1.0
    assert report.layout == "lightning"
    assert sorted(report.dropped) == ["model.heads.0.bias", "model.heads.0.weight"]
    assert report.unused == []
    assert report.left_at_init == []
    assert_state_equal(target, source_state)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "in-state_dict"])
def test_ddp_module_prefix(tmp_path, target, source_state, wrapped):
    state = {f"module.{k}": v for k, v in source_state.items()}
    path = tmp_path / "ddp.pt"
    torch.save({"state_dict": state} if wrapped else state, path)
    report = load_weights(target, path)
    assert report.coverage == 1.0
    assert report.unused == []
    assert_state_equal(target, source_state)


def test_plain_state_dict(tmp_path, target, source_state):
    path = tmp_path / "plain.pt"
    torch.save(source_state, path)
    report = load_weights(target, path)
    assert report.coverage == 1.0
    assert_state_equal(target, source_state)


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.bin"])
def test_safetensors_file(tmp_path, target, source_state, name):
    # ``.bin`` checks that a safetensors file is recognised by its header, not only by its suffix.
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in source_state.items()}, str(path))
    assert path.read_bytes()[8:9] == b"{"
    report = load_weights(target, path)
    assert report.coverage == 1.0
    assert_state_equal(target, source_state)


def test_shape_mismatch_is_reported_and_not_loaded(tmp_path, target, source_state):
    before = target.state_dict()["conv1.weight"].clone()
    state = dict(source_state)
    state["conv1.weight"] = torch.ones(64, 1, 3, 3, 3)
    path = tmp_path / "mismatch.pt"
    torch.save(state, path)
    report = load_weights(target, path)  # conv1 is a small share of the model: default min_coverage passes
    assert report.mismatched == [("conv1.weight", (64, 1, 3, 3, 3), (64, 1, 7, 7, 7))]
    assert "conv1.weight" not in report.transferred and "conv1.weight" in report.left_at_init
    total = sum(v.numel() for v in source_state.values())
    assert report.coverage == pytest.approx(1 - 64 * 343 / total)
    assert torch.equal(target.state_dict()["conv1.weight"], before)
    assert torch.equal(target.state_dict()["layer1.0.conv1.weight"], source_state["layer1.0.conv1.weight"])


def test_low_coverage_raises_and_leaves_model_untouched(tmp_path, target, source_state):
    partial = {k: v for k, v in source_state.items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pt"
    torch.save(partial, path)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="cover"):
        load_weights(target, path)
    assert_state_equal(target, before)


def test_min_coverage_zero_loads_partially(tmp_path, target, source_state):
    partial = {k: v for k, v in source_state.items() if not k.startswith("layer4.")}
    path = tmp_path / "partial.pt"
    torch.save(partial, path)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    report = load_weights(target, path, min_coverage=0)
    layer4 = sorted(k for k in source_state if k.startswith("layer4."))
    assert report.left_at_init == layer4
    assert report.transferred == sorted(partial)
    expected = sum(v.numel() for v in partial.values()) / sum(v.numel() for v in source_state.values())
    assert report.coverage == pytest.approx(expected)
    assert 0.05 < report.coverage < 0.95
    got = target.state_dict()
    for key in partial:
        assert torch.equal(got[key], source_state[key]), key
    for key in layer4:
        assert torch.equal(got[key], before[key]), key


def test_report_summary_and_dict(tmp_path, target, source_state):
    report = load_weights(target, _saved(tmp_path, {"trunk." + k: v for k, v in source_state.items()}))
    assert report.strip_prefix == "trunk."
    data = report.to_dict()
    assert data["transferred"] == sorted(source_state)
    assert data["coverage"] == 1.0
    n = len(source_state)
    assert report.summary().splitlines()[1].startswith(f"transferred {n} of {n} tensors (100.00% of the model's values)")


def test_own_weights_load_exactly_while_a_transfer_adapts_channels(tmp_path, target, source_state):
    # a 3-channel first convolution: load_weights (a model's own weights) leaves it; transfer_weights sums it
    state = {**source_state, "conv1.weight": source_state["conv1.weight"].repeat(1, 3, 1, 1, 1) / 3}
    path = _saved(tmp_path, state)
    report = load_weights(target, path)
    assert report.mismatched == [("conv1.weight", (64, 3, 7, 7, 7), (64, 1, 7, 7, 7))] and report.adapted == []
    report = transfer_weights(path, target)
    assert report.adapted == [("conv1.weight", "summed 3→1 input channels")]
    torch.testing.assert_close(target.state_dict()["conv1.weight"], source_state["conv1.weight"])


def _saved(tmp_path, state: dict) -> Path:
    path = tmp_path / "state.pt"
    torch.save(state, path)
    return path


# --- safety ------------------------------------------------------------------------------------------------


def write_marker(path: str) -> str:
    Path(path).write_text("code ran")
    return path


class MarkerPayload:
    """Unpickling this calls ``write_marker(path)``: the file appears only if code from the pickle ran."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (write_marker, (self.path,))


class ShellPayload:
    """Unpickling this runs ``os.system('touch path')``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", [MarkerPayload, ShellPayload], ids=["function", "os.system"])
@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_code_carrying_pickle_is_refused_before_it_runs(tmp_path, payload, writer):
    marker = tmp_path / "marker.txt"
    path = tmp_path / "evil.pt"
    obj = {"conv1.weight": torch.zeros(2), "x": payload(marker)}
    if writer == "torch.save":
        torch.save(obj, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    with pytest.raises(CheckpointError, match="refused") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_weights(torch.nn.Linear(2, 2), path)
    assert not marker.exists()

    # Control: the payload is live, so the assertions above could fail.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as fh:
            pickle.load(fh)  # noqa: S301 - deliberately running the payload in the control
    assert marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        np.random.default_rng(0).bytes(4096),
        np.random.default_rng(17).bytes(1000),
        b"hello world, this is not a checkpoint\n" * 8,
        b"<!DOCTYPE html><html><body>404 Not Found</body></html>\n",
        b"",
    ],
    ids=["random", "random-17", "text", "html", "empty"],
)
def test_not_a_checkpoint_names_the_file(tmp_path, content):
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert str(path) in message
    assert "not a readable" in message
    assert "refused" not in message


def test_truncated_torch_file(tmp_path, source_state):
    path = tmp_path / "cut.pt"
    torch.save(source_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_broken_safetensors_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        read_checkpoint(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(CheckpointError, match="file not found") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value)


def test_checkpoint_that_is_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        read_checkpoint(path)


def test_checkpoint_without_tensors():
    with pytest.raises(CheckpointError, match="no tensors"):
        read_trunk({"state_dict": {"epoch": 3, "lr": 0.1}})


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("fmt", ["fmcib-torch", "safetensors", "in-memory"])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, target, source_state, bad, fmt):
    state = {k: v.clone() for k, v in source_state.items()}
    state["layer2.0.conv1.weight"].view(-1)[[3, 7]] = bad
    before = {k: v.clone() for k, v in target.state_dict().items()}
    if fmt == "fmcib-torch":
        src = tmp_path / "model_weights.torch"
        torch.save({"trunk_state_dict": state}, src)
        name = "'trunk_state_dict.layer2.0.conv1.weight'"
    elif fmt == "safetensors":
        src = tmp_path / "w.safetensors"
        save_file(state, src)
        name = "'layer2.0.conv1.weight'"
    else:
        src = state
        name = "'layer2.0.conv1.weight'"
    kind = "NaN" if bad != bad else "Inf"
    with pytest.raises(CheckpointError) as info:
        load_weights(target, src)
    assert str(info.value) == (
        f"{src if fmt != 'in-memory' else 'the checkpoint'}: tensor {name} holds 2 of "
        f"{state['layer2.0.conv1.weight'].numel()} values that are not finite ({kind}); "
        "the weights are damaged and are refused"
    )
    assert_state_equal(target, before)  # nothing was loaded


def test_non_finite_weights_inside_an_archive_name_the_member(tmp_path, source_state):
    import tarfile

    state = {k: v.clone() for k, v in source_state.items()}
    state["fc.bias"] = torch.tensor([1.0, float("nan")])
    weights = tmp_path / "resnet.pth"
    torch.save(state, weights)
    archive = tmp_path / "weights.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(weights, arcname="model/resnet.pth")
    with pytest.raises(CheckpointError, match=r"\[model/resnet\.pth\]: tensor 'fc\.bias' holds 1 of 2 values"):
        read_checkpoint(archive)


def test_finite_integer_and_empty_tensors_pass(tmp_path):
    path = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2), "steps": torch.tensor(3), "empty": torch.zeros(0), "meta": {"epoch": 1}}, path)
    assert set(read_checkpoint(path)) == {"w", "steps", "empty", "meta"}


def test_infinities_in_training_state_are_not_damaged_weights(tmp_path):
    # a Lightning checkpoint: ModelCheckpoint keeps kth_value = inf until it has a best value; the weights are fine
    checkpoint = {
        "state_dict": {"w": torch.ones(2)},
        "callbacks": {"ModelCheckpoint{}": {"kth_value": torch.tensor(float("inf"))}},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.tensor([float("inf")])}}}],
    }
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    checkpoint["state_dict"]["w"] = torch.tensor([1.0, float("nan")])
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=r"tensor 'state_dict\.w' holds 1 of 2 values that are not finite \(NaN\)"):
        read_checkpoint(path)
