"""Export the SAE in SAELens format whenever a checkpoint is saved (rank zero only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_only


class ExportSAECallback(L.Callback):
    """At each checkpoint, write `<run.dir>/sae/<hookpoint>/` with the running (uncalibrated) threshold."""

    def __init__(self, write: Callable[[Any, dict[str, Any]], Path]):
        self.write = write

    @rank_zero_only
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.write(pl_module, {"step": trainer.global_step, "threshold": "running mean of the smallest kept activation"})
