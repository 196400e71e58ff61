"""SAEModule: the LightningModule that trains a `SparseAutoencoder` on raw activation rows.

Each step: normalise x → x_n = (x − μ)·s, forward, loss = mse + auxk, backward, drop the
W_dec gradient parallel to each decoder row, Adam step, renormalise the decoder rows; with
`sae.resample_every`, every N steps also move weak / duplicate latents (`saeforge.sae.resample`).

DDP: each rank runs batch-TopK over its LOCAL batch (k·B_local latents per rank, so the
per-token budget is the same as single-process; no activation all-gather). The state that is not
a parameter is kept identical on every rank by all-reducing, every step, the "fired" mask
(MAX → `tokens_since_fired`) and the batch threshold statistic min_kept (mean → EMA threshold).
All of it lives in buffers (`input_scale`, `input_mean`, `tokens_since_fired`, `sae.threshold`),
so checkpoints resume exactly.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from torch import Tensor

from saeforge.config import SAESettings, from_config
from saeforge.sae import metrics
from saeforge.sae.model import SAEConfig, SparseAutoencoder, calibrate_threshold
from saeforge.sae.resample import count_fires_, init_decoder_from_rows_, pick_latents, resample_
from saeforge.sae.sparse_ops import serial_cpu

def resolve_settings(cfg: SAESettings | Mapping[str, Any] | None, d_in: int) -> dict[str, Any]:
    """The SAE settings (defaults filled, unknown keys rejected) with d_sae and lr derived, as a dict."""
    return dataclasses.asdict(from_config(SAESettings, cfg, "sae").resolve(d_in))


def _all_reduce_(t: Tensor, op: Any) -> Tensor:
    """In-place all-reduce when running distributed; a no-op otherwise."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=op)
    return t


def _zero_missing_resample_state(state_dict: dict[str, Tensor], prefix: str, *args: Any) -> None:
    """Checkpoints written before the resampling state was checkpointed load with zero counts."""
    dead = state_dict.get(prefix + "tokens_since_fired")
    if dead is None:
        return
    state_dict.setdefault(prefix + "resample_fires", torch.zeros_like(dead))
    state_dict.setdefault(prefix + "resampled", torch.zeros((), dtype=torch.long))


class SAEModule(L.LightningModule):
    """Trains a batch-TopK / TopK SAE. See the module docstring for the DDP semantics."""

    def __init__(self, cfg: SAESettings | Mapping[str, Any] | None, d_in: int) -> None:
        super().__init__()
        self.c = resolve_settings(cfg, d_in)
        self.save_hyperparameters({"sae": self.c, "d_in": d_in})
        self.sae = SparseAutoencoder(SAEConfig(
            d_in=d_in, d_sae=self.c["d_sae"], k=float(self.c["k"]), architecture=self.c["architecture"],
            k_aux=self.c["k_aux"], auxk_coef=float(self.c["auxk_coef"]),
        ))
        self.register_buffer("input_scale", torch.ones(()))
        self.register_buffer("input_mean", torch.zeros(d_in))
        self.register_buffer("tokens_since_fired", torch.zeros(self.c["d_sae"], dtype=torch.long))
        # inference-strength fires per latent since the last resampling (saeforge.sae.resample); checkpointed so a
        # resumed run resamples exactly as an uninterrupted one; checkpoints from before it load with zeros
        self.register_buffer("resample_fires", torch.zeros(self.c["d_sae"], dtype=torch.long))
        self.register_buffer("resampled", torch.zeros((), dtype=torch.long))  # latents moved so far, for the summary
        self._register_load_state_dict_pre_hook(_zero_missing_resample_state)
        self._last_step_time: float | None = None
        self._resample_rows: tuple[Tensor, Tensor] | None = None  # (x, x̂) of a step that resamples
        self.throughput = Throughput()

    # ---- setup -------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, sample: Tensor) -> None:
        """Estimate μ, s from `sample` [N, d_in] (raw) and init the SAE on the normalised sample.

        s makes E‖(x − μ)·s‖ = sqrt(d_in); μ is the sample mean if mean_center else 0. Call with the
        same sample (and seed) on every rank.
        """
        sample = sample.float()
        mean = sample.mean(0) if self.c["mean_center"] else torch.zeros_like(sample[0])
        scale = 1.0
        if self.c["normalize_input"]:
            scale = math.sqrt(sample.shape[1]) / float((sample - mean).norm(dim=1).mean().clamp_min(1e-12))
        self.input_mean.copy_(mean)
        self.input_scale.fill_(scale)
        self.sae.init_from_sample(self.normalize(sample), self.c["b_dec_init"])
        if self.c["decoder_init"] == "rows":
            init_decoder_from_rows_(self.sae, self.normalize(sample))

    def normalize(self, x: Tensor) -> Tensor:
        """Raw rows → the SAE's input space: (x − μ)·s (μ = 0 unless mean_center: one pass then)."""
        x = x.to(self.input_mean.dtype)
        return (x - self.input_mean).mul_(self.input_scale) if self.c["mean_center"] else x * self.input_scale

    def dead_tokens(self, tokens_per_step: int) -> int:
        """Dead-latent horizon: min(dead_tokens, total_tokens // 4), so short runs still get AuxK.

        total_tokens = estimated optimizer steps × global batch size (when a trainer is attached).
        """
        horizon = int(self.c["dead_tokens"])
        trainer = self._trainer
        if trainer is not None:
            steps = trainer.estimated_stepping_batches
            if math.isfinite(steps):
                horizon = min(horizon, max(1, int(steps) * tokens_per_step // 4))
        return horizon

    # ---- training ----------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.throughput.start()

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.throughput.tokens += batch.shape[0] * (self.trainer.world_size if self._trainer is not None else 1)

    def on_train_end(self) -> None:
        self.throughput.stop()

    def training_step(self, batch: Tensor, batch_idx: int = 0) -> Tensor:
        x = self.normalize(batch)
        n_tokens = _all_reduce_(torch.tensor(x.shape[0], device=x.device), dist.ReduceOp.SUM)
        horizon = self.dead_tokens(int(n_tokens))
        dead_mask = self.tokens_since_fired >= horizon
        out = self.sae(x, dead_mask=dead_mask)
        loss = out.mse + out.auxk_loss
        self._update_state(out.latent_indices, out.min_kept, int(n_tokens))
        self._log_train(out, loss, dead_mask, int(n_tokens))
        if int(self.c["resample_every"]) > 0:
            fires = torch.zeros_like(self.resample_fires)  # this step's, summed over ranks: identical state everywhere
            count_fires_(fires, out.latent_indices, out.latent_acts,
                         self.sae.threshold if self.c["architecture"] == "batchtopk" else None)
            self.resample_fires += _all_reduce_(fires, dist.ReduceOp.SUM)
            if self._resample_due():
                self._resample_rows = (x.detach(), out.sae_out.detach())
        return loss

    def _resample_due(self) -> bool:
        """This step ends a `resample_every` window that starts before `resample_until` of training."""
        every = int(self.c["resample_every"])  # > 0: training_step only asks then
        if self._trainer is None:
            return False
        step, total = self.global_step + 1, self.trainer.estimated_stepping_batches
        return step % every == 0 and (not math.isfinite(total) or step <= float(self.c["resample_until"]) * total)

    @torch.no_grad()
    def _resample(self, optimizer: Any) -> None:
        """Resample dead / duplicate latents (saeforge.sae.resample) with the rows stashed by training_step."""
        x, x_hat = self._resample_rows
        self._resample_rows = None
        latents = pick_latents(self.resample_fires, self.sae.W_dec, float(self.c["resample_min_fires"]),
                               float(self.c["resample_dup_cos"]))
        moved = resample_(self.sae, getattr(optimizer, "optimizer", optimizer), latents, x, x_hat)
        self.tokens_since_fired[latents[:moved]] = 0
        self.resample_fires.zero_()
        self.resampled += moved
        self.log("train/resampled", float(moved))

    @torch.no_grad()
    def _update_state(self, latent_indices: Tensor, min_kept: Tensor, n_tokens: int) -> None:
        """tokens_since_fired and the EMA threshold, identical on all ranks."""
        fired = torch.zeros_like(self.tokens_since_fired, dtype=torch.int32)
        fired[latent_indices] = 1  # inside optimizer_step's step_threads, as all of training_step
        _all_reduce_(fired, dist.ReduceOp.MAX)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[fired.bool()] = 0
        if self.c["architecture"] == "batchtopk":
            m = _all_reduce_(min_kept.detach().double().reshape(1).clone(), dist.ReduceOp.SUM)
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            rate = float(self.c["threshold_momentum"])
            t = self.sae.threshold
            t.copy_((1 - rate) * t + rate * (m[0] / world).to(t.dtype))

    def _log_train(self, out: Any, loss: Tensor, dead_mask: Tensor, n_tokens: int) -> None:
        now = time.perf_counter()
        if self._last_step_time is not None:
            self.log("train/tokens_per_s", n_tokens / max(now - self._last_step_time, 1e-9), prog_bar=True)
        self._last_step_time = now
        self.log("train/loss", loss.detach(), prog_bar=True)
        self.log("train/fvu", out.fvu.detach(), prog_bar=True)
        self.log("train/dead_frac", dead_mask.float().mean(), prog_bar=True)
        if not self._logger_step():
            return  # the rest only reaches the logger: each self.log costs ~1 ms (10+ on busy cores)
        self.log("train/mse", out.mse.detach())
        self.log("train/l0", out.l0)
        self.log("train/l0_inference", out.l0_inference)
        self.log("train/auxk_loss", out.auxk_loss.detach())
        self.log("train/threshold", self.sae.threshold.float().mean())
        if self._trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])

    def _logger_step(self) -> bool:
        """Whether Lightning writes this step's logged values to the logger (its every-`log_every_n_steps` rule)."""
        trainer = self._trainer
        if trainer is None:
            return True
        every = max(1, trainer.log_every_n_steps)
        return (trainer.global_step + 1) % every == 0 or trainer.should_stop or bool(trainer.fast_dev_run)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.sae.remove_parallel_grads_()

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        with self.step_threads():  # Lightning runs training_step and backward inside, via the closure
            super().optimizer_step(*args, **kwargs)
            self.sae.normalize_decoder_()
        if self._resample_rows is not None:
            self._resample(kwargs.get("optimizer", args[2] if len(args) > 2 else None))

    def step_threads(self) -> Any:
        """The thread policy of one training step on CPU: all of it on one thread but the encoder GEMM,
        which keeps every thread (`sparse_ops.serial_cpu`): on 2 shared cores the step ran 1.3–2× faster."""
        return serial_cpu(self.sae.W_enc)

    def configure_optimizers(self) -> Any:
        opt = make_adam(self.sae.parameters(), float(self.c["lr"]))
        total = self.trainer.estimated_stepping_batches
        total = int(total) if math.isfinite(total) else 0
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: lr_factor(step, int(self.c["warmup_steps"]), float(self.c["decay_start"]), total)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---- validation / export -----------------------------------------------------------------
    @torch.no_grad()
    def validation_step(self, batch: Tensor, batch_idx: int = 0) -> None:
        """Inference-mode (JumpReLU at the current threshold / top-k) metrics on normalised rows."""
        x = self.normalize(batch)
        rows, cols, vals = self.sae.encode_inference_sparse(x)  # the nonzeros of encode_inference: no dense decode
        x_hat = self.sae.decode_sparse(rows, cols, vals, x.shape[0])
        self.log("val/mse", metrics.mse(x, x_hat), sync_dist=True)
        self.log("val/fvu", metrics.fvu(x, x_hat), prog_bar=True, sync_dist=True)
        self.log("val/l0_inference", x.new_tensor(vals.numel() / x.shape[0]), sync_dist=True)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Tensor] | Callable[[], Iterable[Tensor]]) -> float | None:
        """Set the JumpReLU threshold so inference L0 = k on held-out RAW `batches` (batchtopk only).

        `batches`: a callable returning a fresh iterable (re-read when an exact second pass is
        needed, see `calibrate_threshold`) or an iterable (kept in memory)."""
        if self.c["architecture"] != "batchtopk":
            return None
        read = batches if callable(batches) else (lambda rows=list(batches): rows)
        return calibrate_threshold(self.sae, lambda: (self.normalize(b.to(self.input_mean.device)) for b in read()))

    @torch.no_grad()
    def export_sae(self) -> SparseAutoencoder:
        """A CPU copy of the SAE that works on RAW activations (input normalisation folded in)."""
        mean = self.input_mean if self.c["mean_center"] else None
        return self.sae.fold_input_normalization(float(self.input_scale), mean).cpu().eval()


def make_adam(params: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam with the fused kernel (one pass over each parameter: several times faster on CPU)."""
    return torch.optim.Adam(params, lr=lr, fused=True)


class Throughput:
    """Training tokens per second, from the start of the first step of this fit to its end (data
    streaming, validation and checkpoints included; process start-up and the final export not)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.t0: float | None = None
        self.seconds = 0.0

    def start(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.t0 is not None:
            self.seconds = time.perf_counter() - self.t0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def lr_factor(step: int, warmup_steps: int, decay_start: float, total_steps: int) -> float:
    """Linear warm-up over `warmup_steps`, constant, then linear decay to 0 from decay_start·total."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if total_steps > 0:
        start = int(decay_start * total_steps)
        if step >= start and total_steps > start:
            factor *= max(0.0, (total_steps - step) / (total_steps - start))
    return factor
