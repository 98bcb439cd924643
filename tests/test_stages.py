"""One stage table: the blocks `freeze` accepts and the stages detection and segmentation tap, for every trunk."""

from __future__ import annotations

import pytest
import torch

from medfm.detect.model import freeze_trunk
from medfm.errors import ConfigError, ModelError
from medfm.finetune.module import FinetuneModule
from medfm.models.init_weights import initialise
from medfm.models.registry import build_trunk
from medfm.models.stages import stage_channels, trunk_blocks, trunk_family, trunk_stages
from medfm.segment.model import build_unet, freeze_encoder

DENSE_UNTIL_BLOCK2 = [
    "features.conv0",
    "features.norm0",
    "features.relu0",
    "features.pool0",
    "features.denseblock1",
    "features.transition1",
    "features.denseblock2",
]


def test_densenet121_freezes_the_same_blocks_in_every_command():
    """finetune, detect and segment accept `denseblock2` for DenseNet121 and freeze the same blocks."""
    finetune = FinetuneModule(task="binary", trunk="densenet121", in_channels=1, freeze="trunk-until-denseblock2")
    detect_trunk, _ = build_trunk("densenet121", 1)
    detect = freeze_trunk(detect_trunk, "trunk-until-denseblock2")
    segment = freeze_encoder(build_unet("densenet121", None, 1, 2), "encoder-until-denseblock2")
    assert finetune.frozen == detect == segment == DENSE_UNTIL_BLOCK2
    assert not any(p.requires_grad for p in finetune.trunk.features.denseblock2.parameters())
    assert all(p.requires_grad for p in finetune.trunk.features.denseblock3.parameters())


def test_a_parent_module_name_still_freezes_up_to_its_last_block():
    """`trunk-until-features` (DenseNet's children as finetune named them before) freezes the whole feature stack."""
    trunk, _ = build_trunk("densenet121", 1)
    frozen = freeze_trunk(trunk, "trunk-until-features")
    assert frozen == trunk_blocks(trunk) and frozen[-1] == "features.norm5"
    with pytest.raises(ConfigError, match="no block 'layer2'"):
        freeze_trunk(build_trunk("densenet121", 1)[0], "trunk-until-layer2")


def test_stage_table_strides_and_channels():
    """ResNet18: five stages at strides 2…32 with 64, 64, 128, 256, 512 channels; the output is each stage's end."""
    trunk, _ = build_trunk("resnet18", 1)
    stages = trunk_stages(trunk)
    assert trunk_family(trunk) == "resnet"
    assert [s.stride for s in stages] == [2, 4, 8, 16, 32]
    assert [s.output for s in stages] == ["relu", "layer1", "layer2", "layer3", "layer4"]
    assert stage_channels(trunk, stages) == [64, 64, 128, 256, 512]
    dense, _ = build_trunk("densenet121", 1)
    assert [s.output for s in trunk_stages(dense)][1:] == [
        "features.denseblock1",
        "features.denseblock2",
        "features.denseblock3",
        "features.norm5",
    ]
    assert stage_channels(dense, trunk_stages(dense)) == [64, 256, 512, 1024, 1024]


def test_a_trunk_without_stages_freezes_by_children_and_is_refused_by_detection():
    trunk, _ = build_trunk("mobilenet-v3-small", 1)
    assert trunk_family(trunk) is None
    assert trunk_blocks(trunk) == [name for name, _ in trunk.named_children()]
    with pytest.raises(ModelError, match="detection needs a trunk of the ResNet"):
        trunk_stages(trunk, "detection")


def test_one_init_vocabulary(tmp_path):
    """random → None; a state dict or a checkpoint file → the transfer report; an unknown word is refused plainly."""
    trunk, _ = build_trunk("resnet18", 1)
    assert initialise(trunk, "resnet18", "random") is None and initialise(trunk, "resnet18", None) is None
    source, _ = build_trunk("resnet18", 1)
    path = tmp_path / "source.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    report = initialise(trunk, "resnet18", str(path), min_coverage=0.99)
    assert report.coverage == pytest.approx(1.0)
    assert torch.equal(trunk.conv1.weight, source.conv1.weight)
    with pytest.raises(ModelError, match="neither random, published, a registered model"):
        initialise(trunk, "resnet18", "pubished")
    with pytest.raises(ModelError, match="architecture, not a registered model"):
        initialise(build_trunk("resnet3d", 1, depth=10)[0], "resnet3d", "published")


def test_pretrain_init_weights_speaks_the_same_vocabulary(tmp_path):
    """pretrain's init_weights takes what init takes: a checkpoint path, and `published` is understood (an
    architecture has none: said plainly, not "file not found")."""
    from medfm.pretrain.module import PretrainModule

    small = {"depth": 10, "widen_factor": 0.25}
    source = PretrainModule(trunk="resnet3d", trunk_args=small)
    path = tmp_path / "trunk.pt"
    torch.save(source.trunk.state_dict(), path)
    module = PretrainModule(trunk="resnet3d", trunk_args=small, init_weights=str(path))
    assert module.transfer_report.coverage == pytest.approx(1.0)
    assert torch.equal(module.trunk.conv1.weight, source.trunk.conv1.weight)
    assert PretrainModule(trunk="resnet3d", trunk_args=small, init_weights="random").transfer_report is None
    with pytest.raises(ModelError, match="architecture, not a registered model"):
        PretrainModule(trunk="resnet3d", trunk_args=small, init_weights="published")


def test_a_dilated_resnet_with_resnet_names_has_no_stage_table():
    import torchvision

    # torchvision's own names, but layers 3-4 dilated instead of strided: stride 8, not 32
    dilated = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    with pytest.raises(ModelError, match=r"detection needs a trunk each of whose stages after the first halves the "
                       r"resolution; ResNet has stage strides \[2, 4, 8, 8, 8\] \(dilated or changed stages\)"):  # fmt: skip
        trunk_stages(dilated, "detection")
    plain = trunk_stages(torchvision.models.resnet50(weights=None))
    assert [s.stride for s in plain] == [2, 4, 8, 16, 32]
    # a 3D ResNet whose first convolution keeps the resolution: the same table, strides measured
    stem_stride_1 = build_trunk("resnet3d", 1, depth=10, conv1_t_stride=1)[0]
    assert [s.stride for s in trunk_stages(stem_stride_1)] == [1, 2, 4, 8, 16]
