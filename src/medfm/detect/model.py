"""A detector on any registered 2D trunk: the trunk's stages → an FPN → torchvision Faster R-CNN or RetinaNet.

The trunk is built from the registry (torchvision module names kept), initialised like a fine-tuning trunk
(random, its published weights, a registered model's weights, or any checkpoint through the weight transfer),
frozen as asked, and then its stage outputs are tapped with torchvision's ``create_feature_extractor``:

- ResNet family: ``layer1`` … ``layer4`` (strides 4, 8, 16, 32);
- DenseNet family: ``features.denseblock1`` … ``denseblock3`` and ``features.norm5``.

Faster R-CNN takes the four levels and a max-pooled fifth; RetinaNet the last three with P6 and P7 (as
torchvision's own RetinaNet). Either way there are five feature maps, so ``anchor_sizes`` has five sizes, in
pixels of the network's input. The detector's own input transform (``GeneralizedRCNNTransform``) normalises with
the medfm profile's mean and std and is given ``min_size``/``max_size`` equal to the image size the data module
already resized to, so it never resizes again (scale 1), and boxes come back in that same frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from medfm.errors import ConfigError
from medfm.models.init_weights import initialise
from medfm.models.registry import build_trunk
from medfm.models.stages import trunk_blocks, trunk_stages
from medfm.models.transfer import TransferReport
from medfm.train.freeze import freeze_blocks

ARCHS = ("faster_rcnn", "retinanet")


def freeze_trunk(trunk: nn.Module, freeze: str) -> list[str]:
    """Freeze blocks: ``none``, ``trunk``, or ``trunk-until-NAME`` (up to and including NAME, e.g. layer2 or
    denseblock2); returns the frozen blocks' dotted names."""
    return freeze_blocks(trunk, trunk_blocks(trunk), freeze, "trunk")


class TrunkFPN(nn.Module):
    """The trunk's stage outputs (``body``, torchvision names kept) through a feature pyramid (``fpn``)."""

    def __init__(self, trunk: nn.Module, arch: str, channels: int = 256, in_channels: int = 1) -> None:
        super().__init__()
        stages = [stage.output for stage in trunk_stages(trunk, "detection")[1:]]  # strides 4 … 32
        if arch == "retinanet":
            stages = stages[1:]
        self.body = create_feature_extractor(trunk, return_nodes={name: str(i) for i, name in enumerate(stages)})
        was_training = trunk.training
        self.body.eval()
        with torch.no_grad():
            probe = self.body(torch.zeros(1, in_channels, 64, 64))
        self.body.train(was_training)
        widths = [int(v.shape[1]) for v in probe.values()]
        extra = LastLevelP6P7(channels, channels) if arch == "retinanet" else LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork(widths, channels, extra_blocks=extra)
        self.out_channels = channels

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pyramid levels ``'0'``, ``'1'``, … (and ``'pool'`` / P6, P7) of a batch."""
        return self.fpn(self.body(x))


def build_detector(
    arch: str,
    backbone: TrunkFPN,
    num_classes: int,
    image_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    anchor_sizes: Sequence[float] = (16, 32, 64, 128, 256),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_proposals: int = 1000,
    roi_samples: int = 128,
    head_width: int = 256,
    detections_per_image: int = 100,
    score_threshold: float = 0.05,
) -> nn.Module:
    """torchvision Faster R-CNN or RetinaNet over ``backbone`` for ``num_classes`` classes (+ background at 0),
    normalising inside with the profile's ``mean``/``std`` and never resizing the ``image_size`` inputs.

    Faster R-CNN: ``rpn_proposals`` kept after NMS in training (half of them at inference), ``roi_samples`` regions
    per image for the box head's loss, a box head of two ``head_width`` layers (torchvision's COCO defaults are
    2000, 512 and 1024: far more than images with a few lesions need, and most of the CPU time). RetinaNet:
    ``rpn_proposals`` candidates per level before NMS."""
    if arch not in ARCHS:
        raise ConfigError(f"arch={arch!r}; allowed {ARCHS}")
    if len(anchor_sizes) != 5:
        raise ConfigError(f"anchor_sizes needs one size per pyramid level (5), got {list(anchor_sizes)}")
    common = {
        "min_size": int(min(image_size)),
        "max_size": int(max(image_size)),
        "image_mean": [float(m) for m in mean],
        "image_std": [float(s) for s in std],
    }
    ratios = (tuple(float(r) for r in aspect_ratios),) * 5
    if arch == "faster_rcnn":
        anchors = AnchorGenerator(tuple((float(s),) for s in anchor_sizes), ratios)
        return FasterRCNN(
            backbone,
            rpn_anchor_generator=anchors,
            rpn_pre_nms_top_n_train=2 * rpn_proposals,
            rpn_post_nms_top_n_train=rpn_proposals,
            rpn_pre_nms_top_n_test=rpn_proposals,
            rpn_post_nms_top_n_test=max(1, rpn_proposals // 2),
            box_head=TwoMLPHead(backbone.out_channels * 7 * 7, head_width),
            box_predictor=FastRCNNPredictor(head_width, num_classes + 1),
            box_batch_size_per_image=roi_samples,
            box_detections_per_img=detections_per_image,
            box_score_thresh=score_threshold,
            **common,
        )
    scales = tuple(tuple(float(s) * 2 ** (k / 3) for k in range(3)) for s in anchor_sizes)
    return RetinaNet(
        backbone,
        num_classes=num_classes + 1,
        anchor_generator=AnchorGenerator(scales, ratios),
        detections_per_img=detections_per_image,
        score_thresh=score_threshold,
        topk_candidates=rpn_proposals,
        **common,
    )


def make_detector(
    arch: str,
    trunk_name: str,
    num_classes: int,
    in_channels: int,
    image_size: Sequence[int],
    mean: Sequence[float],
    std: Sequence[float],
    init: str | None = "random",
    min_coverage: float = 0.5,
    freeze: str = "none",
    fpn_channels: int = 256,
    **detector_args: object,
) -> tuple[nn.Module, TransferReport | None, list[str]]:
    """The whole detector from a registered trunk name: (detector, transfer report or None, frozen blocks)."""
    trunk, _ = build_trunk(trunk_name, in_channels)
    report = initialise(trunk, trunk_name, init, min_coverage)
    frozen = freeze_trunk(trunk, freeze)
    backbone = TrunkFPN(trunk, arch, fpn_channels, in_channels)
    detector = build_detector(arch, backbone, num_classes, image_size, mean, std, **detector_args)
    return detector, report, frozen
