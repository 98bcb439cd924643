"""``medfm segment``: LightningCLI over :class:`SegmentModule` and :class:`SegmentData`, plus ``predict``/``sweep``.

``medfm segment fit --config seg.yaml`` trains, prints the encoder's transfer report, restores the best validation
weights, tests them once and writes results, curves, the transfer report and the model card into the run's log
folder (:mod:`medfm.segment.outputs`). ``medfm segment predict MODEL_CARD MANIFEST --out DIR [--overlays]`` writes
masks with each source image's geometry. ``medfm segment sweep --config seg.yaml --out DIR --fractions 1 0.1
--repeats 3`` runs training fractions × seeds (the fine-tuning sweep) and writes ``sweep.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfm.segment.data import SegmentData, linked_class_names
from medfm.segment.module import SegmentModule
from medfm.train.cli import EvaluatedCLI, MedfmCLI, command_main, launch

DESCRIPTION = (
    "Train a U-Net on a pre-trained encoder: `fit --config seg.yaml` (configs/segment/). Also "
    "`medfm segment predict MODEL_CARD MANIFEST --out DIR [--overlays]` and "
    "`medfm segment sweep --config seg.yaml --out DIR --fractions 1 0.1 --repeats 3`."
)


class SegmentCLI(EvaluatedCLI):
    """Links ``data.classes`` to ``model.class_names``; prints the transfer report; after fit tests and writes outputs."""

    def add_arguments_to_parser(self, parser) -> None:  # noqa: ANN001 - LightningArgumentParser
        """``model.class_names`` follows ``data.classes`` (names in channel order)."""
        parser.link_arguments("data.classes", "model.class_names", compute_fn=linked_class_names)

    def before_fit(self) -> None:
        """Resume handling as every command; print what the encoder received."""
        super().before_fit()
        if self.trainer.is_global_zero:
            print(self.model.init_report.summary())

    def write_outputs(self, folder: Path) -> str:
        """Results, curves, the transfer report and the model card (:mod:`medfm.segment.outputs`)."""
        from medfm.segment.outputs import write_run_outputs

        card = write_run_outputs(self.model, self.datamodule, folder)
        dice = self.model.test_results.get("dice", {})
        return (
            f"test mean Dice {dice.get('value', float('nan')):.4f} (95% CI {dice.get('low', float('nan')):.4f}–"
            f"{dice.get('high', float('nan')):.4f}); best {self.model.best}; model card {card}"
        )


def run_cli(args: list[str] | None = None) -> MedfmCLI:
    """Run ``medfm segment`` with LightningCLI on ``args`` (e.g. ``["fit", "--config", "seg.yaml"]``)."""
    return launch(SegmentModule, SegmentData, args, "segment", DESCRIPTION, SegmentCLI)


def _predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medfm segment predict",
        description="segment every image of a manifest with a trained model; masks keep each image's geometry",
    )
    p.add_argument("card", help="model.json written by `medfm segment fit`")
    p.add_argument("manifest", help="CSV/Parquet with image_path (+ series_uid); other columns are carried through")
    p.add_argument("--out", required=True, help="folder for the masks, overlays and predictions.csv")
    p.add_argument("--overlays", action="store_true", help="also write PNG overlays (3D: three orthogonal slices)")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="stop at a bad row, or skip it")
    p.add_argument(
        "--dicom-seg",
        choices=("auto", "always", "never"),
        default="auto",
        help="also write a DICOM-SEG referencing the source series: auto (for DICOM series folders), always (any "
        "other input is a row error) or never",
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--resume", action="store_true", help="keep the rows an interrupted run finished")
    return p


def _predict_command(argv: list[str]) -> int:
    """``medfm segment predict …``."""
    from medfm.errors import run_guarded

    args = _predict_parser().parse_args(argv)
    return run_guarded(lambda: _predict(args), "finished rows are kept, continue with --resume")


def _predict(args: argparse.Namespace) -> None:
    """Segment a manifest with a trained model and say where the masks went."""
    from medfm.segment.predict import predict_manifest

    dest = predict_manifest(
        args.card,
        args.manifest,
        args.out,
        args.overlays,
        args.on_error,
        args.device,
        not args.quiet,
        args.dicom_seg,
        resume=args.resume,
    )
    print(f"wrote {dest}")


def main(argv: list[str]) -> int:
    """``medfm segment …``: ``predict`` and ``sweep`` here; ``fit``, ``validate``, ``--help`` … go to LightningCLI."""
    return command_main("segment", argv, run_cli, _predict_command)


if __name__ == "__main__":  # `python -m medfm.segment.launch fit …` (DDP relaunches the same command line)
    sys.exit(main(sys.argv[1:]))
