"""``medfm detect``: LightningCLI over :class:`DetectModule` + :class:`DetectData`, and ``predict``.

``medfm detect fit --config det.yaml`` trains, restores the best validation mAP weights, tests them once and writes
``results.json``, the curves and the model card into the run's log folder (:mod:`medfm.detect.outputs`). The class
names and the input (size, channels, the profile's mean/std) are linked from the data to the model, so a config
names them once. ``medfm detect predict MODEL MANIFEST --out boxes.csv [--overlays DIR]`` runs a trained detector.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfm.detect.data import DetectData
from medfm.detect.module import DetectModule
from medfm.train.cli import EvaluatedCLI, MedfmCLI, command_main, fit_summary, launch

DESCRIPTION = (
    "Box detection (Faster R-CNN / RetinaNet + FPN) on any 2D trunk: `fit --config det.yaml` "
    "(configs/detect/). Predict: `medfm detect predict MODEL_CARD_OR_CKPT MANIFEST --out boxes.csv`. Fractions × "
    "seeds: `medfm detect sweep --config det.yaml --out DIR --fractions 1 0.1 --repeats 3`."
)


class DetectCLI(EvaluatedCLI):
    """Links classes and input from the data to the model; after fit: test once, write results and the card."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        """The model's classes and input spec come from the instantiated data module."""
        parser.link_arguments("data.classes", "model.classes", apply_on="instantiate")
        parser.link_arguments("data.input_spec", "model.input_spec", apply_on="instantiate")

    def write_outputs(self, folder: Path) -> str:
        """results.json, curves and the model card (:mod:`medfm.detect.outputs`)."""
        from medfm.detect.outputs import write_run_outputs

        return fit_summary(self.model, write_run_outputs(self.model, self.datamodule, folder))


def run_cli(args: list[str] | None = None) -> MedfmCLI:
    """Run ``medfm detect`` with LightningCLI on ``args`` (e.g. ``["fit", "--config", "det.yaml"]``)."""
    return launch(DetectModule, DetectData, args, "detect", DESCRIPTION, DetectCLI)


def predict_parser() -> argparse.ArgumentParser:
    """The arguments of ``medfm detect predict``."""
    p = argparse.ArgumentParser(
        prog="medfm detect predict",
        description="run a trained detector on a manifest (CSV of boxes or images, YOLO folder/list, COCO json); "
        "boxes in each image's own pixel coordinates",
    )
    p.add_argument("model", help="model.json of `medfm detect fit`, or one of its Lightning checkpoints (.ckpt)")
    p.add_argument("manifest", help="images to detect on (with true boxes, overlays show them too)")
    p.add_argument("--out", required=True, help="boxes.csv (or .parquet): image_path, x_min … y_max, label, score")
    p.add_argument("--overlays", help="folder for PNGs of predicted (red) and true (green) boxes")
    p.add_argument("--score-threshold", type=float, default=0.5, help="keep boxes scoring at least this (0.5)")
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "csv", "yolo", "coco", "images"],
        help="output format (auto: from the --out name)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    p.add_argument(
        "--on-error", default="raise", choices=["raise", "skip"], help="stop at a bad row, or list it and go on"
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _predict_command(argv: list[str]) -> int:
    """``medfm detect predict …``."""
    from medfm.errors import run_guarded

    args = predict_parser().parse_args(argv)
    return run_guarded(lambda: _predict(args))


def _predict(args: argparse.Namespace) -> None:
    """Run a trained detector over a manifest and say where the boxes went."""
    from medfm.detect.outputs import predict_boxes

    path = predict_boxes(
        args.model,
        args.manifest,
        args.out,
        overlays=args.overlays,
        score_threshold=args.score_threshold,
        format=args.format,
        batch_size=args.batch_size,
        on_error=args.on_error,
        progress=not args.quiet,
        device=args.device,
    )
    print(f"wrote {path}" + (f"; overlays in {args.overlays}" if args.overlays else ""))


def main(argv: list[str]) -> int:
    """``medfm detect``: ``predict`` and ``sweep`` here; fit, validate, --print_config, --help go to LightningCLI."""
    return command_main("detect", argv, run_cli, _predict_command)


if __name__ == "__main__":  # `python -m medfm.detect.launch fit …` (DDP relaunches the same command line)
    sys.exit(main(sys.argv[1:]))
