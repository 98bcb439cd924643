"""Fine-tuning: the Cox loss, the head, metrics, freezing, initialisation, best-weight restoring, class balance,
the data module's splits, and ``medfm finetune fit|sweep`` / ``medfm predict`` end to end.

Runs are tiny: four phantom CTs (16 lesion rows) cut into the ``fmcib`` store with a 2-voxel margin, cropped to
16³ views for a quarter-width 3D ResNet10 on the CPU.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from safetensors.torch import save_file
from torch import nn

import medfm.finetune.module as ft_module
from medfm.cli import main
from medfm.data import profiles
from medfm.data.splits import assign_splits
from medfm.data.synthetic import make_demo_dataset
from medfm.errors import ManifestError, ModelError
from medfm.evaluate.survival import _neg_log_partial_likelihood
from medfm.finetune.data import FinetuneData
from medfm.finetune.losses import cox_loss
from medfm.finetune.module import FinetuneModule, mlp_head, task_metrics
from medfm.finetune.outputs import load_finetuned, predict_manifest
from medfm.models import registry
from medfm.models.backbones import resnet3d
from medfm.pretrain.export import export_trunk
from medfm.train.callbacks import BestWeights
from medfm.train.sampler import EpochSampler

SMALL = {"depth": 10, "widen_factor": 0.25}  # 128-d features
VIEW = [
    {"op": "shift", "max_voxels": 2, "p": 1.0},
    {"op": "center_crop", "size": [16, 16, 16]},
    {"op": "flip", "axes": [0, 1, 2]},
]
EVAL_VIEW = [{"op": "center_crop", "size": [16, 16, 16]}]
SPLITS = {"P000": "train", "P001": "train", "P002": "val", "P003": "test"}
FROZEN_UNTIL_LAYER2 = ["conv1", "bn1", "act", "maxpool", "layer1", "layer2"]


@pytest.fixture(scope="module", autouse=True)
def isolated_registry(tmp_path_factory):
    """A private $MEDFM_HOME for the module; models and profiles registered here are forgotten afterwards."""
    models, known = dict(registry._REGISTRY), dict(profiles._PROFILES)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MEDFM_HOME", str(tmp_path_factory.mktemp("medfm_home")))
        yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(models)
    profiles._PROFILES.clear()
    profiles._PROFILES.update(known)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """Four phantoms (16 rows): P000-P001 train, P002 val, P003 test; malignant = solid or part-solid (2 of 4
    lesions per patient), rare = calcified (1 of 4), a float ``size`` and survival ``time``/``event``."""
    path = make_demo_dataset(tmp_path_factory.mktemp("finetune_demo"), n_patients=4)
    table = pd.read_csv(path)
    table["malignant"] = table["lesion_type"].isin(["solid", "part-solid"]).astype(int)
    table["rare"] = (table["lesion_type"] == "calcified").astype(int)
    table["split"] = table["patient_id"].map(SPLITS)
    rng = np.random.default_rng(0)
    table["size"] = np.round(rng.normal(10.0, 2.0, len(table)), 3)
    table["time"] = np.round(rng.uniform(1.0, 10.0, len(table)), 2)
    table["event"] = (np.arange(len(table)) % 3 != 0).astype(int)
    path = path.with_name("ft.csv")
    table.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One patch-store cache for every run of the module (the store is cut once)."""
    return tmp_path_factory.mktemp("stores")


def data_module(manifest: Path, cache_dir: Path, **kwargs: object) -> FinetuneData:
    args = {
        "manifest": str(manifest),
        "task": "binary",
        "label_column": "malignant",
        "split_column": "split",
        "profile": "fmcib",
        "margin": 2,
        "batch_size": 4,
        "cache_dir": str(cache_dir),
        "view": VIEW,
        "eval_view": EVAL_VIEW,
        **kwargs,
    }
    return FinetuneData(**args)


def write_config(
    folder: Path,
    manifest: Path,
    cache_dir: Path,
    *,
    task: str = "binary",
    epochs: int = 1,
    data: dict | None = None,
    **model: object,
) -> tuple[Path, Path]:
    """A run config in ``folder``; returns (config path, the run's default_root_dir)."""
    root = folder / "run"
    config = {
        "trainer": {
            "default_root_dir": str(root),
            "max_epochs": epochs,
            "accelerator": "cpu",
            "enable_model_summary": False,
            "enable_progress_bar": False,
            "log_every_n_steps": 1,
        },
        "model": {
            "task": task,
            "trunk": "resnet3d",
            "trunk_args": SMALL,
            "head": [32, 1],
            "init": "random",
            "lr_trunk": 1.0e-3,
            "lr_head": 1.0e-3,
            "patience": 5,
            "n_bootstrap": 50,
            **model,
        },
        "data": {
            "manifest": str(manifest),
            "task": task,
            "label_column": "malignant",
            "split_column": "split",
            "profile": "fmcib",
            "margin": 2,
            "batch_size": 4,
            "cache_dir": str(cache_dir),
            "view": VIEW,
            "eval_view": EVAL_VIEW,
            **(data or {}),
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, root


def trainer(**kwargs: object) -> Trainer:
    """A quiet CPU trainer without logger or checkpoints."""
    args = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "use_distributed_sampler": False,
        "num_sanity_val_steps": 0,
        **kwargs,
    }
    return Trainer(**args)


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ Cox loss


def test_cox_loss_matches_the_numpy_breslow_reference_with_ties():
    rng = np.random.default_rng(0)
    risk = rng.normal(size=12)
    time = np.array([5.0, 3.0, 3.0, 8.0, 1.0, 3.0, 5.0, 9.0, 2.0, 2.0, 7.0, 4.0])  # tied times, tied events
    event = np.array([1, 1, 0, 1, 0, 1, 1, 0, 1, 1, 0, 1], dtype=float)
    reference, _ = _neg_log_partial_likelihood(risk, time, event)  # a sum over events; cox_loss averages
    loss = cox_loss(torch.tensor(risk), torch.tensor(time), torch.tensor(event))
    assert float(loss) == pytest.approx(reference / event.sum(), rel=1e-5)
    # The gradient too (the reference's is of the sum).
    risk_t = torch.tensor(risk, dtype=torch.float32, requires_grad=True)
    cox_loss(risk_t, torch.tensor(time), torch.tensor(event)).backward()
    _, grad = _neg_log_partial_likelihood(risk, time, event)
    np.testing.assert_allclose(risk_t.grad.numpy(), grad / event.sum(), rtol=1e-4, atol=1e-6)


def test_cox_loss_without_events_is_zero_with_a_graph():
    risk = torch.randn(5, requires_grad=True)
    loss = cox_loss(risk, torch.arange(5.0), torch.zeros(5))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(risk.grad, torch.zeros(5))


def test_cox_loss_is_lower_when_earlier_events_have_higher_risk():
    time = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    event = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    concordant = cox_loss(-time, time, event)  # earlier event → higher risk
    discordant = cox_loss(time, time, event)
    flat = cox_loss(torch.zeros(5), time, event)
    assert float(concordant) < float(flat) < float(discordant)


# ------------------------------------------------------------------------------------------ head and metrics


def test_mlp_head_layers_and_shapes():
    head = mlp_head(64, [32, 16, 3], dropout=0.1)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 16), (16, 3)]
    assert head(torch.randn(5, 64)).shape == (5, 3)
    assert [type(m) for m in mlp_head(64, [1])] == [nn.Linear]
    assert [type(m) for m in mlp_head(64, [8, 1])] == [nn.Linear, nn.ReLU, nn.Linear]  # no dropout by default


def test_head_accepts_fmcib_notation_and_checks_the_output_width():
    fmcib = FinetuneModule(task="multiclass", num_classes=8, trunk_args=SMALL, head=[128, 256, 8])
    plain = FinetuneModule(task="multiclass", num_classes=8, trunk_args=SMALL, head=[256, 8])
    assert fmcib.feature_dim == 128
    shapes = [(m.in_features, m.out_features) for m in fmcib.head if isinstance(m, nn.Linear)]
    assert shapes == [(128, 256), (256, 8)]
    assert [type(m) for m in fmcib.head] == [type(m) for m in plain.head]
    assert fmcib(torch.zeros(2, 1, 16, 16, 16)).shape == (2, 8)
    default = FinetuneModule(task="binary", trunk_args=SMALL)
    assert [(m.in_features, m.out_features) for m in default.head] == [(128, 1)]
    with pytest.raises(ValueError, match="must end in 1 output"):
        FinetuneModule(task="binary", trunk_args=SMALL, head=[32, 2])
    with pytest.raises(ValueError, match="must end in 8 output"):
        FinetuneModule(task="multiclass", num_classes=8, trunk_args=SMALL, head=[128, 32, 4])
    with pytest.raises(ValueError, match="task="):
        FinetuneModule(task="ranking", trunk_args=SMALL)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_task_metrics_on_hand_made_values():
    proba = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    y = np.array([[0.0], [1.0], [1.0], [0.0]])
    binary = task_metrics("binary", proba, y)
    # positives 0.8, 0.4 against negatives 0.1, 0.7: 3 of 4 pairs ordered; argmax is right on rows 0 and 1
    assert binary["auroc"] == pytest.approx(0.75)
    assert binary["balanced_accuracy"] == pytest.approx(0.5)
    assert set(binary) == {"auroc", "average_precision", "balanced_accuracy"}
    one_class = task_metrics("binary", proba, y, idx=np.array([1, 2]))
    assert one_class == {"balanced_accuracy": pytest.approx(0.5)}  # no AUROC of one class

    regression = task_metrics("regression", np.array([[1.0], [2.0], [3.0]]), np.array([[1.0], [3.0], [5.0]]))
    assert regression["mae"] == pytest.approx(1.0)
    assert regression["rmse"] == pytest.approx(np.sqrt(5 / 3))
    assert regression["r2"] == pytest.approx(1 - 5 / 8)

    target = np.array([[1.0, 1.0], [2.0, 1.0], [3.0, 0.0]])
    assert task_metrics("survival", np.array([[3.0], [2.0], [1.0]]), target)["c_index"] == pytest.approx(1.0)
    assert task_metrics("survival", np.array([[1.0], [2.0], [3.0]]), target)["c_index"] == pytest.approx(0.0)
    assert task_metrics("survival", np.array([[3.0], [1.0], [2.0]]), target)["c_index"] == pytest.approx(2 / 3)


# ------------------------------------------------------------------------------------------ freezing


def test_freeze_trunk_and_trunk_until_a_block():
    whole = FinetuneModule(trunk_args=SMALL, freeze="trunk")
    assert not any(p.requires_grad for p in whole.trunk.parameters())
    assert all(p.requires_grad for p in whole.head.parameters())

    part = FinetuneModule(trunk_args=SMALL, freeze="trunk-until-layer2")
    assert part.frozen == FROZEN_UNTIL_LAYER2
    for name, child in part.trunk.named_children():
        grads = {p.requires_grad for p in child.parameters()}
        if grads:
            assert grads == {name not in FROZEN_UNTIL_LAYER2}, name
    assert all(p.requires_grad for p in part.head.parameters())

    with pytest.raises(ValueError, match="no block 'layer9'") as err:
        FinetuneModule(trunk_args=SMALL, freeze="trunk-until-layer9")
    assert "'layer2'" in str(err.value) and "'layer4'" in str(err.value)  # the blocks it has
    with pytest.raises(ValueError, match="allowed none, trunk"):
        FinetuneModule(trunk_args=SMALL, freeze="head")


class RecordModes(Callback):
    """Which trunk blocks are in training mode at each training step."""

    def __init__(self) -> None:
        self.modes: list[dict[str, bool]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.modes.append({name: child.training for name, child in pl_module.trunk.named_children()})


def test_frozen_blocks_stay_in_eval_mode_while_training(manifest, cache_dir):
    torch.manual_seed(0)
    module = FinetuneModule(trunk_args=SMALL, head=[16, 1], freeze="trunk-until-layer2", patience=None)
    before = state_of(module)
    record = RecordModes()
    fit = trainer(max_epochs=2, limit_train_batches=1, callbacks=[record])  # validation between the epochs
    fit.fit(module, datamodule=data_module(manifest, cache_dir))
    assert len(record.modes) == 2
    for modes in record.modes:
        assert {n for n, training in modes.items() if not training} == set(FROZEN_UNTIL_LAYER2)
    after = module.state_dict()
    for key in before:
        block = key.split(".")[1] if key.startswith("trunk.") else "head"
        if block in FROZEN_UNTIL_LAYER2:  # weights and batch-norm statistics alike
            assert torch.equal(after[key], before[key]), key
    assert not torch.equal(after["trunk.layer3.0.bn1.running_mean"], before["trunk.layer3.0.bn1.running_mean"])
    assert not torch.equal(after["trunk.layer4.0.conv1.weight"], before["trunk.layer4.0.conv1.weight"])


# ------------------------------------------------------------------------------------------ initialisation


def test_init_from_a_checkpoint_path(tmp_path):
    torch.manual_seed(1)
    source = resnet3d(**SMALL)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()  # far from any fresh init
    path = tmp_path / "trunk.pt"
    torch.save(source.state_dict(), path)
    module = FinetuneModule(trunk_args=SMALL, init=str(path))
    assert module.init_report.coverage == pytest.approx(1.0)
    assert states_equal(module.trunk.state_dict(), source.state_dict())
    random = FinetuneModule(trunk_args=SMALL, init="random")
    assert random.init_report is None
    assert not torch.equal(random.trunk.conv1.weight, source.conv1.weight)


def test_init_from_a_registered_model(tmp_path):
    torch.manual_seed(2)
    trunk = resnet3d(**SMALL)
    checkpoint = {
        "state_dict": {f"trunk.{k}": v for k, v in trunk.state_dict().items()},
        "hyper_parameters": {"trunk": "resnet3d", "trunk_args": SMALL, "method": "simclr"},
        "datamodule_hyper_parameters": {"profile": "fmcib", "store": None},
        "epoch": 0,
        "global_step": 1,
    }
    ckpt = tmp_path / "pretrain.ckpt"
    torch.save(checkpoint, ckpt)
    card = export_trunk(ckpt, "test-ft-init")
    assert card.parent == Path(os.environ["MEDFM_HOME"]) / "models"
    module = FinetuneModule(trunk_args=SMALL, init="test-ft-init")
    assert module.init_report.coverage == pytest.approx(1.0)
    assert states_equal(module.trunk.state_dict(), trunk.state_dict())

    # A hand-written card with its weight file in $MEDFM_HOME/weights works alike.
    torch.manual_seed(3)
    other = resnet3d(**SMALL)
    home = Path(os.environ["MEDFM_HOME"])
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(home / "weights" / "test-ft-hand.st"))
    hand = {
        "name": "test-ft-hand",
        "trunk": {"name": "resnet3d", "args": SMALL, "in_channels": 1},
        "feature_dim": 128,
        "profile": "fmcib",
        "profile_spec": profiles.FMCIB.to_dict(),
        "dims": 3,
        "weights": "test-ft-hand.st",
    }
    (home / "models" / "test-ft-hand.json").write_text(json.dumps(hand))
    module = FinetuneModule(trunk_args=SMALL, init="test-ft-hand")
    assert states_equal(module.trunk.state_dict(), other.state_dict())


def test_init_published_without_weights_raises_clearly():
    with pytest.raises(ValueError, match="resnet10-3d has no weights"):
        FinetuneModule(trunk="resnet10-3d", init="published")
    with pytest.raises(ModelError, match="published") as err:  # resnet3d is an architecture, not a model
        FinetuneModule(trunk="resnet3d", trunk_args=SMALL, init="published")
    assert "resnet3d" in str(err.value)


# ------------------------------------------------------------------------------------------ best weights


class RecordStates(Callback):
    """A copy of the weights at each validation."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.states.append(state_of(pl_module))


def test_best_weights_are_restored_after_fit(manifest, cache_dir, monkeypatch):
    scripted = iter([0.5, 0.9, 0.6])
    monkeypatch.setattr(ft_module, "task_metrics", lambda task, output, target, idx=None: {"auroc": next(scripted)})
    torch.manual_seed(0)
    module = FinetuneModule(trunk_args=SMALL, head=[16, 1], lr_trunk=1e-2, lr_head=1e-2, patience=None)
    record = RecordStates()
    fit = trainer(max_epochs=3, limit_train_batches=1, callbacks=[record])
    fit.fit(module, datamodule=data_module(manifest, cache_dir))
    assert [row["val/auroc"] for row in module.history] == [0.5, 0.9, 0.6]
    assert len(record.states) == 3
    assert not states_equal(record.states[1], record.states[2])  # the last epoch trained on
    assert states_equal(state_of(module), record.states[1])
    assert module.best == {"epoch": 1, "val/auroc": pytest.approx(0.9)}
    (best,) = [c for c in fit.callbacks if isinstance(c, BestWeights)]
    assert best.best_epoch == 1 and best.monitor == "val/auroc" and best.mode == "max"
    assert states_equal(best.state, record.states[1])  # a deep copy: later steps did not change it
    restored = BestWeights("val/auroc")
    restored.load_state_dict(best.state_dict())
    assert restored.best == pytest.approx(0.9) and restored.best_epoch == 1


def test_best_weights_minimise_and_skip_sanity_and_nan():
    """Driven by hand with a fake trainer: lower is better for mae, NaN and sanity checks are ignored."""

    class FakeTrainer:
        sanity_checking = False
        current_epoch = 0
        callback_metrics: dict[str, torch.Tensor] = {}

    net = nn.Linear(2, 1)
    net.best = {}
    callback = BestWeights("val/mae", mode="min")
    fake = FakeTrainer()
    copies = []
    for epoch, value in enumerate([3.0, 2.0, float("nan"), 2.5]):
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        copies.append(state_of(net))
        fake.current_epoch, fake.callback_metrics = epoch, {"val/mae": torch.tensor(value)}
        callback.on_validation_end(fake, net)
    fake.sanity_checking, fake.callback_metrics = True, {"val/mae": torch.tensor(0.0)}
    callback.on_validation_end(fake, net)
    assert callback.best == 2.0 and callback.best_epoch == 1
    callback.on_fit_end(fake, net)
    assert states_equal(state_of(net), copies[1])
    assert net.best == {"epoch": 1, "val/mae": 2.0}


# ------------------------------------------------------------------------------------------ class balance


def test_balanced_class_weights(manifest, cache_dir):
    data = data_module(manifest, cache_dir, label_column="rare")
    data.setup("fit")
    counts = data.class_counts()
    assert counts.tolist() == [6, 2]  # calcified: 1 of 4 lesions of each of the two training patients
    module = FinetuneModule(trunk_args=SMALL, class_weights="balanced")
    module.trainer = SimpleNamespace(datamodule=data)
    module.setup("fit")
    expected = torch.tensor(counts.sum() / (2 * counts), dtype=torch.float32)
    torch.testing.assert_close(module._class_weights, expected)  # [8/12, 8/4]
    out = torch.tensor([[0.3], [-1.0], [2.0]])
    label = torch.tensor([1, 0, 1])
    loss = module.loss(out, {"label": label})
    reference = nn.functional.binary_cross_entropy_with_logits(out[:, 0], label.float(), pos_weight=torch.tensor(3.0))
    torch.testing.assert_close(loss, reference)
    fixed = FinetuneModule(task="multiclass", num_classes=3, trunk_args=SMALL, class_weights=[1.0, 2.0, 0.5])
    fixed.setup("fit")
    logits, target = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(
        fixed.loss(logits, {"label": target}),
        nn.functional.cross_entropy(logits, target, weight=torch.tensor([1.0, 2.0, 0.5])),
    )


def test_oversampling_balances_the_classes(manifest, cache_dir):
    data = data_module(manifest, cache_dir, label_column="rare", oversample=True)
    data.setup("fit")
    loader = data.train_dataloader()
    sampler = loader.sampler
    assert isinstance(sampler, EpochSampler) and sampler.size == 8
    labels = data.store.labels[loader.dataset.indices]
    counts = np.bincount(labels)
    expected = 1.0 / counts[labels]
    np.testing.assert_allclose(sampler.weights, expected / expected.sum())
    assert sampler.weights[labels == 1].sum() == pytest.approx(0.5)
    drawn = []
    for epoch in range(300):
        sampler.set_epoch(epoch)
        drawn.extend(labels[index] for index, _ in sampler)
    assert len(drawn) == 300 * 8
    assert np.mean(drawn) == pytest.approx(0.5, abs=0.04)  # 2 of 8 rows, drawn half the time
    assert np.mean(labels) == 0.25
    plain = data_module(manifest, cache_dir, label_column="rare")
    plain.setup("fit")
    assert plain.train_dataloader().sampler.weights is None


# ------------------------------------------------------------------------------------------ data splits


def test_split_column_is_honoured(manifest, cache_dir):
    data = data_module(manifest, cache_dir)
    data.setup("fit")
    table = pd.read_csv(manifest)
    assert data.store.splits.tolist() == table["split"].iloc[data.store.rows].tolist()
    assert data.classes == ["0", "1"]
    assert data.store.labels.tolist() == table["malignant"].iloc[data.store.rows].tolist()
    assert data.view_size == (50, 50, 50)
    assert tuple(data.store.size) == (54, 54, 54)
    batch = next(iter(data.val_dataloader()))
    assert batch["views"].shape == (4, 1, 1, 16, 16, 16)


def test_missing_labels_take_part_in_no_split(manifest, cache_dir, tmp_path):
    table = pd.read_csv(manifest)
    table["marked"] = table["malignant"].astype(str)
    table.loc[[1, 6, 12], "marked"] = ["NA", "unknown", "?"]  # as a spreadsheet writes a missing label
    path = manifest.with_name("marked.csv")
    table.to_csv(path, index=False)
    data = data_module(path, cache_dir, label_column="marked")
    data.setup("fit")
    assert data.classes == ["0", "1"] and data.n_missing_labels == 3
    unlabelled = np.flatnonzero(data.store.splits == "unlabelled")
    assert data.store.rows[unlabelled].tolist() == [1, 6, 12]
    assert data.store.labels[unlabelled].tolist() == [-1, -1, -1]
    kept = np.flatnonzero(data.store.splits != "unlabelled")
    assert data.store.splits[kept].tolist() == table["split"].iloc[data.store.rows[kept]].tolist()


def test_grouped_splits_keep_patients_together_and_are_seeded():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"P{i:02d}" for i in range(15)], 3)
    table = pd.DataFrame({"patient_id": patients})
    strata = np.repeat(rng.integers(0, 2, 15), 3)
    first = assign_splits(table, strata, None, patients, seed=3)
    assert set(first) == {"train", "val", "test"}
    for patient in np.unique(patients):
        assert len(set(first[patients == patient])) == 1, patient
    assert np.array_equal(first, assign_splits(table, strata, None, patients, seed=3))
    assert any(not np.array_equal(first, assign_splits(table, strata, None, patients, seed=s)) for s in range(4, 8))


def test_grouped_splits_in_the_data_module(manifest, cache_dir, tmp_path):
    table = pd.read_csv(manifest).drop(columns="split")
    table["patient_id"] = [f"Q{i // 2}" for i in range(len(table))]  # 8 patients of two lesions (same class)
    images = str(Path(manifest).parent)
    table["image_path"] = [str(Path(images) / p) for p in table["image_path"]]
    path = tmp_path / "grouped.csv"
    table.to_csv(path, index=False)
    splits = []
    for _ in range(2):
        data = data_module(path, cache_dir, split_column=None, group_column="patient_id", split_seed=1)
        data.setup("fit")
        splits.append(data.store.splits)
        patients = table["patient_id"].to_numpy()[data.store.rows]
        for patient in np.unique(patients):
            assert len(set(data.store.splits[patients == patient])) == 1, patient
        assert {"train", "val", "test"} <= set(data.store.splits)
    assert np.array_equal(splits[0], splits[1])


def test_train_fraction_keeps_a_stratified_half(manifest, cache_dir):
    data = data_module(manifest, cache_dir, train_fraction=0.5, fraction_seed=1)
    data.setup("fit")
    splits, labels = data.store.splits, data.store.labels
    assert (splits == "unused").sum() == 4 and (splits == "train").sum() == 4
    assert np.bincount(labels[splits == "train"]).tolist() == [2, 2]
    assert (splits == "val").sum() == 4 and (splits == "test").sum() == 4  # held-out rows untouched
    again = data_module(manifest, cache_dir, train_fraction=0.5, fraction_seed=1)
    again.setup("fit")
    assert np.array_equal(again.store.splits, splits)
    assert len(data.dataset("train", train=True)) == 4
    assert data.class_counts().tolist() == [2, 2]


def test_bad_split_name_and_missing_columns_raise(manifest, cache_dir, tmp_path):
    table = pd.read_csv(manifest)
    table["image_path"] = [str(Path(manifest).parent / p) for p in table["image_path"]]
    table.loc[5, "split"] = "holdout"
    bad = tmp_path / "bad_split.csv"
    table.to_csv(bad, index=False)
    with pytest.raises(ManifestError, match="^row 5: column split has value 'holdout'; allowed train, val, test$"):
        data_module(bad, cache_dir).setup("fit")
    with pytest.raises(ManifestError, match="'nodule_class'"):
        data_module(manifest, cache_dir, label_column="nodule_class").setup("fit")
    with pytest.raises(ManifestError, match="'followup'"):
        data_module(manifest, cache_dir, task="survival", time_column="followup", event_column="event").setup("fit")
    with pytest.raises(ManifestError, match="'fold'"):
        data_module(manifest, cache_dir, split_column="fold").setup("fit")
    with pytest.raises(ValueError, match="time_column"):
        data_module(manifest, cache_dir, task="survival")


# ------------------------------------------------------------------------------------------ end to end


def only_version(root: Path) -> Path:
    (version,) = sorted((root / "logs").glob("version_*"))
    return version


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory, manifest, cache_dir) -> Path:
    """Two epochs of ``medfm finetune fit`` on the binary task; its log version folder."""
    config, root = write_config(tmp_path_factory.mktemp("binary_run"), manifest, cache_dir, epochs=2)
    assert main(["finetune", "fit", "--config", str(config)]) == 0
    return only_version(root)


def test_fit_writes_results_curves_and_the_model_card(binary_run):
    results = json.loads((binary_run / "results.json").read_text())
    assert results["task"] == "binary" and results["classes"] == ["0", "1"]
    assert results["sizes"] == {"train": 8, "val": 4, "test": 4, "unused": 0, "unlabelled": 0}
    auroc = results["test"]["auroc"]
    # 4 test rows: too few for an interval, so none is given, and the result says why
    assert 0.0 <= auroc["value"] <= 1.0 and auroc["low"] is None and auroc["high"] is None
    assert auroc["n"] == 4 and "n = 4" in auroc["no_ci"]
    assert results["test"]["n"]["value"] == 4
    assert results["best"]["epoch"] in (0, 1)
    curves = pd.read_csv(binary_run / "curves.csv")
    assert curves["epoch"].tolist() == [0, 1]
    assert curves[["val/auroc", "train/loss", "val/loss"]].notna().all().all()
    assert results["best"]["val/auroc"] == pytest.approx(curves["val/auroc"].max())
    assert (binary_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = json.loads((binary_run / "model.json").read_text())
    assert card["kind"] == "medfm-finetuned" and card["task"] == "binary"
    assert card["trunk"] == {"name": "resnet3d", "args": SMALL, "in_channels": 1}
    assert card["head"] == [32, 1] and card["feature_dim"] == 128
    assert card["profile"] == "fmcib" and card["margin"] == 2 and card["eval_view"] == EVAL_VIEW
    assert (binary_run / card["weights"]).is_file()
    # one checkpoint file is kept; last.ckpt links it instead of being a second copy
    files = sorted((binary_run / "checkpoints").iterdir())
    assert [f.name for f in files if not f.is_symlink()] == ["epoch=1-step=4.ckpt"]
    assert (binary_run / "checkpoints" / "last.ckpt").resolve() == binary_run / "checkpoints" / "epoch=1-step=4.ckpt"


def test_fit_writes_each_rows_split_and_the_test_predictions(binary_run, manifest, tmp_path):
    table = pd.read_csv(manifest)
    splits = pd.read_csv(binary_run / "splits.csv")
    assert splits["row"].tolist() == list(range(len(table)))
    assert splits["fit_split"].tolist() == table["split"].tolist()  # the manifest's split column, row by row
    assert splits["patient_id"].tolist() == table["patient_id"].tolist()  # with the manifest's ID columns
    tested = pd.read_csv(binary_run / "test_predictions.csv")
    test_rows = np.flatnonzero(table["split"].eq("test").to_numpy())
    assert tested["row"].tolist() == test_rows.tolist()
    assert tested["image_path"].tolist() == table["image_path"].iloc[test_rows].tolist()
    assert tested["truth"].tolist() == table["malignant"].iloc[test_rows].tolist()
    assert tested["predicted"].tolist() == [int(p > 0.5) for p in tested["prob_1"]]
    # the restored best weights' probabilities: what `medfm predict` gives for those rows with the model card
    out = tmp_path / "pred.csv"
    assert main(["predict", str(binary_run / "model.json"), str(manifest), "--out", str(out), "--quiet"]) == 0
    predicted = pd.read_csv(out)
    np.testing.assert_allclose(tested["prob_1"], predicted["prob_1"].iloc[test_rows], atol=1e-5)


def test_splits_mark_unread_rows_as_errors(tmp_path):
    from medfm.train.outputs import write_splits, write_test_predictions

    manifest = pd.DataFrame({"patient_id": ["a", "b", "c"], "split": ["train", "test", "test"], "row": [7, 8, 9]})
    write_splits(tmp_path, np.array([0, 2]), np.array(["train", "test"]), manifest)
    splits = pd.read_csv(tmp_path / "splits.csv")
    assert splits["fit_split"].tolist() == ["train", "error", "test"]
    assert splits["row"].tolist() == [0, 1, 2] and splits["row_manifest"].tolist() == [7, 8, 9]
    write_test_predictions(tmp_path, np.array([2]), {"truth": ["1"], "prob_1": np.array([0.75])}, manifest)
    tested = pd.read_csv(tmp_path / "test_predictions.csv")
    assert tested.to_dict("records") == [
        {"row": 2, "patient_id": "c", "split": "test", "row_manifest": 9, "truth": 1, "prob_1": 0.75}
    ]


def test_predict_matches_the_models_own_test_predictions(binary_run, manifest, cache_dir, tmp_path):
    out = tmp_path / "pred.csv"
    assert main(["predict", str(binary_run / "model.json"), str(manifest), "--out", str(out)]) == 0
    predicted = pd.read_csv(out)
    table = pd.read_csv(manifest)
    assert len(predicted) == len(table)
    for column in ("image_path", "lesion_type", "patient_id"):  # rows in manifest order
        assert predicted[column].tolist() == table[column].tolist()
    assert np.allclose(predicted["prob_0"] + predicted["prob_1"], 1.0)
    assert predicted["predicted"].astype(str).tolist() == ["1" if p > 0.5 else "0" for p in predicted["prob_1"]]

    model, card = load_finetuned(binary_run / "model.json")
    assert not model.training
    data = data_module(manifest, cache_dir)
    data.setup("test")
    test = data.dataset("test")
    items = [test[i] for i in range(len(test))]
    with torch.no_grad():
        logits = model(torch.stack([item["views"][0] for item in items]))[:, 0]
    rows = data.store.rows[[int(item["index"]) for item in items]]
    assert table["split"].iloc[rows].eq("test").all()
    np.testing.assert_allclose(predicted["prob_1"].to_numpy()[rows], torch.sigmoid(logits).numpy(), atol=1e-5)


def test_predict_on_a_labelled_manifest_writes_metrics_with_cis(binary_run, manifest, tmp_path, capsys):
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    from medfm.errors import ManifestError

    table = pd.read_csv(manifest)
    table["malignant"] = table["malignant"].astype(object)
    table.loc[[0, 5], "malignant"] = "NA"  # missing labels are left out and counted
    labelled = manifest.with_name("labelled.csv")  # beside the images its paths name
    table.to_csv(labelled, index=False)
    out = tmp_path / "pred.csv"
    assert main(["predict", str(binary_run / "model.json"), str(labelled), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "pred.metrics.json").read_text())
    assert report["truth"] == "malignant" and report["n"] == 14 and report["n_missing_labels"] == 2
    predicted = pd.read_csv(out)
    kept = table["malignant"].ne("NA").to_numpy()
    truth = table["malignant"][kept].astype(int)
    auroc = report["metrics"]["auroc"]
    assert auroc["value"] == pytest.approx(roc_auc_score(truth, predicted["prob_1"][kept]))
    assert auroc["low"] <= auroc["value"] <= auroc["high"] and auroc["n_resamples"] > 900
    balanced = balanced_accuracy_score(truth, predicted["predicted"][kept].astype(int))
    assert report["metrics"]["balanced_accuracy"]["value"] == pytest.approx(balanced)
    assert f"auroc: {auroc['value']:.3f} (95% CI" in printed and "n=14" in printed

    # --label names another truth column; one the manifest lacks or a class the model does not know is refused
    table["other"] = table["malignant"].replace({"NA": 1})
    table.to_csv(labelled, index=False)
    assert main(["predict", str(binary_run / "model.json"), str(labelled), "--out", str(out), "--label", "other",
                 "--quiet"]) == 0  # fmt: skip
    assert json.loads((tmp_path / "pred.metrics.json").read_text())["n"] == 16
    with pytest.raises(ManifestError, match="--label nope: no such column"):
        predict_manifest(binary_run / "model.json", labelled, out, label="nope")
    table.loc[3, "other"] = 7
    table.to_csv(labelled, index=False)
    with pytest.raises(ManifestError, match=r"row 3: other 7 is not one of the model's classes \['0', '1'\]"):
        predict_manifest(binary_run / "model.json", labelled, out, label="other")
    # without a truth column there are no metrics, and an earlier run's file is removed
    table.drop(columns=["malignant", "other"]).to_csv(labelled, index=False)
    predict_manifest(binary_run / "model.json", labelled, out)
    assert not (tmp_path / "pred.metrics.json").exists()


def test_predict_batches_across_volumes_with_the_same_results(binary_run, manifest, tmp_path, monkeypatch):
    import medfm.finetune.outputs as outputs

    original, sizes = outputs.load_finetuned, []

    def counted(card_path):
        model, card = original(card_path)
        model.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
        return model, card

    monkeypatch.setattr(outputs, "load_finetuned", counted)
    tables = {}
    for batch in (16, 3):
        sizes.clear()
        out = tmp_path / f"pred{batch}.csv"
        assert main(["predict", str(binary_run / "model.json"), str(manifest), "--out", str(out),
                     "--batch-size", str(batch), "--device", "cpu", "--quiet"]) == 0  # fmt: skip
        tables[batch] = pd.read_csv(out)
        # 16 lesions in 4 volumes: batches run across volumes, not one volume (or one image) at a time
        assert sizes == ([16] if batch == 16 else [3, 3, 3, 3, 3, 1])
    pd.testing.assert_frame_equal(tables[16], tables[3], atol=1e-6)


@pytest.mark.parametrize(
    ("task", "data", "metrics"),
    [
        ("regression", {"label_column": "size"}, {"mae", "rmse", "r2"}),
        ("survival", {"label_column": None, "time_column": "time", "event_column": "event"}, {"c_index"}),
    ],
)
def test_regression_and_survival_end_to_end(tmp_path, manifest, cache_dir, task, data, metrics, capfd):
    config, root = write_config(tmp_path, manifest, cache_dir, task=task, data=data)
    assert main(["finetune", "fit", "--config", str(config)]) == 0
    printed = "".join(capfd.readouterr())
    assert "GPU available" not in printed and "Total params" not in printed  # Lightning's notes need --verbose
    version = only_version(root)
    results = json.loads((version / "results.json").read_text())
    assert results["task"] == task and results["classes"] is None
    assert set(results["test"]) == metrics | {"n"}
    for name in metrics:
        assert np.isfinite(results["test"][name]["value"]), name
    monitored = "val/mae" if task == "regression" else "val/c_index"
    assert results["best"]["epoch"] == 0 and monitored in results["best"]
    curves = pd.read_csv(version / "curves.csv")
    assert len(curves) == 1 and monitored in curves.columns
    card = json.loads((version / "model.json").read_text())
    assert card["task"] == task and card["head"] == [32, 1]
    out = tmp_path / "pred.csv"
    assert main(["predict", str(version / "model.json"), str(manifest), "--out", str(out)]) == 0
    column = "prediction" if task == "regression" else "risk"
    assert np.isfinite(pd.read_csv(out)[column]).all()


def test_sweep_tables_fractions_and_reuses_finished_runs(tmp_path, manifest, cache_dir):
    config, _ = write_config(tmp_path, manifest, cache_dir)
    out = tmp_path / "sweep"
    args = ["finetune", "sweep", "--config", str(config), "--out", str(out), "--fractions", "1", "0.5"]
    assert main([*args, "--repeats", "1"]) == 0
    table = pd.read_csv(out / "sweep.csv")
    assert sorted(set(table["fraction"])) == [0.5, 1.0]
    assert not table.duplicated(["metric", "fraction"]).any()
    assert len(table) == 2 * table["metric"].nunique()
    assert "auroc" in set(table["metric"])
    results = sorted(out.rglob("results.json"))
    assert len(results) == 2
    half = json.loads((out / "fraction_0.5" / "seed_0" / "logs" / "version_0" / "results.json").read_text())
    assert half["train_fraction"] == 0.5 and half["sizes"]["train"] == 4 and half["sizes"]["unused"] == 4
    stamps = {p: p.stat().st_mtime_ns for p in results}
    assert main([*args, "--repeats", "1"]) == 0
    assert sorted(out.rglob("results.json")) == results
    assert {p: p.stat().st_mtime_ns for p in results} == stamps  # no refit
    assert not list(out.rglob("version_1"))
    assert pd.read_csv(out / "sweep.csv").equals(table)


def test_model_and_data_tasks_must_agree():
    module = FinetuneModule(task="binary", trunk_args=SMALL)
    module.trainer = SimpleNamespace(datamodule=SimpleNamespace(hparams=SimpleNamespace(task="regression")))
    with pytest.raises(ValueError, match="model.task is 'binary' but data.task is 'regression'"):
        module.setup("fit")


def test_test_bootstrap_resamples_whole_patients(monkeypatch):
    module = FinetuneModule(task="binary", trunk_args=SMALL, n_bootstrap=200)
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    rng = np.random.default_rng(0)
    p = rng.random(12)
    y = (p + rng.normal(0, 0.3, 12) > 0.5).astype(float)
    outputs = {
        "loss": torch.zeros(()),
        "output": torch.from_numpy(np.stack([1 - p, p], 1)).float(),
        "target": torch.from_numpy(y[:, None]).float(),
        "index": torch.arange(12),
    }

    def run(codes):
        module._trainer = None if codes is None else SimpleNamespace(datamodule=SimpleNamespace(group_codes=codes))
        module.collect("test", outputs)
        module.on_test_epoch_end()
        module._trainer = None
        return module.test_results

    rows = run(None)
    patients = run(np.repeat(np.arange(4), 3))  # 4 patients of 3 rows
    assert rows["n"]["patients"] is None and patients["n"]["patients"] == 4
    assert rows["auroc"]["value"] == patients["auroc"]["value"]  # same point estimate
    # the CI resamples patients: 4 are too few for an interval, which is said, with n beside it; 12 rows get one
    assert patients["auroc"]["low"] is None and patients["auroc"]["high"] is None and patients["auroc"]["n"] == 4
    assert patients["auroc"]["no_ci"] == "n = 4 is too few for an interval (fewer than 10)"
    assert rows["auroc"]["n"] == 12 and rows["auroc"]["low"] <= rows["auroc"]["value"] <= rows["auroc"]["high"]
    # the dropped resamples are counted beside the CI (a note only above 5%)
    assert rows["auroc"]["n_dropped"] == 200 - rows["auroc"]["n_resamples"]


def test_verbose_is_taken_out_of_the_arguments_and_restores_lightnings_notes():
    import logging

    from medfm.train.cli import lightning_verbosity

    args, verbose = lightning_verbosity(["fit", "--config", "a.yaml", "--verbose"])
    assert args == ["fit", "--config", "a.yaml"] and verbose
    assert logging.getLogger("lightning.pytorch").level == logging.INFO
    args, verbose = lightning_verbosity(["fit", "--config", "a.yaml"])
    assert args == ["fit", "--config", "a.yaml"] and not verbose
    assert logging.getLogger("lightning.pytorch").level == logging.WARNING
