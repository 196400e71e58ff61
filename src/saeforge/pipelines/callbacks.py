"""Lightning callbacks of a training run: export the SAE at each checkpoint, interpret every N steps,
end every DDP rank with one line when one of them dies.

The first two act on rank zero only. Under DDP the other ranks simply wait at their next collective for as
long as the interpret stages take (ddp_timeout_s is then at least 30 min). Interpret outputs go to
`<run.dir>/interpret_steps/step-<N>/<hookpoint>/`; a table of each feature's top logit-lens tokens,
frequency and label (when explain runs) goes to the logger.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
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


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel (zombies then count as alive)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class DeadRankWatchdog(L.Callback):
    """Under DDP, end this rank within a second when another rank on this machine dies during `fit`, with
    one line on stderr naming it (`error: DDP rank N (pid P) died; stopping`) instead of a traceback or
    a wait for the collective timeout.

    At setup the ranks exchange (host, pid); a thread then polls the same-host peers every `interval` s,
    and a collective that fails (gloo: "connection reset") checks them too. The lowest surviving rank
    prints the line; rank 0, the launcher, first kills the other ranks it launched. Every survivor exits
    with status 1. Lightning's own child observer (rank 0, every 5 s, a silent SIGKILL of everything) is
    paused while this one watches; both stop at the end of `fit`, when ranks finish at their own pace.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.rank = 0
        self.peers: dict[int, int] = {}
        """Global rank → pid of the other ranks on this machine."""
        self.stop = threading.Event()
        self.launched: list[Any] = []
        self.paused: list[threading.Thread] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (socket.gethostname(), os.getpid()))
        self.rank = dist.get_rank()
        host = socket.gethostname()
        self.peers = {r: pid for r, (h, pid) in enumerate(everyone) if h == host and r != self.rank}
        self.launched = list(getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or [])
        self.paused = [t for t in threading.enumerate() if type(t).__name__ == "_ChildProcessObserver"]
        for thread in self.paused:
            thread._run = lambda: False  # type: ignore[attr-defined]  # ours reports which rank died
        self.stop.clear()
        threading.Thread(target=self.watch, name="dead-rank-watchdog", daemon=True).start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stop.set()
        for thread in self.paused:
            del thread._run  # type: ignore[attr-defined]  # Lightning's observer again
        self.paused = []

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """A failed collective: when a peer died, say which and stop (its death may take a moment to show)."""
        if not self.peers or self.stop.is_set():
            return
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if self.dead():
                self.end()
            time.sleep(0.05)

    def dead(self) -> list[int]:
        for proc in self.launched:
            proc.poll()  # reap: a dead child leaves /proc
        return sorted(r for r, pid in self.peers.items() if not process_alive(pid))

    def watch(self) -> None:
        while not self.stop.wait(self.interval):
            if self.dead():
                self.end()

    def end(self) -> None:
        """Report the lowest dead rank (from the lowest surviving rank only) and exit with status 1."""
        dead = self.dead()
        for proc in self.launched:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if self.rank == min([self.rank, *(r for r in self.peers if r not in dead)]):
            print(f"error: DDP rank {dead[0]} (pid {self.peers[dead[0]]}) died; stopping", file=sys.stderr, flush=True)
        os._exit(1)
