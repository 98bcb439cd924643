"""The LightningCLI shared by ``medfm pretrain`` and ``medfm finetune``: defaults, resume and launch.

``fit --config run.yaml [--trainer.devices 2 …]`` trains; ``--print_config`` shows the resolved config, which is
also saved beside the checkpoints; ``--ckpt_path last`` resumes the newest ``last.ckpt`` under the run's
``default_root_dir``.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import lightning.pytorch as pl
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from medfm.errors import CheckpointError, ConfigError, one_line
from medfm.train.distributed import GlobalBatchNormSync, runs_on_cpu


def find_last_checkpoint(root: str | Path) -> Path | None:
    """The newest ``last.ckpt`` under a run folder, or None."""
    found = sorted(Path(root).rglob("last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def default_loggers(root: str | Path) -> list:
    """A CSV logger always (metrics.csv per run), and TensorBoard too when it is installed."""
    loggers: list = [CSVLogger(root, name="logs")]
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        loggers.append(TensorBoardLogger(root, name="logs", version=loggers[0].version))
    return loggers


def default_precision(accelerator: str) -> str:
    """bf16 mixed precision where the GPU has it, 16-bit mixed on older GPUs, full precision on the CPU."""
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "32-true"


def _option_keys(parser: argparse.ArgumentParser) -> list[str]:
    """The dotted keys a (sub)command's parser accepts (``model.lr_trunk``, ``trainer.max_epochs``, ...)."""
    keys = []
    for action in parser._actions:  # argparse keeps the actions here; jsonargparse adds one per dotted key
        if action.dest not in (argparse.SUPPRESS, "help", "config", "print_config") and not action.dest.startswith(
            "__"
        ):
            keys.append(action.dest)
    return keys


def closest_key(key: str, keys: list[str]) -> str | None:
    """The valid key closest to a mistyped one: the section (``model``, ``trainer``) first, then the name in it."""
    if "." not in key:
        close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
        return close[0] if close else None
    section, name = key.split(".", 1)
    sections = sorted({k.split(".", 1)[0] for k in keys if "." in k})
    for fixed in [section] if section in sections else difflib.get_close_matches(section, sections, n=1, cutoff=0.6):
        names = [k.split(".", 1)[1] for k in keys if k.startswith(f"{fixed}.")]
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
        if close:
            return f"{fixed}.{close[0]}"
    return None


def config_error_line(message: str, keys: list[str]) -> str:
    """One line for a config or option error of jsonargparse: the key, what is wrong, the closest valid key."""
    unknown = re.search(r"does not accept option '([^']+)'", message) or re.search(
        r"unrecognized arguments:\s*(\S+)", message, re.I
    )
    if unknown:
        key = unknown.group(1).lstrip("-").split("=", 1)[0]
        hint = f"; did you mean `{close}`?" if (close := closest_key(key, keys)) else ""
        return f"`{key}` is not an option{hint}"
    bad_value = re.search(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if bad_value:
        reason = one_line(bad_value.group(2))
        union = re.search(r"Union subtypes Subtypes: \[(.*?)\] Errors:.* Given value: (.*)$", reason)
        if union:
            allowed = re.sub(r"<class '(?:[\w]+\.)*(\w+)'>", r"\1", union.group(1)).replace("NoneType", "None")
            reason = f"expected one of {allowed}, got '{union.group(2)}'"
        reason = re.sub(r"Expected a <class '([\w.]+)'>\. Got value: (.*)", r"expected \1, got '\2'", reason)
        if len(reason) > 300:
            reason = reason[:297] + "..."
        return f"`{bad_value.group(1)}`: {reason}"
    return one_line(message)


class MedfmArgumentParser(LightningArgumentParser):
    """Lightning's parser whose errors are one line (the key, what is wrong, the closest valid key), not the usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """Raise a :class:`ConfigError` of one line; the usage is shown by ``--help`` only."""
        if not self.exit_on_error:  # jsonargparse is trying alternatives and expects its own exception
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = parser.prog.replace(" [options]", "")
        raise ConfigError(f"{config_error_line(message, _option_keys(parser))} (all options: `{prog} --help`)")


def check_config_files(args: list[str] | None) -> None:
    """Refuse a ``--config`` file that is missing or not valid YAML, naming the file (and the line) in one line."""
    import yaml

    args = list(args or [])
    for i, arg in enumerate(args):
        if arg in ("-c", "--config") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = Path(value)
        if value.lstrip().startswith(("{", "[")) or "\n" in value:  # a config given inline, not a file
            continue
        if not path.is_file():
            raise ConfigError(f"--config {value}: file not found")
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(err, "problem", None) or one_line(err)
            raise ConfigError(f"--config {value}: not valid YAML{where}: {problem}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"--config {value}: cannot be read ({err})") from None


_RATE = re.compile(r"(^|_)(lr|learning_rate|weight_decay|momentum)(_|$)")


def check_rates(model_config: dict[str, Any] | Any) -> None:
    """Refuse a negative learning rate, weight decay or momentum in the model's settings, naming its key."""
    items = model_config.items() if hasattr(model_config, "items") else []
    for key, value in items:
        if _RATE.search(str(key)) and isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0:
            what = "a learning rate" if "lr" in str(key) or "learning_rate" in str(key) else str(key).replace("_", " ")
            raise ConfigError(f"`model.{key}` is {value}: {what} cannot be negative")


def check_ckpt_path(ckpt_path: object) -> None:
    """Refuse a ``--ckpt_path`` file that is missing, could run code when loaded, or holds non-finite weights."""
    if not ckpt_path or str(ckpt_path) in ("last", "best", "hpc", "registry"):
        return
    from medfm.models.checkpoints import read_checkpoint

    try:
        read_checkpoint(ckpt_path)
    except CheckpointError as err:
        raise CheckpointError(f"--ckpt_path {err}") from None


class MedfmCLI(LightningCLI):
    """LightningCLI with medfm's defaults: CSV (+TensorBoard) logging, last checkpoints, resumable runs,
    mixed precision where the device has it, global batch norm on CPU DDP."""

    default_root = "outputs/run"

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        root = config.get("default_root_dir") or self.default_root
        config["default_root_dir"] = root
        if config.get("logger") in (None, True):
            config["logger"] = default_loggers(root)
        if config.get("precision") is None:
            config["precision"] = default_precision(str(config.get("accelerator") or "auto"))
        if config.get("sync_batchnorm") and runs_on_cpu(config.get("accelerator")):
            plugins = config.get("plugins")
            plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [] if plugins is None else [plugins]
            config["plugins"] = [*plugins, GlobalBatchNormSync()]
        return super()._instantiate_trainer(config, callbacks)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse, then refuse an unsafe ``--ckpt_path`` in one line before Lightning reads its hyperparameters."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        check_ckpt_path((self.config[subcommand] if subcommand else self.config).get("ckpt_path"))

    def before_instantiate_classes(self) -> None:
        """Refuse, in one line, a negative learning rate (or weight decay, momentum) before anything is built."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        check_rates(config.get("model") or {})

    def before_fit(self) -> None:
        """``--ckpt_path last`` resumes the newest last.ckpt of the run folder (a fresh start if there is none)."""
        fit = self.config_init["fit"]
        if fit.get("ckpt_path") == "last":
            last = find_last_checkpoint(self.trainer.default_root_dir)
            fit["ckpt_path"] = str(last) if last else None
            print(f"resuming from {last}" if last else "no last.ckpt found: starting from scratch")


class EvaluatedCLI(MedfmCLI):
    """After fit: test the restored best weights once, then write results, curves and the model card (rank 0)."""

    def after_fit(self) -> None:
        """Test and write the run's outputs; an interrupted fit writes nothing."""
        trainer = self.trainer
        if trainer.interrupted:
            return
        trainer.test(self.model, datamodule=self.datamodule, verbose=False)
        # Every rank asks: under DDP, Trainer.log_dir broadcasts rank 0's folder (a collective call).
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            print(self.write_outputs(folder))

    def write_outputs(self, folder: Path) -> str:
        """Write the run's outputs into ``folder``; returns the line printed after fit."""
        raise NotImplementedError(f"{type(self).__name__} must say how its runs write their outputs")


def fit_summary(model: pl.LightningModule, card: str | Path) -> str:
    """``test {metric: value}; best {…}; model card PATH``: the line printed after a fit."""
    test = {k: round(v["value"], 4) for k, v in model.test_results.items() if k != "n"}
    return f"test {test}; best {model.best}; model card {card}"


def lightning_verbosity(args: list[str]) -> tuple[list[str], bool]:
    """Take ``--verbose`` out of ``args``: without it Lightning's console notes (devices found, tips, model
    summary, dataloader hints) are hidden and only its warnings, errors and progress bar remain."""
    verbose = "--verbose" in args
    level = logging.INFO if verbose else logging.WARNING
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(level)
    if not verbose:
        warnings.filterwarnings("ignore", category=PossibleUserWarning)
    return [a for a in args if a != "--verbose"], verbose


def launch(
    module: type[pl.LightningModule],
    data: type[pl.LightningDataModule],
    args: list[str] | None,
    command: str,
    description: str = "",
    cli_class: type[MedfmCLI] = MedfmCLI,
    callbacks: list[Callback] | None = None,
) -> MedfmCLI:
    """Run LightningCLI (``cli_class``) for ``module`` + ``data`` on ``args`` with medfm's defaults, as
    ``medfm COMMAND`` writing under ``outputs/COMMAND`` unless the config names a ``default_root_dir``."""
    prog, default_root = f"medfm {command}", f"outputs/{command}"
    # sys.argv stays as it is ("medfm pretrain ..."): DDP relaunches the same command line in each process.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    args, verbose = lightning_verbosity(sys.argv[1:] if args is None else args)
    check_config_files(args)
    run_class = type(f"{cli_class.__name__}Run", (cli_class,), {"default_root": default_root})
    return run_class(
        module,
        data,
        args=args,
        parser_class=MedfmArgumentParser,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "use_distributed_sampler": False,  # medfm's EpochSampler shards each epoch over the ranks itself
            "enable_model_summary": verbose,
            "callbacks": [
                ModelCheckpoint(save_last="link", every_n_epochs=1),  # last.ckpt links the one kept file
                LearningRateMonitor(logging_interval="step"),
                *(callbacks or []),
            ],
        },
        parser_kwargs={
            "prog": prog,
            "description": f"{description} Lightning's console notes are shown with --verbose.".strip(),
        },
    )


def command_main(
    command: str,
    argv: list[str],
    run_cli: Callable[[list[str]], object],
    predict: Callable[[list[str]], int] | None = None,
) -> int:
    """``medfm COMMAND …`` of a training command: ``predict`` (when it has one) and ``sweep`` here; ``fit``,
    ``validate``, ``--print_config``, ``--help`` … go to LightningCLI (``run_cli``)."""
    from medfm.errors import run_guarded
    from medfm.train.sweep import run_sweep, sweep_parser

    if predict is not None and argv[:1] == ["predict"]:
        return predict(argv[1:])
    if argv[:1] == ["sweep"]:
        args = sweep_parser(command).parse_args(argv[1:])
        return run_guarded(
            lambda: run_sweep(args, run_cli), "finished runs are kept; the same sweep goes on from there"
        )
    return run_guarded(lambda: run_cli(argv), "continue with --ckpt_path last")
