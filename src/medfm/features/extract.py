"""``medfm extract``: features of every manifest row from a registered model, resumable, nothing lost.

Volumes are read once each, in worker processes that run ahead of the network; finished rows are written
to ``NAME.partial/`` as they complete so an interrupted run continues with ``resume=True``; the final table
(manifest columns + features, and a ``warnings`` column when a row was read with a flag, e.g. a seed outside the volume
padded as FMCIB) and its JSON sidecar are written atomically.

With ``devices`` (and ``num_nodes``) above one, Lightning Fabric starts one process per device (DDP; gloo on the
CPU). The volumes are dealt out round-robin, each process writes its own parts into the shared ``.partial/``
folder, and rank 0 joins them into the one table in manifest order: the same table a single process writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

import medfm
from medfm.data.datasets import auto_workers, iter_volume_items, stack_patches
from medfm.data.manifest import Manifest
from medfm.data.outputs import (
    WARNINGS_COLUMN,
    atomic_path,
    check_columns_free,
    check_output,
    errors_path,
    output_lock,
    sidecar_path,
    stem_of,
    with_warnings,
    write_errors,
    write_feature_table,
    write_json,
)
from medfm.data.profiles import Profile, Profile2D, get_profile
from medfm.device import resolve_device
from medfm.errors import ConfigError, MedfmError
from medfm.models.registry import PUBLISHED, LoadedModel, load_model
from medfm.progress import progress_bar

PRECISIONS = ("32", "bf16")
PART_KEYS = ("rows", "paths", "digests", "features")


@dataclass
class ExtractResult:
    """Where the features went and how many rows made it."""

    features: Path
    sidecar: Path
    errors_file: Path | None
    n_rows: int
    errors: dict[int, str]
    n_computed: int = 0


class FeatureRunner:
    """Run a model over batches of patches in eval mode, in float32 or bfloat16 autocast."""

    def __init__(self, model: torch.nn.Module, device: str = "auto", precision: str = "32") -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}; allowed {PRECISIONS}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.precision = precision

    @torch.inference_mode()
    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        """Features of a (B, C, Z, Y, X) batch as float32 (B, D)."""
        batch = batch.to(self.device, non_blocking=True)
        ctx = (
            torch.autocast(self.device.type, dtype=torch.bfloat16)
            if self.precision == "bf16"
            else contextlib.nullcontext()
        )
        with ctx:
            out = self.model(batch)
        return out.float().cpu().numpy()


@dataclass
class Workers:
    """The processes of one extraction: this one's rank, how many there are, and its device."""

    rank: int = 0
    world: int = 1
    device: str = "auto"

    def share(self, manifest: Manifest, rows: list[int]) -> list[int]:
        """This process's rows: whole volumes (or images), dealt round-robin in manifest order."""
        if self.world == 1:
            return rows
        by_path: dict[str, list[int]] = {}
        for row in rows:
            by_path.setdefault(manifest.paths[row], []).append(row)
        groups = list(by_path.values())
        return sorted(r for i, group in enumerate(groups) if i % self.world == self.rank for r in group)

    def gather(self, value: object) -> list[object]:
        """Every process's ``value``, in rank order (a collective: all processes must call it)."""
        if self.world == 1:
            return [value]
        values: list[object] = [None] * self.world
        dist.all_gather_object(values, value)
        return values


def start_workers(devices: int = 1, num_nodes: int = 1, device: str = "auto") -> Workers:
    """One process per device through Lightning Fabric (DDP) when more than one is asked for; else this process."""
    if devices < 1 or num_nodes < 1:
        raise MedfmError(f"devices={devices}, num_nodes={num_nodes}: both must be at least 1")
    if devices * num_nodes == 1:
        return Workers(device=device)
    if device not in ("auto", "cpu", "cuda", "gpu"):
        raise MedfmError(f"--device {device} names one device; with --devices {devices} give auto, cpu or cuda")
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    accelerator = "cpu" if device == "cpu" or not torch.cuda.is_available() else "gpu"
    # a long timeout: ranks wait for each other only at the start and the end, and shards may differ in length
    strategy = DDPStrategy(timeout=timedelta(hours=12))
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    fabric.launch()  # re-runs this command line once per further device; returns in every process
    return Workers(fabric.global_rank, fabric.world_size, str(fabric.device))


def _partial_dir(out: Path) -> Path:
    stem = stem_of(out)
    return stem.with_name(stem.name + ".partial")


def _state(
    manifest: Manifest, loaded: LoadedModel, column_prefix: str, profile: Profile | Profile2D, **options: object
) -> dict[str, object]:
    return {
        **options,
        "manifest": str(Path(manifest.source).resolve()),
        "model": loaded.entry.name,
        "weights_sha256": loaded.weights_sha256,
        "random_init_seed": loaded.seed if loaded.weights_path is None else None,
        "profile": profile.to_dict(),
        "column_prefix": column_prefix,
    }


def _done_rows(
    partial: Path, state: dict[str, object], manifest: Manifest, resume: bool
) -> list[dict[str, np.ndarray]]:
    """The parts an earlier run kept, holding only rows whose inputs are unchanged (same row digest) since."""
    if not resume:
        if partial.exists():
            shutil.rmtree(partial)
        return []
    if not partial.exists():
        return []
    previous = json.loads((partial / "state.json").read_text()) if (partial / "state.json").exists() else None
    if previous != json.loads(json.dumps(state, default=str)):
        raise MedfmError(
            f"{partial} was made with other settings (manifest, model, weights, profile or column prefix); "
            "run without --resume to start again"
        )
    digests = [manifest.row_digest(row) for row in range(len(manifest))]
    parts = []
    for file in sorted(partial.glob("part-*.npz")):
        with np.load(file) as part:
            part = (
                {key: part[key] for key in (*PART_KEYS, "warnings") if key in part} if "digests" in part else None
            )  # warnings: the rows' flags (absent from parts of older medfm versions)
        if part is None:  # a part of a medfm without row digests: nothing in it can be checked
            continue
        keep = [
            i for i, (row, digest) in enumerate(zip(part["rows"], part["digests"]))
            if row < len(manifest) and digests[row] == digest
        ]  # fmt: skip
        parts.append({key: value[keep] for key, value in part.items()})
    seen: set[int] = set()
    for part in reversed(parts):  # a row kept twice (never expected): the later copy wins
        fresh = [i for i, row in enumerate(part["rows"].tolist()) if row not in seen]
        seen.update(part["rows"].tolist())
        part.update({key: value[fresh] for key, value in part.items()})
    return [part for part in parts if len(part["rows"])]


def _next_part(partial: Path) -> int:
    """The number of the next part file: one past every part already there (of any process)."""
    numbers = [int(f.stem.rsplit("-", 1)[-1]) for f in partial.glob("part-*.npz")]
    return max(numbers, default=-1) + 1


def extract_features(
    manifest: Manifest,
    out: str | os.PathLike[str],
    model: str | LoadedModel = "fmcib-resnet50",
    weights: str | os.PathLike[str] | None = PUBLISHED,
    random_init: bool = False,
    batch_size: int = 8,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "32",
    column_prefix: str = "feat_",
    on_error: str = "raise",
    resume: bool = False,
    min_coverage: float = 0.95,
    seed: int = 0,
    flush_every: int = 64,
    flush_seconds: float = 30.0,
    progress: bool = True,
    profile: str | None = None,
    in_channels: int | None = None,
    devices: int = 1,
    num_nodes: int = 1,
    irregular_series: str = "refuse",
    non_finite: str = "refuse",
) -> ExtractResult:
    """Extract features of every row; ``weights`` is ``'published'`` or a path, or ``random_init=True``.

    ``model`` is a registry name, or a :class:`LoadedModel` already built (then ``weights`` is ignored).
    ``num_workers=None`` chooses: reading in the main process on CPU, reader processes ahead of a GPU.
    ``profile`` replaces the model's own preprocessing profile (e.g. ``gray-224`` for grey images) and
    ``in_channels`` its first convolution (e.g. 1, with the weights' channels summed in).
    ``devices``/``num_nodes`` above one run one process per device (Lightning Fabric, DDP); every process
    returns the same result, rank 0 writes the files.
    ``irregular_series='resample'`` and ``non_finite='pad'`` read what would otherwise be row errors (see
    :func:`~medfm.data.datasets.iter_volume_items`); the rows so read, and seeds outside the volume that profile
    ``fmcib`` pads as FMCIB, say so in the table's ``warnings`` column and the sidecar's ``flagged_rows``.
    Finished rows are kept for ``resume`` every ``flush_every`` rows or ``flush_seconds``, whichever comes first,
    so a killed run loses at most that much work; a resumed run recomputes rows whose inputs changed.
    Before any work, ``out`` must be writable, no manifest column may collide with the columns written (the
    feature columns, ``warnings``, ``row``/``reason`` of the errors file), and no other process may be writing ``out``.
    """
    options = dict(locals())
    if weights is None and not random_init and not isinstance(model, LoadedModel):
        raise ConfigError(
            "weights=None would give features of a randomly initialised trunk: pass random_init=True to mean it "
            "(the CLI's --random-init), or weights='published' or a weight file"
        )
    out = check_output(out)
    check_columns_free(manifest.table.columns, ("row", "reason", WARNINGS_COLUMN), column_prefix, manifest.source)
    workers = start_workers(devices, num_nodes, device)
    with output_lock(out) if workers.rank == 0 else contextlib.nullcontext():
        return _extract(**{**options, "out": out}, workers=workers)


def _extract(
    manifest: Manifest,
    out: Path,
    workers: Workers,
    model: str | LoadedModel,
    weights: str | os.PathLike[str] | None,
    random_init: bool,
    batch_size: int,
    num_workers: int | None,
    device: str,
    precision: str,
    column_prefix: str,
    on_error: str,
    resume: bool,
    min_coverage: float,
    seed: int,
    flush_every: int,
    flush_seconds: float,
    progress: bool,
    profile: str | None,
    in_channels: int | None,
    devices: int,
    num_nodes: int,
    irregular_series: str,
    non_finite: str,
) -> ExtractResult:
    """The extraction itself, in one process of ``workers`` (see :func:`extract_features`)."""
    if random_init and weights not in (None, PUBLISHED):
        raise MedfmError("give either --weights or --random-init, not both")
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = load_model(
            model, None if random_init else weights, min_coverage=min_coverage, seed=seed, in_channels=in_channels
        )
    runner = FeatureRunner(loaded.model, device=workers.device, precision=precision)
    if num_workers is None:
        num_workers = auto_workers(runner.device.type)
    chosen = get_profile(profile or loaded.entry.profile)
    if isinstance(chosen, Profile2D) != (loaded.entry.dims == 2):
        raise MedfmError(f"profile {chosen.name} does not fit the {loaded.entry.dims}D model {loaded.entry.name}")
    profile = chosen
    partial = _partial_dir(out)
    state = _state(manifest, loaded, column_prefix, profile, irregular_series=irregular_series, non_finite=non_finite)
    problem = None
    if workers.rank == 0:  # rank 0 checks (or clears) what an earlier run left; the others then read it
        try:
            _done_rows(partial, state, manifest, resume)
            partial.mkdir(parents=True, exist_ok=True)
            write_json(state, partial / "state.json")
        except MedfmError as err:
            problem = str(err)
    problem = workers.gather(problem)[0]
    if problem:
        raise MedfmError(problem)
    parts = _done_rows(partial, state, manifest, resume=True)
    done = {int(r) for part in parts for r in part["rows"]}
    todo = workers.share(manifest, [r for r in range(len(manifest)) if r not in done])
    part_name = "part-{n:05d}.npz" if workers.world == 1 else f"part-r{workers.rank:03d}-{{n:05d}}.npz"
    part_number = _next_part(partial)
    last_flush = time.monotonic()
    n_computed = 0

    errors: dict[int, str] = {}
    flags: dict[int, str] = {}
    pending: list[tuple[int, np.ndarray]] = []
    finished_rows: list[int] = []
    finished_feats: list[np.ndarray] = []

    def run_batch(items: list[tuple[int, np.ndarray]]) -> None:
        nonlocal n_computed
        feats = runner(stack_patches([p for _, p in items]))
        finished_rows.extend(r for r, _ in items)
        finished_feats.append(feats)
        n_computed += len(items)
        if len(finished_rows) >= flush_every or time.monotonic() - last_flush >= flush_seconds:
            flush()

    def flush() -> None:
        nonlocal part_number, last_flush
        last_flush = time.monotonic()
        if not finished_rows:
            return
        part = {
            "rows": np.asarray(finished_rows, dtype=np.int64),
            "paths": np.asarray([manifest.paths[r] for r in finished_rows]),
            "digests": np.asarray([manifest.row_digest(r) for r in finished_rows]),
            "features": np.concatenate(finished_feats),
            "warnings": np.asarray([flags.get(r, "") for r in finished_rows], dtype=str),
        }
        with atomic_path(partial / part_name.format(n=part_number)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **part)
        part_number += 1
        parts.append(part)
        finished_rows.clear()
        finished_feats.clear()

    start = time.perf_counter()
    failure: MedfmError | None = None
    label = "extracting" if workers.world == 1 else f"extracting (rank 0's share of {workers.world})"
    with progress_bar(progress and workers.rank == 0) as bar:
        total = len(manifest) if workers.world == 1 else len(todo)
        task = bar.add_task(label, total=total, completed=len(done) if workers.world == 1 else 0)
        try:
            for item in iter_volume_items(
                manifest, profile, rows=todo, num_workers=num_workers, on_error=on_error,
                irregular_series=irregular_series, non_finite=non_finite,
            ):  # fmt: skip
                errors.update(item.errors)
                flags.update(item.flags)
                bar.advance(task, len(item.errors))
                pending.extend(zip(item.rows, item.patches))
                while len(pending) >= batch_size:
                    run_batch(pending[:batch_size])
                    del pending[:batch_size]
                    bar.advance(task, batch_size)
            if pending:
                run_batch(pending)
                bar.advance(task, len(pending))
                pending.clear()
        except MedfmError as err:  # a bad row with on_error="raise": the other processes must hear of it
            if workers.world == 1:
                raise
            failure = err
        finally:
            flush()  # whatever finished is kept for --resume, even when a bad row stops the run

    if workers.world > 1:
        reports = workers.gather((errors, str(failure) if failure else None, n_computed))
        errors = {row: reason for report, _, _ in reports for row, reason in report.items()}
        failures = [message for _, message, _ in reports if message]
        n_computed = sum(n for _, _, n in reports)
        if failure is not None:
            raise failure
        if failures:
            raise MedfmError(f"another process stopped at a bad row: {failures[0]}")
        if workers.rank != 0:
            workers.gather(None)  # wait until rank 0 has written the files
            return ExtractResult(
                out,
                sidecar_path(out),
                errors_path(out) if errors else None,
                len(manifest) - len(errors),
                errors,
                n_computed,
            )
        parts = _done_rows(partial, state, manifest, resume=True)  # every process's parts, from the shared folder

    rows = np.concatenate([p["rows"] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    rows = rows[order].tolist()
    dim = parts[0]["features"].shape[1] if parts else loaded.entry.feature_dim
    features = np.concatenate([p["features"] for p in parts])[order] if parts else np.zeros((0, dim), np.float32)
    for part in parts:  # every process's and an earlier run's flags (parts from before they were kept have none)
        flags.update({int(r): str(w) for r, w in zip(part["rows"], part.get("warnings", ())) if w})
    errors_file = write_errors(manifest.table, errors, out)
    provenance = {
        "medfm_version": medfm.__version__,
        "model": loaded.entry.name,
        "feature_dim": loaded.entry.feature_dim,
        "weights": str(loaded.weights_path) if loaded.weights_path else None,
        "weights_sha256": loaded.weights_sha256,
        "random_init": loaded.weights_path is None,
        "random_init_seed": loaded.seed if loaded.weights_path is None else None,
        "load_report": loaded.report.to_dict() if loaded.report else None,
        "profile": profile.to_dict(),
        "manifest": manifest.source,
        "coords": manifest.coords,
        "column_prefix": column_prefix,
        "n_rows": len(rows),
        "n_errors": len(errors),
        "errors_file": str(errors_file) if errors_file else None,
        "irregular_series": irregular_series,
        "non_finite": non_finite,
        "flagged_rows": {str(row): flags[row] for row in sorted(flags)},  # as the table's warnings column
        "precision": precision,
        "device": str(runner.device),
        "processes": workers.world,
        "seconds": round(time.perf_counter() - start, 3),
    }
    # the table and its sidecar are one pair: both written, or neither (the sidecar records the table's SHA-256)
    table = with_warnings(manifest.table.iloc[rows], rows, flags)
    write_feature_table(table, features, _feature_columns(column_prefix, dim), out, provenance)
    sidecar = sidecar_path(out)
    shutil.rmtree(partial, ignore_errors=True)
    if workers.world > 1:
        workers.gather(None)  # the files are written: the other processes may return
    return ExtractResult(out, sidecar, errors_file, len(rows), errors, n_computed)


def _feature_columns(prefix: str, dim: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(dim)]


def get_features(
    manifest: str | os.PathLike[str] | Manifest,
    model: str | LoadedModel = "fmcib-resnet50",
    weights: str | os.PathLike[str] | None = PUBLISHED,
    *,
    coords: str = "lps",
    column_prefix: str = "pred_",
    random_init: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "32",
    num_workers: int | None = None,
    on_error: str = "raise",
    profile: str | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """FMCIB's one call, ``get_features("annotations.csv")``: the manifest's columns + ``pred_0 …`` as a DataFrame.

    The same values as ``medfm extract`` (it runs that extraction into a temporary folder); by default FMCIB's
    ResNet-50 with its published weights and preprocessing. With ``on_error="skip"`` bad rows are left out and
    ``DataFrame.attrs["errors"]`` maps their row numbers to the reasons.
    """
    import tempfile

    from medfm.data.manifest import read_manifest
    from medfm.models.registry import get_entry

    if not isinstance(manifest, Manifest):
        name = model.entry.name if isinstance(model, LoadedModel) else model
        chosen = get_profile(profile or get_entry(name).profile)
        manifest = read_manifest(manifest, coords=coords, seeds=not isinstance(chosen, Profile2D))
    with tempfile.TemporaryDirectory(prefix="medfm-features-") as tmp:
        result = extract_features(
            manifest,
            Path(tmp) / "features.parquet",
            model=model,
            weights=weights,
            random_init=random_init,
            seed=seed,
            batch_size=batch_size,
            device=device,
            precision=precision,
            num_workers=num_workers,
            column_prefix=column_prefix,
            on_error=on_error,
            profile=profile,
            progress=progress,
        )
        table = pd.read_parquet(result.features)
    table.attrs["errors"] = dict(result.errors)
    return table
