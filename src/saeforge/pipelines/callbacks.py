"""Lightning callbacks of a training run: export the SAE at each checkpoint, interpret every N steps.

Both act on rank zero only. Under DDP the other ranks simply wait at their next collective for as
long as the interpret stages take. Interpret outputs go to
`<run.dir>/interpret_steps/step-<N>/<hookpoint>/`; a table of each feature's top logit-lens tokens,
frequency and label (when explain runs) goes to the logger.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class ExportSAECallback(L.Callback):
    """At each checkpoint, write `<run.dir>/sae/<hookpoint>/` with the running (uncalibrated) threshold."""

    def __init__(self, write: Callable[[Any, dict[str, Any]], Path]):
        self.write = write

    @rank_zero_only
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self.write(pl_module, {"step": trainer.global_step, "threshold": "running mean of the smallest kept activation"})


class FingerprintCallback(L.Callback):
    """Stores the run's training fingerprint in every checkpoint, so a rerun resumes only under the same settings."""

    def __init__(self, fingerprint: dict[str, Any]):
        self.fingerprint = fingerprint

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        from saeforge.pipelines.validate import FINGERPRINT_KEY

        checkpoint[FINGERPRINT_KEY] = dict(self.fingerprint)


class InterpretCallback(L.Callback):
    """Every `every_n_steps` optimizer steps, run `cfg.interpret.stages` on `cfg.interpret.max_latents` features."""

    def __init__(self, interpret_cfg: DictConfig, run_dir: Path, hookpoint: str, run_cfg: DictConfig, every_n_steps: int):
        self.cfg, self.run_dir, self.hookpoint, self.run_cfg = interpret_cfg, run_dir, hookpoint, run_cfg
        self.every_n_steps = every_n_steps
        self.lm: Any = None

    @rank_zero_only
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step == 0 or step % self.every_n_steps:
            return
        try:
            self.interpret(trainer, pl_module, step)
        except Exception as err:  # noqa: BLE001 - a callback must never end the training run
            log.warning("interpret callback at step %d failed, training goes on: %s: %s", step, type(err).__name__,
                        str(err).splitlines()[0] if str(err) else "", exc_info=log.isEnabledFor(logging.DEBUG))

    def interpret(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        """Run the stages on the current SAE; a stage that does not apply is skipped with its reason logged."""
        from saeforge.pipelines.interpret import (RUNNERS, SUMMARY_FEEDS, Context, NotApplicable, select_features,
                                                  write_run_record, write_run_summary)
        from saeforge.sae.source import SAESource

        source = SAESource(pl_module.export_sae(), self.hookpoint, self.run_dir, self.run_cfg, f"step {step}")
        out = self.run_dir / "interpret_steps" / f"step-{step}" / self.hookpoint
        out.mkdir(parents=True, exist_ok=True)
        ctx = Context(self.cfg, source, out, self.lm)
        ctx.features = select_features(ctx, None)
        try:
            write_run_record(ctx)
            for stage in self.cfg.interpret.stages:
                try:
                    RUNNERS[str(stage)](ctx)
                except NotApplicable as reason:
                    log.info("interpret callback: stage %s not applicable: %s", stage, reason)
            if any(str(stage) in SUMMARY_FEEDS for stage in self.cfg.interpret.stages):
                write_run_summary(ctx)
        finally:
            self.lm = ctx._lm  # keep the LM loaded for the next time
        self.log_table(trainer, out, step)

    def log_table(self, trainer: L.Trainer, out: Path, step: int) -> None:
        from saeforge.interpret.records import load_records

        records = load_records(out)
        rows = []
        for f in records.ids():
            rec = records[f]
            if not rec.has_maxact and rec.logit_lens is None:
                continue
            top = " ".join(str(t) for t, _ in (rec.logit_lens.top if rec.logit_lens is not None else [])[:5])
            label = rec.explanation.label if rec.explanation is not None else ""
            rows.append([step, f, rec.frequency, top, label])
        log.info("interpret callback at step %d: %d features → %s", step, len(rows), out)
        logger = trainer.logger
        if logger is not None and hasattr(logger, "log_table"):
            logger.log_table("interpret/features", columns=["step", "feature", "frequency", "logit_lens_top", "label"], data=rows, step=step)
