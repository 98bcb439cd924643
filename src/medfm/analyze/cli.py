"""``medfm analyze``: invariance, saliency, perceptual, reconstruct — parse, call the Python API, print.

MODEL is a registry name (with ``--weights published|PATH|random``; default: published when cached) or the
``model.json`` of ``medfm finetune fit``; several models may be given (repeated, or a comma list).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfm.errors import MedfmError

SUBCOMMANDS = ("invariance", "saliency", "perceptual", "reconstruct")


def _models(args: argparse.Namespace, names: list[str]) -> list:
    from medfm.analyze.models import load_models

    return load_models(names, args.weights, args.profile, args.in_channels, args.seed, args.min_coverage)


def _split_manifest(args: argparse.Namespace, count: int) -> tuple[list[str], list[str]]:
    """Models first, then ``count`` trailing inputs (the manifest, or A and B); none with --pairs."""
    values = list(args.inputs)
    if getattr(args, "pairs", None):
        return values, []
    if len(values) <= count:
        wanted = "MANIFEST" if count == 1 else "A B"
        raise MedfmError(f"give MODEL [MODEL ...] {wanted}; got {values}")
    return values[:-count], values[-count:]


def _strengths(items: list[str] | None) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for item in items or []:
        name, _, values = item.partition("=")
        try:
            out[name.strip()] = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise MedfmError(f"--strength {item!r}: write NAME=V1,V2 (numbers), e.g. rotation=10,45") from None
        if not out[name.strip()]:
            raise MedfmError(f"--strength {item!r}: no values; write NAME=V1,V2")
    return out


def _window(values: list[int] | None) -> int | tuple[int, ...] | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _invariance(args: argparse.Namespace) -> None:
    from medfm.analyze.invariance import run_invariance, run_pair_invariance

    names, rest = _split_manifest(args, 1)
    strengths = _strengths(args.strength)  # bad input is reported before any model is built
    models = _models(args, names)
    common = dict(
        limit=args.limit,
        coords=args.coords,
        on_error=args.on_error,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
        shrinkage=args.shrinkage,
    )
    if args.pairs:
        result = run_pair_invariance(models, args.pairs, args.out, **common)
    else:
        result = run_invariance(
            models,
            rest[0],
            args.out,
            transforms=args.transforms,
            strengths=strengths,
            progress=not args.quiet,
            **common,
        )
    print((result.folder / "summary.md").read_text())


def _saliency(args: argparse.Namespace) -> None:
    from medfm.analyze.saliency import run_saliency

    names, rest = _split_manifest(args, 1)
    result = run_saliency(
        _models(args, names),
        rest[0],
        args.out,
        methods=tuple(args.methods) if args.methods else None,
        window=_window(args.patch),
        stride=_window(args.stride),
        target=args.target,
        layer=args.layer,
        steps=args.steps,
        limit=args.limit,
        coords=args.coords,
        on_error=args.on_error,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        batch_size=args.batch_size,
        overlays=not args.no_overlays,
        progress=not args.quiet,
        resume=args.resume,
    )
    print((result.folder / "summary.md").read_text())


def _perceptual(args: argparse.Namespace) -> None:
    import pandas as pd

    from medfm.analyze.perceptual import run_perceptual
    from medfm.analyze.report import interval_text

    names, rest = _split_manifest(args, 2)
    if not args.pairs and args.reference:
        raise MedfmError("--reference needs --pairs PAIRS.csv")
    pairs = args.pairs or pd.DataFrame({"a": [rest[0]], "b": [rest[1]]})
    result = run_perceptual(
        _models(args, names),
        pairs,
        args.out,
        layers=args.layers,
        reference=args.reference,
        limit=args.limit,
        coords=args.coords,
        on_error=args.on_error,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
    )
    if args.pairs:
        summary = result.table.groupby("model", sort=False)["distance"].agg(["count", "mean", "median"])
        print(summary.to_string(float_format=lambda v: f"{v:.4f}"))
        for row in result.correlations.itertuples(index=False):
            rho = interval_text(row.spearman, row.low, row.high, n=row.n)
            print(f"{row.model}: Spearman ρ with {row.reference} = {rho}")
    else:
        for row in result.table.itertuples(index=False):
            print(f"{row.model}: perceptual distance {row.distance:.5f} (layers {row.layers})")
    if result.folder is not None:
        print(f"wrote {result.folder / 'perceptual.csv'} and {result.folder / 'summary.md'}")


def _reconstruct(args: argparse.Namespace) -> None:
    from medfm.analyze.reconstruct import run_reconstruct

    names, rest = _split_manifest(args, 1)
    run_reconstruct(
        _models(args, names),
        rest[0],
        args.out,
        layer=args.layer,
        iterations=args.iterations,
        save_at=tuple(args.save_at),
        lr=args.lr,
        limit=args.limit,
        coords=args.coords,
        on_error=args.on_error,
        seed=args.seed,
        progress=not args.quiet,
        resume=args.resume,
    )
    print((Path(args.out) / "summary.md").read_text())


def _common(p: argparse.ArgumentParser, inputs: str, limit: int | None = None) -> None:
    p.add_argument("inputs", nargs="+", metavar=inputs, help="model(s) (names or model.json), then the inputs")
    p.add_argument(
        "--weights",
        nargs="+",
        help="published | PATH | random, one for all models or one per model (default: published when cached)",
    )
    p.add_argument("--profile", help="preprocess with this profile instead of the model's (e.g. gray-224)")
    p.add_argument("--in-channels", type=int, help="input channels of the first conv (1 for grey profiles)")
    p.add_argument("--min-coverage", type=float, default=0.95, help="least share of the model the weights must cover")
    p.add_argument("--limit", type=int, default=limit, help=f"use the first N rows (default: {limit or 'all'})")
    p.add_argument("--coords", choices=["lps", "ras", "voxel"], default="lps", help="coordinates of 3D seeds")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise", help="stop at a bad row, or skip it")
    p.add_argument("--seed", type=int, default=0, help="seed of random init, noise, bootstrap and generator")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``medfm analyze``."""
    from medfm.analyze.saliency import METHODS
    from medfm.analyze.transforms import TRANSFORMS

    parser = argparse.ArgumentParser(
        prog="medfm analyze", description="Why do features transfer? Invariances, saliency, perceptual distance, DIP."
    )
    sub = parser.add_subparsers(dest="analysis", required=True)

    p = sub.add_parser("invariance", help="feature similarity under transforms (or between given pairs)")
    _common(p, "MODEL [MODEL ...] MANIFEST")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--transforms", nargs="+", choices=TRANSFORMS, help="transforms to measure (default: all)")
    p.add_argument("--strength", action="append", metavar="NAME=V1,V2", help="strengths of one transform")
    p.add_argument("--pairs", help="PAIRS.csv with columns a, b: similarity between given pairs (no MANIFEST)")
    p.add_argument("--shrinkage", type=float, help="fix the covariance shrinkage α in [0, 1] (default Ledoit–Wolf)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    p.set_defaults(func=_invariance)

    p = sub.add_parser("saliency", help="occlusion maps (+ Grad-CAM, integrated gradients of a fine-tuned head)")
    _common(p, "MODEL [MODEL ...] MANIFEST")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--methods", nargs="+", choices=METHODS, help="default: occlusion, plus gradcam and IG for a model.json"
    )
    p.add_argument("--patch", type=int, nargs="+", help="occlusion window, one size or one per axis (default ~1/6)")
    p.add_argument("--stride", type=int, nargs="+", help="occlusion stride (default: the window)")
    p.add_argument("--target", help="class (name or index) explained for a multi-class head (default: predicted)")
    p.add_argument("--layer", help="trunk layer for Grad-CAM (default: the last main stage)")
    p.add_argument("--steps", type=int, default=32, help="integrated-gradients steps")
    p.add_argument("--no-overlays", action="store_true", help="only the CSV and summary, no PNGs")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--batch-size", type=int, default=16, help="occluded inputs per forward pass")
    p.add_argument("--resume", action="store_true", help="keep the images an interrupted run finished")
    p.set_defaults(func=_saliency)

    p = sub.add_parser("perceptual", help="LPIPS-style distance from the model's own layers")
    _common(p, "MODEL [MODEL ...] A B")
    p.add_argument("--pairs", help="PAIRS.csv with columns a, b (and a reference column); no A B then")
    p.add_argument("--reference", help="column of the pairs file to rank-correlate the distance with")
    p.add_argument("--layers", nargs="+", help="trunk layers (default: its main stages, e.g. layer1 … layer4)")
    p.add_argument("--out", help="output folder (CSV and summary.md)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.set_defaults(func=_perceptual)

    p = sub.add_parser("reconstruct", help="deep-image-prior reconstruction from one layer's activations")
    _common(p, "MODEL [MODEL ...] MANIFEST", limit=4)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layer", help="trunk layer to match (default: the middle main stage, e.g. layer3)")
    p.add_argument("--iterations", type=int, default=300, help="optimisation steps per image")
    p.add_argument("--save-at", type=int, nargs="+", default=[10, 50, 100, 300], help="iterations to save as PNG")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate of the generator")
    p.add_argument("--resume", action="store_true", help="keep the images an interrupted run finished")
    p.set_defaults(func=_reconstruct)
    return parser


def main(argv: list[str]) -> int:
    """Run ``medfm analyze …``; returns the exit status (2 for a medfm error, printed as one line)."""
    from medfm.errors import run_guarded

    args = build_parser().parse_args(argv)
    return run_guarded(
        lambda: args.func(args), "finished images are kept: saliency and reconstruct go on with --resume"
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
