"""``medfm finetune``: LightningCLI over :class:`FinetuneModule` and :class:`FinetuneData`, and ``sweep``.

``medfm finetune fit --config task.yaml`` trains, restores the best validation weights, tests them once and writes
``results.json``, the curves and the model card into the run's log folder (:mod:`medfm.finetune.outputs`).
``medfm finetune sweep --config task.yaml --fractions 1 0.1 --repeats 3`` runs it per training fraction and seed
and writes one table of test metrics.
"""

from __future__ import annotations

from pathlib import Path

from medfm.finetune.data import FinetuneData
from medfm.finetune.module import FinetuneModule
from medfm.finetune.outputs import write_run_outputs
from medfm.train.cli import EvaluatedCLI, MedfmCLI, fit_summary, launch

DESCRIPTION = (
    "Fine-tune a trunk with a head: `fit --config task.yaml` (configs/finetune/). Fractions × seeds: "
    "`medfm finetune sweep --config task.yaml --out DIR --fractions 1 0.1 --repeats 3`."
)


class FinetuneCLI(EvaluatedCLI):
    """After fit: test the restored best weights once, then write results, curves and the model card."""

    def write_outputs(self, folder: Path) -> str:
        """results.json, curves and the model card (:mod:`medfm.finetune.outputs`)."""
        return fit_summary(self.model, write_run_outputs(self.model, self.datamodule, folder))


def run_cli(args: list[str] | None = None) -> MedfmCLI:
    """Run ``medfm finetune`` with LightningCLI on ``args`` (e.g. ``["fit", "--config", "task.yaml"]``)."""
    return launch(FinetuneModule, FinetuneData, args, "finetune", DESCRIPTION, FinetuneCLI)
