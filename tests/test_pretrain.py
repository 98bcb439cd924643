"""Pre-training: the module's objectives, the kNN monitor, the optimiser schedule, ``medfm pretrain fit`` (logs,
config, checkpoints, resume after an interrupted or killed run), ``medfm pretrain export`` and user model cards.

Runs are tiny: phantom CTs cut into the ``fmcib`` 50³ store, cropped to 16³ views for a 3D ResNet10 on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer
from safetensors.torch import load_file
from torch import nn

from medfm.cli import main
from medfm.data import profiles
from medfm.data.synthetic import make_demo_dataset
from medfm.models import registry
from medfm.pretrain.data import PretrainData
from medfm.pretrain.module import PretrainModule, projection_head, stack_views
from medfm.pretrain.monitor import knn_scores
from medfm.train.cli import MedfmCLI
from medfm.train.distributed import GlobalBatchNorm, GlobalBatchNormSync, runs_on_cpu

# Cheap views of the 50³ store: a random shift, the central 16³, random flips (MONAI's resized crop costs ~50 ms).
VIEW = [
    {"op": "shift", "max_voxels": 4, "p": 1.0},
    {"op": "center_crop", "size": [16, 16, 16]},
    {"op": "flip", "axes": [0, 1, 2]},
]
EVAL_VIEW = [{"op": "center_crop", "size": [16, 16, 16]}]
RESIZED_VIEW = [
    {"op": "random_resized_crop", "size": [16, 16, 16], "scale": [0.5, 1.0]},
    {"op": "flip", "axes": [0, 1, 2]},
]
SMALL = {"depth": 10, "widen_factor": 0.25}  # 128-d features, small checkpoints
STEPS_PER_EPOCH = 2  # 8 training rows, batch 4


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
    """Three phantoms (12 lesion rows): patients 0-1 train, patient 2 is the labelled kNN validation set."""
    path = make_demo_dataset(tmp_path_factory.mktemp("pretrain_demo"), n_patients=3)
    table = pd.read_csv(path)
    table["label"] = table["lesion_type"].isin(["solid", "calcified"]).astype(int)
    table["split"] = np.where(table["patient_id"] == "P002", "val", "train")
    table.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One patch-store cache for every run of the module (the store is cut once)."""
    return tmp_path_factory.mktemp("stores")


def write_config(
    folder: Path,
    manifest: Path,
    cache_dir: Path,
    *,
    method: str = "simclr",
    epochs: int = 1,
    trunk_args: dict | None = None,
    view: list[dict] = VIEW,
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
            "method": method,
            "trunk": "resnet3d",
            "trunk_args": trunk_args or SMALL,
            "projection": [32, 16],
            "lr": 0.3,
            **model,
        },
        "data": {
            "manifest": str(manifest),
            "profile": "fmcib",
            "label_column": "label",
            "split_column": "split",
            "margin": 0,
            "batch_size": 4,
            "cache_dir": str(cache_dir),
            "view": view,
            "eval_view": EVAL_VIEW,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path, root


def fit(config: Path, *extra: str) -> None:
    assert main(["pretrain", "fit", "--config", str(config), *extra]) == 0


def metrics(version: Path) -> pd.DataFrame:
    return pd.read_csv(version / "metrics.csv")


def read_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def medfm_script() -> str:
    found = Path(sys.executable).parent / "medfm"
    return str(found) if found.is_file() else (shutil.which("medfm") or pytest.skip("no medfm console script"))


# ------------------------------------------------------------------------------------------ module pieces


def test_projection_head_shapes_and_no_batch_norm_by_default():
    head = projection_head(64, [32, 16])
    assert [type(m) for m in head] == [nn.Linear, nn.ReLU, nn.Linear]
    assert head(torch.randn(5, 64)).shape == (5, 16)
    assert all(m.bias is not None for m in head if isinstance(m, nn.Linear))
    with_bn = projection_head(64, [32, 24, 16], batch_norm=True)
    assert [type(m) for m in with_bn] == [nn.Linear, nn.BatchNorm1d, nn.ReLU] * 2 + [nn.Linear]
    assert with_bn(torch.randn(5, 64)).shape == (5, 16)
    assert with_bn[0].bias is None and with_bn[-1].bias is not None  # BN follows: no bias; the output keeps it


def test_projection_head_is_fmcibs_simclr_projection_head():
    # FMCIB's head is lightly's SimCLRProjectionHead(4096, 2048, 128, batch_norm=False); the same layers at a
    # small size: lightly's weights load into ours unchanged and give the same outputs.
    from lightly.models.modules import SimCLRProjectionHead

    torch.manual_seed(0)
    theirs = SimCLRProjectionHead(64, 32, 16, batch_norm=False)
    ours = projection_head(64, [32, 16], batch_norm=False)
    ours.load_state_dict({k.removeprefix("layers."): v for k, v in theirs.state_dict().items()}, strict=True)
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    fmcib = projection_head(4096, [2048, 128])
    assert [(m.in_features, m.out_features, m.bias is not None) for m in fmcib if isinstance(m, nn.Linear)] == [
        (4096, 2048, True),
        (2048, 128, True),
    ]


def test_simclr_mined_objective_is_fmcibs_definition_on_its_embeddings():
    from test_losses import fmcib_definition

    torch.manual_seed(0)
    module = PretrainModule(method="simclr-mined", trunk_args=SMALL, projection=[32, 16]).eval()
    batch = hand_batch(batch=3, negatives=True)
    hardneg = PretrainModule(method="simclr-hardneg", trunk_args=SMALL, projection=[32, 16]).eval()
    hardneg.load_state_dict(module.state_dict())
    with torch.no_grad():  # eval: batch norms use running statistics, so each view's embedding stands alone
        loss = module.objective(batch)
        hard = hardneg.objective(batch)
        lesion = torch.stack([module.head(module(batch["views"][:, v])) for v in range(2)], dim=1)
        mined = torch.stack([module.head(module(batch["negatives"][:, v])) for v in range(2)], dim=1)
    reference = fmcib_definition(lesion, mined, 0.1)
    assert loss.item() == pytest.approx(reference.item(), abs=1e-5)
    # medfm's variant adds the other lesions and the own mined patch to the negatives: a larger denominator
    assert hard.item() > loss.item() + 0.1


def test_stack_views_orders_view_by_view():
    views = torch.arange(3 * 2 * 4).reshape(3, 2, 1, 2, 2)  # (B=3, V=2, C=1, 2, 2)
    stacked = stack_views(views)
    assert stacked.shape == (6, 1, 2, 2)
    expected = torch.cat([views[:, 0], views[:, 1]])  # all first views, then all second views
    assert torch.equal(stacked, expected)
    assert torch.equal(stacked[1], views[1, 0]) and torch.equal(stacked[3], views[0, 1])


def hand_batch(batch: int = 4, labels: list[int] | None = None, negatives: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {
        "views": torch.rand(batch, 2, 1, 16, 16, 16, generator=g),
        "index": torch.arange(10, 10 + batch),
        "label": torch.tensor(labels if labels is not None else [0, 1] * (batch // 2)),
    }
    if negatives:
        out["negatives"] = torch.rand(batch, 2, 1, 16, 16, 16, generator=g)
    return out


@pytest.mark.parametrize("method", ["simclr", "simclr-mined", "simclr-hardneg", "supcon", "supervised"])
def test_objective_is_a_finite_differentiable_scalar(method):
    torch.manual_seed(0)
    extra = {"num_classes": 2} if method == "supervised" else {}
    module = PretrainModule(method=method, trunk_args=SMALL, projection=[32, 16], **extra)
    loss = module.objective(hand_batch(negatives=method.startswith("simclr-")))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in module.trunk.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    head = module.head if method == "supervised" else module.head[-1]
    assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0


def test_objective_errors():
    with pytest.raises(ValueError, match="num_classes"):
        PretrainModule(method="supervised", trunk_args=SMALL)
    with pytest.raises(ValueError, match="method="):
        PretrainModule(method="byol", trunk_args=SMALL)
    supcon = PretrainModule(method="supcon", trunk_args=SMALL, projection=[32, 16])
    with pytest.raises(ValueError, match="label"):
        supcon.objective(hand_batch(labels=[0, 1, -1, 1]))
    for method in ("simclr-mined", "simclr-hardneg"):
        mined = PretrainModule(method=method, trunk_args=SMALL, projection=[32, 16])
        with pytest.raises(ValueError, match="mined_negatives"):
            mined.objective(hand_batch(negatives=False))


def test_cpu_sync_batchnorm_plugin_swaps_batch_norms_and_back():
    torch.manual_seed(0)
    module = PretrainModule(method="simclr", trunk_args=SMALL, projection=[32, 16], projection_bn=True)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    kinds = {name: type(m) for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert nn.BatchNorm3d in kinds.values() and nn.BatchNorm1d in kinds.values()
    x = torch.rand(4, 1, 16, 16, 16)
    module.eval()
    expected = module.head(module(x))
    synced = GlobalBatchNormSync().apply(module)
    swapped = dict(synced.named_modules())
    assert all(type(swapped[name]) is GlobalBatchNorm for name in kinds)
    assert {k: v.shape for k, v in synced.state_dict().items()} == {k: v.shape for k, v in before.items()}
    torch.testing.assert_close(synced.head(synced(x)), expected)  # one process, eval: plain batch norm
    synced.train()
    loss = synced.objective(hand_batch())  # training on one process: batch statistics, as before
    loss.backward()
    reverted = GlobalBatchNormSync().revert(synced)
    assert {name: type(m) for name, m in reverted.named_modules() if name in kinds} == kinds
    assert reverted.trunk.bn1.weight is synced.trunk.bn1.weight  # the same parameters all along
    assert int(reverted.trunk.bn1.num_batches_tracked) == 1


def test_cli_sync_batchnorm_on_cpu_uses_the_gloo_capable_plugin(tmp_path, manifest, cache_dir):
    assert runs_on_cpu("cpu") and not runs_on_cpu("gpu")
    assert runs_on_cpu("auto") == (not torch.cuda.is_available())
    config, _ = write_config(tmp_path, manifest, cache_dir)
    args = ["--config", str(config), "--trainer.sync_batchnorm", "true"]
    cli = MedfmCLI(PretrainModule, PretrainData, args=args, run=False)
    assert isinstance(cli.trainer._accelerator_connector._layer_sync, GlobalBatchNormSync)


# ------------------------------------------------------------------------------------------ kNN monitor


def clusters(per_class: int = 6, dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(dim)[:2] * 10
    features = torch.cat([centres[c] + 0.1 * torch.randn(per_class, dim, generator=g) for c in range(2)])
    return features, torch.tensor([0] * per_class + [1] * per_class)


def test_knn_scores_on_separable_clusters():
    features, labels = clusters()
    assert knn_scores(features, labels, k=3) == {"knn_acc": 1.0, "knn_auc": 1.0}
    # k larger than the set (leave-one-out uses n - 1 neighbours): the exp(s/T) weights still favour the own cluster
    assert knn_scores(features, labels, k=50)["knn_acc"] == 1.0


def test_knn_scores_ignore_unlabelled_and_need_two_classes():
    features, labels = clusters()
    noise = torch.randn(4, features.shape[1], generator=torch.Generator().manual_seed(1)) * 10
    # Unlabelled copies of labelled rows would be their nearest neighbours (and a third class) if they counted.
    mixed = torch.cat([features, features[:2], features[-2:]])
    mixed_labels = torch.cat([labels, torch.tensor([-1, -1, -1, -1])])
    assert knn_scores(mixed, mixed_labels, k=3) == {"knn_acc": 1.0, "knn_auc": 1.0}
    assert knn_scores(torch.cat([features, noise]), torch.cat([labels, torch.full((4,), -1)]), k=3)["knn_acc"] == 1.0
    assert knn_scores(features, torch.zeros(len(labels), dtype=torch.long)) == {}
    assert knn_scores(features, torch.full((len(labels),), -1)) == {}


# ------------------------------------------------------------------------------------------ optimiser


class RecordLR(Callback):
    """The learning rates (per group) and initial rates each optimiser step runs with."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.initial: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        groups = trainer.optimizers[0].param_groups
        self.lrs.append([g["lr"] for g in groups])
        self.initial = [g["initial_lr"] for g in groups]


def short_fit(
    manifest: Path, cache_dir: Path, warmup_epochs: float, **trainer_args: object
) -> tuple[RecordLR, Trainer]:
    data = PretrainData(
        manifest=str(manifest),
        profile="fmcib",
        label_column="label",
        split_column="split",
        batch_size=4,
        cache_dir=str(cache_dir),
        view=VIEW,
        eval_view=EVAL_VIEW,
    )
    torch.manual_seed(0)
    module = PretrainModule(method="simclr", trunk_args=SMALL, projection=[32, 16], warmup_epochs=warmup_epochs)
    record = RecordLR()
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[record],
        **trainer_args,
    )
    trainer.fit(module, datamodule=data)
    return record, trainer


def cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_lr_is_scaled_by_the_global_batch_and_stepped_every_step(manifest, cache_dir):
    record, trainer = short_fit(manifest, cache_dir, warmup_epochs=0.0, max_steps=3)
    peak = 0.3 * 4 / 256
    assert record.initial == pytest.approx([peak, peak])
    assert [config.interval for config in trainer.lr_scheduler_configs] == ["step"]
    assert len(record.lrs) == 3
    for step, lrs in enumerate(record.lrs):  # a new rate at every optimiser step, both groups alike
        assert lrs == pytest.approx([peak * cosine(step, 3, 0)] * 2)
    assert record.lrs[0][0] == pytest.approx(peak)  # no warm-up: the first step runs at the peak


@pytest.mark.parametrize("limits", [{"max_epochs": 2}, {"max_steps": 3}, {"max_epochs": 50, "max_steps": 3}])
def test_warmup_epochs_count_epochs_whatever_ends_the_run(manifest, cache_dir, limits):
    """One warm-up epoch is two steps (8 rows, batch 4) whether max_epochs or max_steps ends the run."""
    record, trainer = short_fit(manifest, cache_dir, warmup_epochs=1.0, **limits)
    total = int(trainer.estimated_stepping_batches)
    peak = 0.3 * 4 / 256
    assert total == len(record.lrs) == (4 if "max_steps" not in limits else 3)
    assert [lrs[0] for lrs in record.lrs] == pytest.approx(
        [peak * cosine(s, total, STEPS_PER_EPOCH) for s in range(total)]
    )


# ------------------------------------------------------------------------------------------ medfm pretrain fit


@pytest.fixture(scope="module")
def resnet10_run(tmp_path_factory, manifest, cache_dir) -> Path:
    """One epoch of SimCLR on a full-width ResNet10 (512-d, as the registry's resnet10-3d); its log version folder."""
    folder = tmp_path_factory.mktemp("resnet10_run")
    config, root = write_config(folder, manifest, cache_dir, trunk_args={"depth": 10}, view=RESIZED_VIEW)
    fit(config)
    return root / "logs" / "version_0"


def test_fit_writes_metrics_config_and_checkpoints(resnet10_run):
    table = metrics(resnet10_run)
    assert table["train/loss_step"].notna().sum() == STEPS_PER_EPOCH
    assert np.isfinite(table["train/loss_step"].dropna()).all()
    assert table["train/loss_epoch"].notna().any()
    knn = table["val/knn_acc"].dropna()
    assert len(knn) == 1 and 0.0 <= knn.iloc[0] <= 1.0
    assert table["val/knn_auc"].notna().any()
    assert any(c.startswith("lr-") for c in table.columns)  # the LearningRateMonitor's rows
    saved = yaml.safe_load((resnet10_run / "config.yaml").read_text())
    assert (resnet10_run / "checkpoints").is_dir()
    assert saved["model"]["method"] == "simclr" and saved["data"]["batch_size"] == 4
    assert saved["model"]["temperature"] == 0.1  # defaults resolved into the saved config
    ckpt = read_ckpt(resnet10_run / "checkpoints" / "last.ckpt")
    assert ckpt["global_step"] == STEPS_PER_EPOCH
    assert ckpt["hyper_parameters"]["method"] == "simclr"
    assert ckpt["datamodule_hyper_parameters"]["profile"] == "fmcib"
    # the loss and kNN-monitor curves per epoch, from metrics.csv
    curves = pd.read_csv(resnet10_run / "curves.csv")
    assert curves["epoch"].tolist() == [0]
    assert curves["train/loss"][0] == pytest.approx(table["train/loss_epoch"].dropna().iloc[0])
    assert curves["val/knn_acc"][0] == pytest.approx(knn.iloc[0])
    assert (resnet10_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_print_config_prints_the_resolved_yaml(tmp_path, manifest, cache_dir, capsys):
    config, root = write_config(tmp_path, manifest, cache_dir, method="supcon")
    with pytest.raises(SystemExit) as stop:
        main(["pretrain", "fit", "--config", str(config), "--data.batch_size", "6", "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["method"] == "supcon"
    assert printed["model"]["optimizer"] == "lars" and printed["model"]["temperature"] == 0.1
    assert printed["data"]["batch_size"] == 6 and printed["data"]["view"] == VIEW
    assert printed["trainer"]["max_epochs"] == 1 and printed["seed_everything"] == 0
    assert not root.exists()  # printing trains nothing


def test_fit_bad_config_is_a_one_line_error(tmp_path, manifest, cache_dir, capsys):
    config, _ = write_config(tmp_path, manifest, cache_dir, method="supervised")  # no num_classes
    assert main(["pretrain", "fit", "--config", str(config)]) == 2
    assert "num_classes" in capsys.readouterr().err


def test_resume_continues_an_interrupted_run(tmp_path, manifest, cache_dir, capsys):
    config, root = write_config(tmp_path, manifest, cache_dir, epochs=1)
    fit(config)
    first = root / "logs" / "version_0"
    assert read_ckpt(first / "checkpoints" / "last.ckpt")["global_step"] == STEPS_PER_EPOCH
    fit(config, "--trainer.max_epochs", "2", "--ckpt_path", "last")
    assert "resuming from" in capsys.readouterr().out
    second = root / "logs" / "version_1"
    table = metrics(second)
    assert set(table["epoch"].dropna().astype(int)) == {1}  # epoch 0 was not trained again
    assert table["train/loss_step"].notna().sum() == STEPS_PER_EPOCH
    assert table["step"].min() >= STEPS_PER_EPOCH
    final = read_ckpt(second / "checkpoints" / "last.ckpt")
    assert final["global_step"] == 2 * STEPS_PER_EPOCH and final["epoch"] == 1


def test_ckpt_path_last_without_checkpoint_starts_from_scratch(tmp_path, manifest, cache_dir, capsys):
    config, root = write_config(tmp_path, manifest, cache_dir, epochs=1)
    fit(config, "--ckpt_path", "last", "--trainer.limit_val_batches", "0")
    assert "starting from scratch" in capsys.readouterr().out
    assert read_ckpt(root / "logs" / "version_0" / "checkpoints" / "last.ckpt")["global_step"] == STEPS_PER_EPOCH


def test_resume_after_sigkill(tmp_path, manifest, cache_dir):
    """A run killed with SIGKILL after its first checkpoint resumes from it with --ckpt_path last."""
    config, root = write_config(tmp_path, manifest, cache_dir, epochs=200)
    env = {**os.environ, "MEDFM_HOME": os.environ["MEDFM_HOME"], "OMP_NUM_THREADS": "1"}
    log = (tmp_path / "killed.log").open("wb")
    proc = subprocess.Popen(
        [medfm_script(), "pretrain", "fit", "--config", str(config), "--trainer.limit_val_batches", "0"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(root.rglob("last.ckpt")):
            assert proc.poll() is None, f"the run ended early: {(tmp_path / 'killed.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no last.ckpt within 120 s"
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    (killed,) = root.rglob("last.ckpt")
    saved = read_ckpt(killed)  # written atomically: complete even though the process was killed
    step, epoch = int(saved["global_step"]), int(saved["epoch"])
    assert step == (epoch + 1) * STEPS_PER_EPOCH
    fit(config, "--trainer.max_epochs", str(epoch + 3), "--trainer.limit_val_batches", "0", "--ckpt_path", "last")
    resumed = root / "logs" / "version_1"
    table = metrics(resumed)
    assert set(table["epoch"].dropna().astype(int)) == {epoch + 1, epoch + 2}
    assert table["step"].min() == step
    assert read_ckpt(resumed / "checkpoints" / "last.ckpt")["global_step"] == step + 2 * STEPS_PER_EPOCH


# ------------------------------------------------------------------------------------------ export


def test_export_registers_the_trunk(resnet10_run, manifest, tmp_path, capsys):
    checkpoint = resnet10_run / "checkpoints" / "last.ckpt"
    assert main(["pretrain", "export", str(checkpoint), "--name", "test-ssl"]) == 0
    assert "exported test-ssl" in capsys.readouterr().out
    home = Path(os.environ["MEDFM_HOME"])
    card = json.loads((home / "models" / "test-ssl.json").read_text())
    weights = home / "weights" / "test-ssl.safetensors"
    assert weights.is_file()
    assert card["feature_dim"] == 512 and card["profile"] == "fmcib" and card["dims"] == 3
    assert card["trunk"] == {"name": "resnet3d", "args": {"depth": 10}, "in_channels": 1}
    assert card["source"]["global_step"] == STEPS_PER_EPOCH and card["source"]["method"] == "simclr"

    trunk = {k[len("trunk.") :]: v for k, v in read_ckpt(checkpoint)["state_dict"].items() if k.startswith("trunk.")}
    loaded = registry.load_model("test-ssl")  # weights="published": the exported file in the cache
    state = loaded.model.state_dict()
    assert loaded.weights_path == weights
    assert set(state) == set(trunk)
    for key, value in trunk.items():
        assert torch.equal(state[key], value), key
    assert set(load_file(str(weights))) == set(trunk)

    out = tmp_path / "features.parquet"
    args = ["extract", str(manifest), "--model", "test-ssl", "--out", str(out), "--workers", "0", "--quiet"]
    assert main(args) == 0
    features = pd.read_parquet(out)
    assert len(features) == 12
    assert len([c for c in features.columns if c.startswith("feat_")]) == 512


def test_export_refuses_a_taken_name(resnet10_run, capsys):
    checkpoint = resnet10_run / "checkpoints" / "last.ckpt"
    assert main(["pretrain", "export", str(checkpoint), "--name", "resnet18"]) == 2
    err = capsys.readouterr().err
    assert "'resnet18' already exists" in err and len(err.strip().splitlines()) == 1
    assert not (Path(os.environ["MEDFM_HOME"]) / "models" / "resnet18.json").exists()


def test_export_of_a_store_run_needs_a_profile(resnet10_run, tmp_path, capsys):
    ckpt = read_ckpt(resnet10_run / "checkpoints" / "last.ckpt")
    data_hp = dict(ckpt["datamodule_hyper_parameters"])
    data_hp.update(manifest=None, store=str(tmp_path / "some_store"))  # as a run over a prebuilt store
    slim = {
        "state_dict": ckpt["state_dict"],
        "hyper_parameters": dict(ckpt["hyper_parameters"]),
        "datamodule_hyper_parameters": data_hp,
        "epoch": ckpt["epoch"],
        "global_step": ckpt["global_step"],
    }
    store_ckpt = tmp_path / "store_run.ckpt"
    torch.save(slim, store_ckpt)
    assert main(["pretrain", "export", str(store_ckpt), "--name", "test-store-ssl"]) == 2
    assert "pass --profile" in capsys.readouterr().err
    assert not (Path(os.environ["MEDFM_HOME"]) / "models" / "test-store-ssl.json").exists()
    # With the profile named, it exports; a 2D profile for a 3D trunk is refused.
    assert main(["pretrain", "export", str(store_ckpt), "--name", "test-store-2d", "--profile", "imagenet-224"]) == 2
    assert "does not fit a 3D trunk" in capsys.readouterr().err
    assert main(["pretrain", "export", str(store_ckpt), "--name", "test-store-ssl", "--profile", "fmcib"]) == 0
    assert registry.get_entry("test-store-ssl").profile == "fmcib"


def test_export_overwrite_replaces_the_registered_model(resnet10_run, tmp_path, capsys):
    torch.manual_seed(0)
    small = PretrainModule(method="simclr", trunk_args=SMALL, projection=[32, 16])
    small_ckpt = tmp_path / "small.ckpt"
    torch.save(
        {
            "state_dict": small.state_dict(),
            "hyper_parameters": dict(small.hparams),
            "datamodule_hyper_parameters": {"profile": "fmcib", "store": None},
        },
        small_ckpt,
    )
    assert main(["pretrain", "export", str(small_ckpt), "--name", "test-overwrite"]) == 0
    assert registry.get_entry("test-overwrite").feature_dim == 128
    big_ckpt = resnet10_run / "checkpoints" / "last.ckpt"
    assert main(["pretrain", "export", str(big_ckpt), "--name", "test-overwrite"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["pretrain", "export", str(big_ckpt), "--name", "test-overwrite", "--overwrite"]) == 0
    entry = registry.get_entry("test-overwrite")  # this process sees the new export at once
    card = json.loads((Path(os.environ["MEDFM_HOME"]) / "models" / "test-overwrite.json").read_text())
    assert entry.feature_dim == card["feature_dim"] == 512
    assert entry.weights.sha256 == card["sha256"]
    model = registry.create("test-overwrite", weights="published")
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 512)


# ------------------------------------------------------------------------------------------ user model cards


def card(name: str, profile: str, size: list[int]) -> dict:
    spec = {**profiles.FMCIB.to_dict(), "name": profile, "size": size, "description": "from a card"}
    return {
        "name": name,
        "trunk": {"name": "resnet3d", "args": SMALL, "in_channels": 1},
        "feature_dim": 128,
        "profile": profile,
        "profile_spec": spec,
        "dims": 3,
        "weights": f"{name}.safetensors",
    }


def test_hand_written_card_registers_its_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    written = card("test-card-model", "test-card-16", [16, 16, 16])
    (tmp_path / "models" / "test-card-model.json").write_text(json.dumps(written))
    assert "test-card-16" not in profiles.list_profiles()
    assert "test-card-model" in registry.list_models()
    entry = registry.get_entry("test-card-model")
    assert entry.profile == "test-card-16" and entry.feature_dim == 128 and entry.dims == 3
    profile = profiles.get_profile("test-card-16")
    assert isinstance(profile, profiles.Profile)
    assert profile.size == (16, 16, 16) and profile.hu_window == profiles.FMCIB.hu_window
    model = registry.create("test-card-model")  # random init: no weight file needed
    assert model(torch.zeros(1, 1, 16, 16, 16)).shape == (1, 128)


@pytest.mark.parametrize(
    "broken",
    [
        "{not json",
        json.dumps({"name": "test-broken-keys"}),
        json.dumps(card("test-broken-profile", "test-broken-16", [0, 16, 16])),  # an impossible profile
        json.dumps({**card("test-broken-dims", "fmcib", [50, 50, 50]), "dims": 2}),  # a 3D profile for a 2D model
    ],
)
def test_broken_card_is_skipped_with_a_warning(tmp_path, monkeypatch, broken):
    monkeypatch.setenv("MEDFM_HOME", str(tmp_path))
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "broken.json").write_text(broken)
    good = card("test-good-beside-broken", "fmcib", [50, 50, 50])
    (tmp_path / "models" / "good.json").write_text(json.dumps(good))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = registry.list_models()
    assert "test-good-beside-broken" in names and "fmcib-resnet50" in names
    assert any("broken.json" in str(w.message) and "skipped" in str(w.message) for w in caught)
