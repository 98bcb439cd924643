"""The published checkpoints of the studies medfm follows, registered as models of the zoo.

Each entry is an architecture of :mod:`medfm.models.registry` with a weight file: its URL, its cache file name,
the checkpoint layout it is stored in (:mod:`medfm.models.adapters`, so heads are dropped by rule) and the
profile that feeds it. ``medfm weights list`` shows them; ``medfm weights download NAME`` fetches one.
No SHA-256 is published for these files, so none is pinned: the hash of what was loaded is recorded instead.

- RadiologyNET (Napravnik et al. 2024): ten 2D trunks pre-trained on 1.9M multi-modality radiology images,
  ``.tar.gz`` archives of ``model_state`` checkpoints; inputs in [0, 1], grey repeated to 3 channels.
- MedicalNet / Med3D (Chen et al. 2019) and Models Genesis (Zhou et al. 2019), the 3D baselines the FMCIB paper
  compares against: MedicalNet's 3D ResNets 10/18/34/50 (its "23 datasets" release, ``state_dict`` with
  ``module.`` keys, the ``conv_seg`` segmentation head dropped) and the Genesis Chest CT U-Net's encoder
  (``state_dict`` with ``module.`` keys, the decoder dropped), both from their authors' Hugging Face repositories.
- "How well do self-supervised models transfer to medical imaging?" (Anton et al. 2022): ImageNet ResNet50s
  from PIRL, MoCo v2, SimCLR-v1, BYOL and SwAV (SimCLR-v1 and BYOL are published for TensorFlow / JAX and must
  be converted by the user), and the chest X-ray MoCo models MoCo-CXR and MIMIC-CheXpert.
"""

from __future__ import annotations

from functools import partial

from medfm.models import hub
from medfm.models.backbones import MEDICALNET_SHORTCUT, GenesisEncoder, medicalnet_resnet
from medfm.models.registry import get_entry, register

RADIOLOGYNET_URL = "http://radiologynet.riteh.hr/models/{}.tar.gz"
# registry architecture -> RadiologyNET's archive name
RADIOLOGYNET = {
    "densenet121": "DenseNet121",
    "efficientnet-b3": "EfficientNetB3",
    "efficientnet-b4": "EfficientNetB4",
    "inception-v3": "InceptionV3",
    "mobilenet-v3-large": "MobileNetV3Large",
    "mobilenet-v3-small": "MobileNetV3Small",
    "resnet18": "ResNet18",
    "resnet34": "ResNet34",
    "resnet50": "ResNet50",
    "vgg16": "VGG16",
}

MIMIC_CHEXPERT_URL = "https://dl.fbaipublicfiles.com/CovidPrognosis/pretrained_models/{}"
SIMCLR_CONVERT = (
    "convert the TensorFlow checkpoint to a PyTorch state dict with https://github.com/tonylins/simclr-converter"
)
BYOL_CONVERT = (
    "convert the haiku pickle to a PyTorch state dict (the ssl-transfer study's BYOL converter; it needs jax, "
    "jaxlib, dill and dm-haiku)"
)


def _add(name: str, arch: str, profile: str, spec: hub.WeightsSpec, description: str) -> None:
    """Register ``name``: the architecture ``arch`` with the weight file ``spec``."""
    entry = get_entry(arch)
    register(name, feature_dim=entry.feature_dim, profile=profile, weights=spec, description=description, dims=2)(
        entry.builder
    )


for _arch, _archive in RADIOLOGYNET.items():
    _add(
        f"radiologynet-{_arch}",
        _arch,
        "radiologynet-224",
        hub.WeightsSpec(
            filename=f"radiologynet-{_archive}.tar.gz", url=RADIOLOGYNET_URL.format(_archive), layout="radiologynet"
        ),
        f"RadiologyNET {_archive}: {get_entry(_arch).description.split(':', 1)[0]} pre-trained on 1.9M radiology "
        "images (CT, MR, CR, DX, ...)",
    )

# The SSL-transfer study's ImageNet ResNet50s (all 2048-d, ImageNet mean/std at 224²).
_SSL_RESNET50 = {
    "pirl-resnet50": (
        "https://www.dropbox.com/sh/87d24jqsl6ra7t2/AADN4jKnvTI0U5oT6hTmQZz8a/PIRL.pth?dl=1",
        "pirl-resnet50.pth",
        "pirl",
        None,
        "PIRL",
    ),
    "mocov2-resnet50": (
        "https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
        "moco_v2_800ep_pretrain.pth.tar",
        "moco",
        None,
        "MoCo v2, 800 epochs",
    ),
    "simclr-v1-resnet50": (
        "https://storage.cloud.google.com/simclr-gcs/checkpoints/ResNet50_1x.zip",
        "simclr-v1-resnet50-1x.pth",
        "simclr",
        SIMCLR_CONVERT,
        "SimCLR-v1 1x",
    ),
    "byol-resnet50": (
        "https://storage.googleapis.com/deepmind-byol/checkpoints/pretrain_res50x1.pkl",
        "byol-resnet50-1x.pth",
        "byol",
        BYOL_CONVERT,
        "BYOL 1x",
    ),
    "swav-resnet50": (
        "https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
        "swav_800ep_pretrain.pth.tar",
        "swav",
        None,
        "SwAV, 800 epochs",
    ),
}
for _name, (_url, _file, _layout, _convert, _what) in _SSL_RESNET50.items():
    _add(
        _name,
        "resnet50",
        "imagenet-224",
        hub.WeightsSpec(filename=_file, url=_url, layout=_layout, convert=_convert),
        f"{_what} self-supervised ResNet50 on ImageNet (the SSL-transfer study's checkpoints)",
    )

# Chest X-ray MoCo models of the same study: MoCo-CXR (CheXpert) and MIMIC-CheXpert (three MoCo learning rates).
for _name, _arch, _file in (
    ("moco-cxr-resnet18", "resnet18", "r8w-00001"),
    ("moco-cxr-densenet121", "densenet121", "d1w-00001"),
):
    _add(
        _name,
        _arch,
        "imagenet-224",
        hub.WeightsSpec(
            filename=f"moco-cxr-{_file}.pth.tar",
            url=f"https://storage.googleapis.com/moco-cxr/{_file}.pth.tar",
            layout="moco",
        ),
        f"MoCo-CXR {_arch}: MoCo v2 on CheXpert chest X-rays from ImageNet weights, lr 1e-4 (Sowrirajan et al. 2021)",
    )
for _lr in ("0.01", "0.1", "1.0"):
    _file = f"mimic-chexpert_lr_{_lr}_bs_128_fd_128_qs_65536.pt"
    _add(
        f"mimic-chexpert-densenet121-lr{_lr}",
        "densenet121",
        "imagenet-224",
        hub.WeightsSpec(filename=_file, url=MIMIC_CHEXPERT_URL.format(_file), layout="moco"),
        f"MIMIC-CheXpert DenseNet121: MoCo on MIMIC-CXR + CheXpert, learning rate {_lr} (Sriram et al. 2021)",
    )


# The FMCIB paper's 3D baselines. MedicalNet's files: https://huggingface.co/TencentMedicalNet (one repository per
# depth); Models Genesis' PyTorch file: https://huggingface.co/MrGiovanni/ModelsGenesis.
MEDICALNET_URL = "https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet{0}/resolve/main/resnet_{0}_23dataset.pth"
for _depth in (10, 18, 34, 50):
    register(
        f"med3d-resnet{_depth}",
        feature_dim=2048 if _depth == 50 else 512,
        profile="medicalnet",
        weights=hub.WeightsSpec(
            filename=f"medicalnet-resnet_{_depth}_23dataset.pth",
            url=MEDICALNET_URL.format(_depth),
            layout="medicalnet",
        ),
        description=(
            f"MedicalNet (Med3D) 3D ResNet{_depth}, shortcut {MEDICALNET_SHORTCUT[_depth]}, stages 3-4 dilated "
            f"(stride 8 overall), pre-trained on 23 segmentation data sets; pooled last stage, "
            f"{2048 if _depth == 50 else 512}-d"
        ),
    )(partial(medicalnet_resnet, _depth))

register(
    "models-genesis",
    feature_dim=512,
    profile="models-genesis",
    weights=hub.WeightsSpec(
        filename="models-genesis-Genesis_Chest_CT.pt",
        url="https://huggingface.co/MrGiovanni/ModelsGenesis/resolve/main/Genesis_Chest_CT.pt",
        layout="models-genesis",
    ),
    description=(
        "Models Genesis (Genesis Chest CT, self-supervised restoration on LUNA16): its 3D U-Net's encoder, "
        "pooled deepest stage, 512-d"
    ),
)(GenesisEncoder)
