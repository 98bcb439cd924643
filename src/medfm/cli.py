"""The ``medfm`` command line: parse, call the Python API, print. Errors become one line and exit status 2."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfm import __version__
from medfm.errors import ManifestError, MedfmError, run_guarded


def _crop(args: argparse.Namespace) -> None:
    from medfm.data.crop import crop_manifest
    from medfm.data.manifest import read_manifest
    from medfm.data.profiles import Profile2D, get_profile

    seeds = not isinstance(get_profile(args.profile), Profile2D)
    manifest = read_manifest(args.manifest, coords=args.coords, seeds=seeds)
    result = crop_manifest(
        manifest,
        args.profile,
        args.out,
        nifti=args.nifti,
        on_error=args.on_error,
        num_workers=args.workers or 0,
        progress=not args.quiet,
        irregular_series=args.irregular_series,
        non_finite=args.non_finite,
    )
    print(f"wrote {result.n_written} patches to {result.patches} and {result.index}")
    if result.nifti_dir:
        print(f"NIfTI patches in {result.nifti_dir}")
    if result.errors_file:
        print(f"{len(result.errors)} bad rows in {result.errors_file}")


def _extract(args: argparse.Namespace) -> None:
    from medfm.data.manifest import read_manifest
    from medfm.data.profiles import Profile2D, get_profile
    from medfm.features.extract import extract_features
    from medfm.models.registry import get_entry

    args.model_given = args.model is not None
    args.model = args.model or "fmcib-resnet50"

    entry = get_entry(args.model)
    profile = get_profile(args.profile or entry.profile)
    if isinstance(profile, Profile2D) != (entry.dims == 2):
        raise MedfmError(f"profile {profile.name} does not fit the {entry.dims}D model {entry.name}")
    seeds = not isinstance(profile, Profile2D)
    try:
        manifest = read_manifest(args.manifest, coords=args.coords, seeds=seeds)
    except ManifestError as err:
        if not (seeds and "coordX" in str(err) and "missing column" in str(err)):
            raise
        chosen = f"--model {args.model}" if args.model_given else f"the default model, {args.model}"
        raise ManifestError(
            f"{err}. {chosen} is a 3D CT model: it cuts a patch around a seed point (coordX, coordY, coordZ) of "
            "each volume. For 2D images (PNG, JPEG, 2D DICOM) choose a 2D model, e.g. --model resnet50 or "
            "--model radiologynet-resnet50 (`medfm models` lists them with their profiles)"
        ) from None
    if args.fmcib_layout:  # checked before the run, not after it
        from medfm.evaluate.features import FMCIB_PREFIXES, fmcib_splits

        if not args.column_prefix.startswith(FMCIB_PREFIXES):
            raise MedfmError("--fmcib-layout writes FMCIB's pred_<i> columns: add --column-prefix pred_")
        fmcib_splits(manifest.table, args.split_column)
        args.out = args.out or str(Path(args.fmcib_layout) / "features.parquet")
    if not args.out:
        raise MedfmError("give --out FEATURES.parquet (or --fmcib-layout DIR)")
    result = extract_features(
        manifest,
        args.out,
        model=args.model,
        weights=args.weights or "published",
        random_init=args.random_init,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        precision=args.precision,
        column_prefix=args.column_prefix,
        on_error=args.on_error,
        resume=args.resume,
        min_coverage=args.min_coverage,
        seed=args.seed,
        progress=not args.quiet,
        profile=args.profile,
        in_channels=args.in_channels,
        devices=args.devices,
        num_nodes=args.num_nodes,
        irregular_series=args.irregular_series,
        non_finite=args.non_finite,
    )
    if not _is_rank_zero():
        return
    print(f"wrote features of {result.n_rows} rows to {result.features} (provenance: {result.sidecar})")
    if result.errors_file:
        print(f"{len(result.errors)} bad rows in {result.errors_file}")
    if args.fmcib_layout:
        from medfm.evaluate.features import write_fmcib_layout

        written = write_fmcib_layout(result.features, args.fmcib_layout, args.split_column)
        print(f"FMCIB layout: {', '.join(str(p) for p in written)}")


def _is_rank_zero() -> bool:
    """False in the further processes of a multi-device run (they stay quiet)."""
    from medfm.train.sampler import world

    return world()[0] == 0


def _cache(args: argparse.Namespace) -> None:
    from medfm.cache import cache_entries, clean_cache, human_size
    from medfm.models.hub import medfm_home

    if args.action == "list":
        entries = cache_entries()
        for e in entries:
            print(f"{e.kind:<16} {human_size(e.size):>9}  {e.path}")
        print(f"{len(entries)} entries, {human_size(sum(e.size for e in entries))} in {medfm_home()}")
        return
    kinds = [k for k, on in (("store", args.stores), ("unfinished-store", args.stores or args.unfinished),
                             ("weights", args.weights), ("model", args.models)) if on]  # fmt: skip
    removed = clean_cache(kinds or ("store", "unfinished-store"), args.older_than, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in removed:
        print(f"{verb} {e.kind} {e.path} ({human_size(e.size)})")
    print(f"{verb} {len(removed)} entries, {human_size(sum(e.size for e in removed))}")


def _weights(args: argparse.Namespace) -> None:
    from medfm.models import hub
    from medfm.models.registry import get_entry, list_models

    if args.action == "list":
        for name in list_models():
            entry = get_entry(name)
            if entry.weights is None:
                print(f"{name}: no published weights")
                continue
            spec, path = entry.weights, hub.cached_path(entry.weights)
            layout = f"layout {spec.layout or 'detected'}, profile {entry.profile}"
            convert = f"; published for another framework: {spec.convert}" if spec.convert else ""
            print(
                f"{name}: {path} [{'cached' if path.is_file() else 'not cached'}] from {spec.url} ({layout}){convert}"
            )
        return
    if not args.name:
        raise MedfmError("name the model whose weights to download, e.g. `medfm weights download fmcib-resnet50`")
    entry = get_entry(args.name)
    if entry.weights is None:
        raise MedfmError(f"model {args.name} has no published weights")
    spec = entry.weights
    if args.url:
        from dataclasses import replace

        spec = replace(spec, url=args.url)
    path = hub.download(spec, progress=not args.quiet, trust_new_hash=args.trust_new_hash or None)
    print(f"{args.name}: {path} (SHA-256 {hub.sha256_of(path)})")


def _models(args: argparse.Namespace) -> None:
    from medfm.data.profiles import get_profile, list_profiles
    from medfm.models.registry import get_entry, list_models

    for name in list_models():
        entry = get_entry(name)
        print(f"{name}: {entry.feature_dim}-d, profile {entry.profile} — {entry.description}")
    for name in list_profiles():
        print(f"profile {name} v{get_profile(name).version}: {get_profile(name).description}")


def _demo(args: argparse.Namespace) -> None:
    from medfm.demo import run_demo

    run_demo(args.out, model=args.model, n_patients=args.patients, num_workers=args.workers, progress=not args.quiet)


def _split_args(args: argparse.Namespace) -> dict[str, object]:
    """The split options every feature-table command shares."""
    return {
        "split_column": args.split_column,
        "group": args.group,
        "test_size": args.test_size,
        "label_missing": args.label_missing,
    }


def _interval(m: dict[str, float]) -> str:
    """A metric with its CI and n (or why there is no CI), from an interval's plain-data form."""
    from medfm.evaluate.metrics import interval_text

    return interval_text(m)


def _probe(args: argparse.Namespace) -> None:
    import json

    from medfm.evaluate.probe import run_fractions, run_probe

    if args.survival:
        _survival(args)
        return
    if not args.label:
        raise MedfmError("give --label COL (or --survival TIME_COL EVENT_COL)")
    common = dict(
        scoring=args.scoring,
        search=args.search,
        trials=args.trials,
        cv=args.cv,
        **_split_args(args),
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        storage=args.storage,
        feature_prefix=args.feature_prefix,
        progress=not args.quiet,
        figure_format=args.figure_format,
    )
    if args.train_fraction != [1.0]:
        runs = run_fractions(args.features, args.label, args.out, args.train_fraction, args.repeats, **common)
        print((Path(args.out) / "fractions.md").read_text())
        print(f"{len(runs)} runs; per-run results under {args.out}/fraction_*/repeat_*/")
        return
    result = run_probe(args.features, args.label, args.out, **common)
    _print_missing(json.loads(result.results.read_text())["n_missing_labels"], args.label)
    print(f"test {result.scoring}: {result.test_metric}  (best C {result.best_c:.3g})")
    fmt = args.figure_format
    print(f"results in {result.results} (and results.md, predictions.csv, roc.{fmt}, pr.{fmt}); probe {result.probe}")


def _survival(args: argparse.Namespace) -> None:
    from medfm.evaluate.survival import run_survival

    time_column, event_column = args.survival
    report = run_survival(
        args.features,
        time_column,
        event_column,
        args.out,
        horizon=args.horizon,
        cv=args.cv,
        **_split_args(args),
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        feature_prefix=args.feature_prefix,
    )
    for name, m in report["test"].items():
        print(f"test {name}: {_interval(m)}")
    print(f"best penalty {report['best_alpha']:.3g}; results in {args.out}/results.json")


def _predict(args: argparse.Namespace) -> None:
    import json

    try:
        kind = json.loads(Path(args.probe).read_text()).get("kind")
    except (OSError, ValueError) as err:
        raise MedfmError(f"{args.probe}: not a readable model card or probe ({err})") from None
    if kind == "medfm-finetuned":
        from medfm.finetune.outputs import metrics_path_of, predict_manifest

        path = predict_manifest(
            args.probe,
            args.features,
            args.out,
            on_error=args.on_error,
            batch_size=args.batch_size,
            device=args.device,
            progress=not args.quiet,
            label=args.label,
        )
        print(f"wrote {path}")
        scored = metrics_path_of(path)
        if scored.exists():
            report = json.loads(scored.read_text())
            for name, m in report["metrics"].items():
                print(f"{name}: {_interval(m)}, n={report['n']} (truth: {report['truth']})")
            print(f"metrics in {scored}")
        return
    from medfm.evaluate.probe import predict

    print(f"wrote {predict(args.probe, args.features, args.out)}")


def _compare(args: argparse.Namespace) -> None:
    import json

    from medfm.evaluate.probe import compare, compare_tables

    def is_results(path: str) -> bool:
        return path.endswith((".json", "fractions.csv")) or Path(path).is_dir()

    if is_results(args.a) and is_results(args.b):
        report = compare(
            args.a, args.b, n_bootstrap=args.bootstrap, seed=args.seed, fraction=args.fraction, repeat=args.repeat
        )
    else:
        if not args.label:
            raise MedfmError("comparing two feature tables needs --label COL")
        report = compare_tables(
            args.a,
            args.b,
            args.label,
            args.probe_out,
            n_bootstrap=args.bootstrap,
            seed=args.seed,
            trials=args.trials,
            group=args.group,
            split_column=args.split_column,
            progress=False,
        )
    from medfm.evaluate.metrics import interval_text

    d = report["difference"]
    print(
        f"{report['scoring']} A − B = {interval_text(d, signed=True)}, "
        f"bootstrap {report['bootstrap_p_text']} ({report['bootstrap']}), {report['n_test']} test rows"
    )
    if "delong" in report:
        dl = report["delong"]
        label = "DeLong (assumes independent rows)" if dl.get("note") else "DeLong"
        print(f"{label}: AUC {dl['auc_a']:.3f} vs {dl['auc_b']:.3f}, z = {dl['z']:.2f}, p = {dl['p_value']:.3g}")
        if dl.get("note"):
            print(f"  {dl['note']}")
    if args.out:
        from medfm.data.outputs import write_json

        write_json(report, args.out)
    else:
        print(json.dumps(report, indent=2))


def _fewshot(args: argparse.Namespace) -> None:
    from medfm.evaluate.fewshot import run_fewshot

    for summary in run_fewshot(
        args.features,
        args.label,
        ways=args.ways,
        shots=args.shots,
        episodes=args.episodes,
        **_split_args(args),
        seed=args.seed,
        c=args.C,
        out=args.out,
    ):
        print(summary)
    _print_missing(summary.n_missing_labels, args.label)
    if args.out:
        print(f"shots curve in {args.out}/fewshot.json, fewshot.csv and fewshot.png")


def _knn(args: argparse.Namespace) -> None:
    from medfm.evaluate.knn import run_knn

    report = run_knn(
        args.features,
        args.label,
        k=args.k,
        temperature=args.temperature,
        **_split_args(args),
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        out_dir=args.out,
        figure_format=args.figure_format,
    )
    for name, m in report["test"].items():
        print(f"kNN (k={args.k}, T={args.temperature}) {name}: {_interval(m)}")
    if args.out:
        print(f"results in {args.out}/knn.json (and predictions.csv, roc.{args.figure_format}, pr.{args.figure_format})")
    _print_missing(report["n_missing_labels"], args.label)


def _print_missing(n: int, label: str) -> None:
    """Say how many rows were left out for a missing label."""
    if n:
        print(f"{n} rows left out: their {label} is missing (see --label-missing)")


def _transfer(args: argparse.Namespace) -> None:
    from medfm.models.hub import sha256_of
    from medfm.models.registry import create
    from medfm.models.transfer import save_transferred, transfer_weights

    if args.out and not args.out.endswith(".safetensors"):
        raise MedfmError(f"--out {args.out}: name a .safetensors file")
    if args.out:
        from medfm.data.outputs import check_output

        check_output(args.out)  # before the work: a read-only folder or a folder in the way is said now
    model = create(args.into, weights=None)
    report = transfer_weights(args.src, model, inflate=args.inflate)
    print(report.summary())
    if report.coverage < args.min_coverage:
        if not args.allow_partial:
            raise MedfmError(
                f"the transferred weights cover {report.coverage:.1%} of {args.into}, below --min-coverage "
                f"{args.min_coverage:g} (coverage by block above); nothing written. A transfer moves a tensor only "
                "into a layer of the same role (stage, block, layer within the block); pass --allow-partial to keep "
                "this partial transfer anyway"
            )
        print(f"warning: only {report.coverage:.1%} of {args.into} transferred (--allow-partial)", file=sys.stderr)
    if args.out:
        provenance = {
            "source": args.src,
            "source_sha256": sha256_of(args.src),
            "model": args.into,
            "inflate": args.inflate,
        }
        weights, sidecar = save_transferred(model, report, args.out, provenance)
        print(f"wrote {weights} (report: {sidecar})")


def _data_medmnist(args: argparse.Namespace) -> None:
    from medfm.data.medmnist import convert_medmnist

    manifest = convert_medmnist(args.npz, args.out)
    counts = _split_counts(manifest)
    print(f"wrote {manifest} ({counts}) and the images under {Path(args.out) / 'images'}")


def _split_counts(manifest: Path) -> str:
    """``train 546, val 78, test 156`` of a manifest's split column."""
    import pandas as pd

    splits = pd.read_csv(manifest)["split"].value_counts()
    return ", ".join(f"{s} {int(splits[s])}" for s in ("train", "val", "test") if s in splits)


def _add_table_args(p: argparse.ArgumentParser, label_required: bool = True) -> None:
    p.add_argument(
        "features",
        help="feature table (Parquet or CSV) with feat_<i> or pred_<i> columns, or FMCIB's folder of "
        "train_features.csv, val_features.csv, test_features.csv (the split is the file)",
    )
    p.add_argument("--label", required=label_required, help="label column")
    p.add_argument("--split-column", default="split", help="column with train/val/test (absent: a held-out test)")
    p.add_argument("--group", help="patient column: no patient on both sides of a split; CIs resample patients")
    p.add_argument("--test-size", type=float, default=0.2, help="held-out share when there is no split column")
    p.add_argument(
        "--label-missing",
        nargs="*",
        metavar="MARKER",
        help="label values that mean missing: those rows are left out and counted "
        "(default: empty, NA, N/A, nan, none, null, unknown, ?, -; case-insensitive)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out split, folds, search and bootstrap")


def _add_manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="CSV or Parquet with image_path, coordX, coordY, coordZ")
    p.add_argument("--coords", choices=["lps", "ras", "voxel"], default="lps", help="coordinate system of coordX/Y/Z")
    p.add_argument(
        "--on-error",
        choices=["raise", "skip"],
        default="raise",
        help="stop at the first bad row (exit 2) or write bad rows to NAME.errors.csv and go on",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="processes reading volumes ahead (0: in the main process; default: 0 on CPU, up to 4 ahead of a GPU)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--irregular-series",
        choices=["refuse", "resample"],
        default="refuse",
        help="DICOM series with a missing slice or changing spacing: a row error, or read onto an even grid "
        "interpolating slices by position (rows flagged)",
    )
    p.add_argument(
        "--non-finite",
        choices=["refuse", "pad"],
        default="refuse",
        help="NaN/Inf voxels where a patch is sampled: a row error, or read as the profile's padding (rows flagged)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``medfm``."""
    parser = argparse.ArgumentParser(prog="medfm", description="Foundation models for medical images.")
    parser.add_argument("--version", action="version", version=f"medfm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "pretrain",
        help="pre-train a trunk (SimCLR, mined-negative SimCLR, SupCon, supervised): "
        "`medfm pretrain fit --config run.yaml`, `medfm pretrain export CKPT --name NAME`",
        add_help=False,
    )
    sub.add_parser(
        "finetune",
        help="fine-tune a trunk + head (binary, multiclass, regression, survival): `medfm finetune fit --config "
        "task.yaml`, `medfm finetune sweep --config task.yaml --fractions 1 0.1 --repeats 3`",
        add_help=False,
    )

    sub.add_parser(
        "detect",
        help="train and apply a box detector (Faster R-CNN / RetinaNet + FPN) on any 2D trunk: "
        "`medfm detect fit --config det.yaml`, `medfm detect predict MODEL MANIFEST --out boxes.csv`",
        add_help=False,
    )
    sub.add_parser(
        "segment",
        help="train and apply a U-Net on any pre-trained encoder, 2D or 3D: `medfm segment fit --config seg.yaml`, "
        "`medfm segment predict MODEL MANIFEST --out DIR`",
        add_help=False,
    )
    sub.add_parser(
        "analyze",
        help="what a model keeps and ignores: `medfm analyze invariance|saliency|perceptual|reconstruct MODEL ...`",
        add_help=False,
    )

    p = sub.add_parser("crop", help="cut seed-point patches and write them as .npy (+ NIfTI)")
    _add_manifest_args(p)
    p.add_argument("--profile", default="fmcib", help="preprocessing profile (see `medfm models`)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--nifti", action="store_true", help="also write each patch as NIfTI with its true geometry")
    p.set_defaults(func=_crop)

    p = sub.add_parser("extract", help="features of every row from a registered model")
    _add_manifest_args(p)
    p.add_argument(
        "--model",
        help="registered model (`medfm models`); default fmcib-resnet50, the 3D CT model that needs seed "
        "coordinates; for 2D images choose a 2D one, e.g. resnet50",
    )
    p.add_argument("--weights", help="weight file (default: the model's published weights from the cache)")
    p.add_argument("--random-init", action="store_true", help="use a randomly initialised trunk (recorded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation")
    p.add_argument("--out", help="FEATURES.parquet or FEATURES.csv (with --fmcib-layout: DIR/features.parquet)")
    p.add_argument(
        "--fmcib-layout",
        metavar="DIR",
        help="also write FMCIB's run.py layout: DIR/train_features.csv, val_features.csv, test_features.csv "
        "(rows by --split-column; needs --column-prefix pred_)",
    )
    p.add_argument("--split-column", default="split", help="with --fmcib-layout: the column with train/val/test")
    p.add_argument("--batch-size", type=int, default=8, help="patches or images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--devices", type=int, default=1, help="processes, one per device (DDP through Lightning Fabric)")
    p.add_argument("--num-nodes", type=int, default=1, help="machines, each running --devices processes")
    p.add_argument("--precision", choices=["32", "bf16"], default="32", help="float32, or bfloat16 autocast")
    p.add_argument("--column-prefix", default="feat_", help="feature column prefix (FMCIB's own: pred_)")
    p.add_argument("--profile", help="preprocess with this profile instead of the model's (e.g. gray-224)")
    p.add_argument(
        "--in-channels", type=int, help="input channels of the first conv (1 for grey profiles; weights are summed in)"
    )
    p.add_argument("--resume", action="store_true", help="continue an interrupted run without redoing rows")
    p.add_argument("--min-coverage", type=float, default=0.95, help="least share of the model the weights must cover")
    p.set_defaults(func=_extract)

    p = sub.add_parser("weights", help="list or download published weights into the cache ($MEDFM_HOME)")
    p.add_argument("action", choices=["list", "download"], help="list the published weights, or download one")
    p.add_argument("name", nargs="?", help="with download: the model whose weights to fetch")
    p.add_argument("--url", help="download from this URL instead of the registry's")
    p.add_argument(
        "--trust-new-hash",
        action="store_true",
        help="accept a file whose SHA-256 differs from the one recorded at its first download (and record it)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_weights)

    p = sub.add_parser("data", help="convert public data sets into images + a manifest: `medfm data medmnist F.npz`")
    data_sub = p.add_subparsers(dest="dataset", required=True)
    q = data_sub.add_parser("medmnist", help="a MedMNIST .npz → PNG (2D) or NIfTI (3D) images + manifest.csv")
    q.add_argument("npz", help="a MedMNIST file, e.g. pneumoniamnist.npz or adrenalmnist3d.npz")
    q.add_argument("--out", required=True, help="output folder (images/ and manifest.csv)")
    q.set_defaults(func=_data_medmnist)

    p = sub.add_parser("cache", help="list or clean what medfm keeps in $MEDFM_HOME (patch stores, weights, models)")
    p.add_argument("action", choices=["list", "clean"], help="list every entry with its size, or remove entries")
    p.add_argument("--stores", action="store_true", help="clean: patch stores (the default; cut again when needed)")
    p.add_argument("--unfinished", action="store_true", help="clean: only stores whose build was interrupted")
    p.add_argument("--weights", action="store_true", help="clean: downloaded and exported weight files")
    p.add_argument("--models", action="store_true", help="clean: cards of exported models (they leave `medfm models`)")
    p.add_argument("--older-than", type=float, metavar="DAYS", help="clean: only entries untouched for DAYS days")
    p.add_argument("--dry-run", action="store_true", help="clean: say what would be removed, remove nothing")
    p.set_defaults(func=_cache)

    p = sub.add_parser(
        "probe",
        help="tuned logistic-regression probe on a feature table, test metric with CI; "
        "`medfm probe import model.pkl --out probe.json` converts a scikit-learn one",
    )
    _add_table_args(p, label_required=False)
    p.add_argument("--survival", nargs=2, metavar=("TIME_COL", "EVENT_COL"), help="penalised Cox probe instead")
    p.add_argument("--horizon", type=float, help="with --survival: also the AUC of death by this time")
    p.add_argument("--train-fraction", type=float, nargs="+", default=[1.0], help="e.g. 1 0.5 0.2 0.1")
    p.add_argument("--repeats", type=int, default=3, help="draws per train fraction below 1")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--figure-format", default="png", choices=["png", "svg", "pdf"], help="ROC and PR figures' format")
    p.add_argument(
        "--scoring",
        default="roc_auc",
        choices=["roc_auc", "average_precision", "balanced_accuracy", "accuracy"],
        help="the metric the C search maximises (all four are reported on test)",
    )
    p.add_argument(
        "--search", default="optuna", choices=["optuna", "grid"], help="Optuna TPE over log C, or the 45-point grid"
    )
    p.add_argument("--trials", type=int, default=100, help="Optuna trials of the C search")
    p.add_argument("--cv", type=int, help="search over K grouped folds of train+val instead of train→val")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--storage", help="Optuna storage URL shared by several processes, e.g. sqlite:///study.db")
    p.add_argument("--feature-prefix", help="feature column prefix (default feat_, else pred_)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_probe)

    p = sub.add_parser(
        "predict",
        help="apply a saved probe (probe.json) to a feature table, or a fine-tuned model (model.json) to a manifest",
    )
    p.add_argument("probe", help="probe.json of `medfm probe`, or model.json of `medfm finetune fit`")
    p.add_argument("features", help="a feature table (probe), or a manifest (fine-tuned model)")
    p.add_argument("--out", required=True, help="P.csv or P.parquet")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="bad manifest rows (fine-tuned)")
    p.add_argument("--batch-size", type=int, default=32, help="images or patches per forward pass (fine-tuned)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:1 (fine-tuned)")
    p.add_argument(
        "--label",
        help="the truth column of a labelled manifest (default: the model card's label column when the manifest "
        "has it); metrics with 95%% bootstrap CIs go to <out stem>.metrics.json (fine-tuned)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_predict)

    p = sub.add_parser("compare", help="paired bootstrap CI of the difference of two probes, and DeLong for AUC")
    p.add_argument(
        "a",
        help="results of A: a probe's or fine-tuned classifier's results.json (or run folder), a --train-fraction "
        "probe folder; or feature table A (then --label)",
    )
    p.add_argument("b", help="results of B (as A), or feature table B of the same rows")
    p.add_argument("--fraction", type=float, help="with --train-fraction folders: the fraction to compare (default 1)")
    p.add_argument("--repeat", type=int, default=0, help="with --train-fraction folders: the repeat to compare")
    p.add_argument("--label", help="with two feature tables: the label to probe both on")
    p.add_argument("--group", help="with two feature tables: patient column")
    p.add_argument("--split-column", default="split", help="with two feature tables: column with train/val/test")
    p.add_argument("--trials", type=int, default=100, help="with two feature tables: Optuna trials of each probe")
    p.add_argument("--probe-out", default="compare_probes", help="with two feature tables: where the probes go")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (and of the probes)")
    p.add_argument("--out", help="write the comparison as JSON")
    p.set_defaults(func=_compare)

    p = sub.add_parser("fewshot", help="N-way K-shot episodes: prototype and logistic heads")
    _add_table_args(p)
    p.add_argument("--ways", type=int, default=2, help="classes per episode")
    p.add_argument(
        "--shots", type=int, nargs="+", default=[5], help="support examples per class; several give a shots curve"
    )
    p.add_argument("--episodes", type=int, default=600, help="episodes per shot count (the CI is over episodes)")
    p.add_argument(
        "--C",
        type=float,
        help="inverse L2 strength of the logistic head (default: chosen by CV inside each support set)",
    )
    p.add_argument("--out", help="folder for fewshot.json, fewshot.csv and fewshot.png (the shots curve)")
    p.set_defaults(func=_fewshot)

    p = sub.add_parser("knn", help="cosine-weighted k-nearest-neighbour accuracy and AUC")
    _add_table_args(p)
    p.add_argument("--k", type=int, default=20, help="neighbours that vote")
    p.add_argument("--temperature", type=float, default=0.07, help="T of the exp(cosine/T) vote weights")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the CIs")
    p.add_argument("--out", help="folder for knn.json, predictions.csv and ROC/PR figures (default: print only)")
    p.add_argument("--figure-format", default="png", choices=["png", "svg", "pdf"], help="ROC and PR figures' format")
    p.set_defaults(func=_knn)

    p = sub.add_parser("transfer", help="initialise a registered model from a checkpoint of another topology")
    p.add_argument("src", help="checkpoint: .pt/.pth/.ckpt/.safetensors, or a .tar/.tar.gz holding one")
    p.add_argument("--into", required=True, metavar="ARCH", help="registered model to initialise (see `medfm models`)")
    p.add_argument("--out", help="write the initialised weights here (W.safetensors) and the report as W.json")
    p.add_argument("--inflate", action="store_true", help="inflate 2D conv weights into 3D convs (I3D-style)")
    p.add_argument(
        "--min-coverage",
        type=float,
        default=0.5,
        help="fail, writing nothing, if the weights cover less of the target trunk than this share (default 0.5)",
    )
    p.add_argument(
        "--allow-partial", action="store_true", help="write a transfer below --min-coverage anyway (with a warning)"
    )
    p.set_defaults(func=_transfer)

    p = sub.add_parser("models", help="list registered models and preprocessing profiles")
    p.set_defaults(func=_models)

    p = sub.add_parser("demo", help="synthetic CT set → patches → features, end to end")
    p.add_argument("--out", default="outputs/demo", help="output folder")
    p.add_argument("--model", default="fmcib-resnet50", help="registered 3D model to extract with")
    p.add_argument("--patients", type=int, default=4, help="synthetic patients (CT volumes) to make")
    p.add_argument("--workers", type=int, default=None, help="reader processes (default: chosen by device)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_demo)
    return parser


def _pretrain_export(args: argparse.Namespace) -> None:
    from medfm.pretrain.export import export_trunk

    card = export_trunk(args.checkpoint, args.name, args.profile, args.description, args.overwrite)
    print(f"exported {args.name}: card {card}; use it with `medfm extract --model {args.name} ...`")


def _pretrain_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medfm pretrain export", description="register the trunk of a pre-training checkpoint as a model"
    )
    p.add_argument("checkpoint", help="a Lightning checkpoint of `medfm pretrain fit` (e.g. .../checkpoints/last.ckpt)")
    p.add_argument("--name", required=True, help="the model name to register (then `medfm extract --model NAME`)")
    p.add_argument("--profile", help="preprocessing profile (default: the profile the run trained with)")
    p.add_argument("--description", default="", help="one line for `medfm models`")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export of the same name")
    p.set_defaults(func=_pretrain_export)
    return p


def _lightning(command: str, argv: list[str]) -> int:
    """``medfm pretrain|finetune``: export / sweep here; fit, --print_config, … go to LightningCLI."""
    if command == "pretrain" and argv[:1] == ["export"]:
        return _run(_pretrain_export_parser().parse_args(argv[1:]))
    if command == "pretrain":
        from medfm.pretrain.launch import run_cli

        return run_guarded(lambda: run_cli(argv), "continue with --ckpt_path last")
    from medfm.finetune.launch import run_cli
    from medfm.train.cli import command_main

    return command_main("finetune", argv, run_cli)


def _command_package(command: str, argv: list[str]) -> int:
    """``medfm detect|segment|analyze``: each package parses its own subcommands (Lightning's for training)."""
    if command == "detect":
        from medfm.detect.launch import main as run
    elif command == "segment":
        from medfm.segment.launch import main as run
    else:
        from medfm.analyze.cli import main as run
    return run(argv)


def _probe_import(args: argparse.Namespace) -> None:
    from medfm.evaluate.sklearn_pickle import import_sklearn_probe

    path = import_sklearn_probe(args.file, args.out, feature_prefix=args.feature_prefix)
    print(f"wrote probe {path} (and {path.with_suffix('.npz')}); apply it with `medfm predict {path} FEATURES`")


def _probe_import_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="medfm probe import",
        description="convert a pickled scikit-learn LogisticRegression (or a Pipeline of StandardScaler steps and "
        "one), e.g. FMCIB's model.pkl, into a medfm probe; any other content of the pickle is refused unrun",
    )
    p.add_argument("file", help="the pickle (e.g. model.pkl)")
    p.add_argument("--out", required=True, help="probe.json (probe.npz is written beside it)")
    p.add_argument(
        "--feature-prefix", default="pred_", help="feature columns when the model has no names (default FMCIB's pred_)"
    )
    p.set_defaults(func=_probe_import)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run ``medfm``; returns the exit status (2 for a medfm error, printed as one line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["probe", "import"]:
        return _run(_probe_import_parser().parse_args(argv[2:]))
    if argv[:1] in (["pretrain"], ["finetune"]):
        return _lightning(argv[0], argv[1:])
    if argv[:1] in (["detect"], ["segment"], ["analyze"]):
        return _command_package(argv[0], argv[1:])
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    """Call a parsed command (its ``func``), turning medfm errors into one line and exit status 2."""
    return run_guarded(lambda: args.func(args), "finished rows are kept, continue with --resume")


if __name__ == "__main__":
    sys.exit(main())
