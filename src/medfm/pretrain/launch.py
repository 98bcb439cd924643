"""``medfm pretrain``: LightningCLI over :class:`PretrainModule` and :class:`PretrainData`.

``medfm pretrain fit --config run.yaml [--trainer.devices 2 …]`` trains (see :mod:`medfm.train.cli` for the
defaults, ``--print_config`` and ``--ckpt_path last``); ``medfm pretrain export CKPT --name NAME`` registers the
trained trunk (:mod:`medfm.pretrain.export`).
"""

from __future__ import annotations

from medfm.pretrain.data import PretrainData
from medfm.pretrain.module import PretrainModule
from medfm.train.cli import MedfmCLI, launch


def run_cli(args: list[str] | None = None) -> MedfmCLI:
    """Run ``medfm pretrain`` with LightningCLI on ``args`` (e.g. ``["fit", "--config", "run.yaml"]``)."""
    return launch(
        PretrainModule,
        PretrainData,
        args,
        prog="medfm pretrain",
        default_root="outputs/pretrain",
        description="Pre-train a trunk: `fit --config run.yaml` (configs/pretrain/). "
        "Register the result with `medfm pretrain export CKPT --name NAME`.",
    )
