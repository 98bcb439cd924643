"""What a segmentation run leaves behind, and how a trained segmenter is loaded again.

In the run folder: ``results.json`` (test Dice with its CI, per-class Dice / HD95 / ASSD in mm, best epoch, split
sizes, initialisation with the encoder's coverage apart from the decoder's), ``init_report.json`` (the full transfer
report), ``test_cases.csv`` (metrics per test case), ``curves.csv``/``curves.png``, ``errors.csv`` (skipped rows),
and ``model.safetensors`` with its card ``model.json`` (classes and label values, encoder, decoder, profile with its
full definition, spacing, window, metrics, SHA-256).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
from safetensors.torch import load_file

from medfm.data.outputs import write_json, write_table, write_weights
from medfm.errors import ModelError
from medfm.models import hub
from medfm.models.registry import trunk_args
from medfm.segment.data import SegmentData
from medfm.segment.model import SegmentationUNet, build_unet
from medfm.segment.module import SegmentModule
from medfm.train.curves import write_curves
from medfm.train.outputs import write_splits

CARD_KIND = "medfm-segmenter"


def write_run_outputs(module: SegmentModule, data: SegmentData, folder: str | os.PathLike[str]) -> Path:
    """results.json, init_report.json, test_cases.csv, curves, errors.csv, model.safetensors + model.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    hp, dp = module.hparams, data.hparams
    init = module.init_report.to_dict()
    write_json(init, folder / "init_report.json")
    results = {
        "task": "segmentation",
        "classes": module.class_names,
        "init": hp.init,
        "encoder_coverage": init["encoder_coverage"],
        "decoder_coverage": 0.0,
        "freeze": hp.freeze,
        "frozen_blocks": module.frozen,
        "train_fraction": dp.train_fraction,
        "fraction_seed": dp.fraction_seed,
        "sizes": data.sizes(),
        "skipped_rows": len(data.errors),
        "best": module.best,
        "test": module.test_results,
    }
    write_json(results, folder / "results.json")
    write_splits(folder, [c.row for c in data.cases.cases], data.splits, data.cases.table)
    cases = getattr(module, "test_cases", None)
    if cases and cases["index"]:
        rows = {"row": [data.cases.cases[i].row for i in cases["index"]]}
        for metric in ("dice", "hd95", "assd"):
            values = np.asarray(cases.get(metric, []))
            for k, name in enumerate(module.class_names):
                if len(values):
                    rows[f"{metric}/{name}"] = values[:, k]
        write_table(pd.DataFrame(rows), folder / "test_cases.csv")
    if data.errors:
        bad = data.cases.table.iloc[sorted(data.errors)].copy()
        bad.insert(0, "row", sorted(data.errors))
        bad["reason"] = [data.errors[r] for r in sorted(data.errors)]
        write_table(bad, folder / "errors.csv")
    title = f"segmentation {hp.encoder} U-Net ({hp.init}) · {', '.join(module.class_names)}"
    write_curves(module.history, folder, title)
    weights = write_weights(module.net, folder / "model.safetensors")
    card = {
        "kind": CARD_KIND,
        "dims": module.net.dims,
        "classes": module.class_names,
        "class_map": data.class_map.to_dict(),
        "encoder": {
            "name": hp.encoder,
            "args": trunk_args(hp.encoder, hp.encoder_args),
            "in_channels": hp.in_channels,
        },
        "decoder_channels": [block[0].out_channels for block in module.net.decoder],
        "profile": data.profile.name,
        "profile_spec": data.profile.to_dict(),
        "spacing": dp.spacing,
        "hu_window": dp.hu_window,
        "patch_size": dp.patch_size,
        "overlap": hp.overlap,
        "sw_batch_size": hp.sw_batch_size,
        "weights": weights.name,
        "sha256": hub.sha256_of(weights),
        "init": {k: v for k, v in init.items() if k != "encoder_report"},
        "metrics": module.test_results,
        "best": module.best,
    }
    return write_json(card, folder / "model.json")


def load_segmenter(card_path: str | os.PathLike[str]) -> tuple[SegmentationUNet, dict]:
    """The trained U-Net (eval mode) of a card, with the card; the weights' SHA-256 is checked."""
    card_path = Path(card_path)
    try:
        card = json.loads(card_path.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{card_path}: not a readable model card ({err})") from None
    if card.get("kind") != CARD_KIND:
        raise ModelError(f"{card_path}: not a segmentation model card (kind {card.get('kind')!r})")
    weights = card_path.parent / card["weights"]
    if not weights.is_file():
        raise ModelError(f"{weights}: the card's weight file is missing")
    if card.get("sha256") and hub.sha256_of(weights) != card["sha256"]:
        raise ModelError(f"{weights}: SHA-256 differs from the card's; the file was changed or replaced")
    enc = card["encoder"]
    net = build_unet(enc["name"], enc["args"], enc["in_channels"], len(card["classes"]) + 1, card["decoder_channels"])
    net.load_state_dict(load_file(str(weights)), strict=True)
    return net.eval(), card
