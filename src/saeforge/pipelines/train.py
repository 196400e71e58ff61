"""`python train.py`: build/reuse the activation store, train the SAE, calibrate, export, report."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from saeforge.activations.extract import build_store
from saeforge.atomic import atomic_write_json, atomic_write_text
from saeforge.pipelines.callbacks import DeadRankWatchdog, ExportSAECallback, FingerprintCallback
from saeforge.pipelines.checkpoint_io import AtomicCheckpointIO
from saeforge.sae.datamodule import ActivationDataModule
from saeforge.sae import metrics
from saeforge.lm.hookpoints import hookpoint_layer
from saeforge.pipelines.run import (is_primary_process, make_wandb_logger, move_run_aside, run_dir, run_lock, strip_secrets,
                                   write_wandb_run)
from saeforge.pipelines.validate import (TrainPlan, check_resume_fingerprint, run_fingerprint, trainer_kwargs_from,
                                         validate_train)
from saeforge.sae.formats import write_saelens
from saeforge.sae.module import SAEModule
from saeforge.sae.source import RUN_CONFIG

log = logging.getLogger(__name__)
INIT_SAMPLE_ROWS = 32768


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The `trainer` group as Lightning kwargs (see `saeforge.pipelines.validate.trainer_kwargs_from`)."""
    return trainer_kwargs_from(OmegaConf.to_container(cfg.trainer, resolve=True))


def set_ddp_timeout(trainer: L.Trainer, seconds: float) -> None:
    """Under DDP (strategy `ddp` or chosen by `auto`): the process group's collective timeout, and NCCL's
    async error handling (a failed or timed-out collective aborts instead of hanging) unless already set.
    Both take effect when `fit` starts the process group (the launched ranks inherit the environment)."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    if isinstance(trainer.strategy, DDPStrategy):
        trainer.strategy._timeout = timedelta(seconds=seconds)  # DDPStrategy(timeout=...) for any strategy spelling
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")


def data_source(cfg: DictConfig, plan: TrainPlan) -> tuple[str, str | None]:
    """(path of the rows to train on, model name): a user file, or the activation store (built or reused)."""
    if plan.settings.data.path:
        return str(plan.settings.data.path), plan.model_name
    # a DDP child or another node's process reuses the store rank 0 built (or waits for it): it never rebuilds it
    overwrite = list(plan.settings.overwrite) if is_primary_process() else []
    store = build_store(cfg.model, cfg.corpus, cfg.data, overwrite=overwrite)
    return str(store.root), str(store.manifest.get("model"))


def train(cfg: DictConfig, plan: TrainPlan | None = None) -> dict[str, Any]:
    """Run one training job; returns the final held-out metrics (also written to metrics.json).

    `plan` is `validate_train(cfg)` when the caller already ran it (the entry script does, before importing this).
    """
    plan = plan or validate_train(cfg)  # first: bad settings fail here, before any load or extraction
    directory = run_dir(cfg)
    with run_lock(directory, "training", plan.settings.run.wait):  # one process per run directory
        return train_locked(cfg, plan, directory)


def train_locked(cfg: DictConfig, plan: TrainPlan, directory: Path) -> dict[str, Any]:
    """`train` once this process holds the run directory."""
    settings, hookpoint = plan.settings, plan.hookpoint
    if "run" in settings.overwrite:
        move_run_aside(directory)
    if plan.resume is not None:
        check_resume_fingerprint(cfg, plan.resume)  # again, now that no other process can train here
    fingerprint = run_fingerprint(cfg)
    L.seed_everything(int(settings.seed), workers=True, verbose=False)
    path, model_name = data_source(cfg, plan)
    if settings.extract_only:
        print(f"activation store ready: {path}")
        return {"store": path}

    dm = ActivationDataModule(settings.data, path, plan.store_hookpoint, int(settings.seed))
    d_in = dm.d_in
    settings.sae.check_k(d_in)
    module = SAEModule(settings.sae, d_in)
    ckpt = str(plan.resume) if plan.resume else None  # chosen (the newest readable) and checked in validate_train
    module.initialize(dm.sample_rows(INIT_SAMPLE_ROWS))
    export_dir = directory / "sae" / hookpoint
    recorded = recorded_config(cfg, directory, plan)
    provenance = {"config": strip_secrets(recorded), "git_sha": git_sha(), "data": path}

    def write(pl_module: SAEModule, extra: dict[str, Any], sparsity: torch.Tensor | None = None) -> Path:
        return write_saelens(pl_module.export_sae(), export_dir, hook_name=hookpoint, hook_layer=hookpoint_layer(hookpoint),
                             model_name=model_name, provenance={**provenance, **extra}, sparsity=sparsity)

    # a resumed run re-saves the steps after its last.ckpt under the same names (no "-v1" copies beside them)
    checkpoint = ModelCheckpoint(dirpath=directory / "checkpoints", save_last=True, save_top_k=-1,
                                 every_n_train_steps=int(settings.checkpoint_every_n_steps), enable_version_counter=False)
    # a training resumed from a checkpoint keeps its W&B run; a fresh one (overwrite=true too) starts a new run
    logger = make_wandb_logger(recorded, directory, "train", attach=directory if ckpt else None)
    write_wandb_run(logger, directory)  # evaluate.py and interpret.py attach to this W&B run
    callbacks: list[L.Callback] = [checkpoint, ExportSAECallback(write), FingerprintCallback(fingerprint), DeadRankWatchdog()]
    every = int(settings.interpret_callback.every_n_steps)
    if every > 0:
        from hydra import compose

        from saeforge.pipelines.callbacks import InterpretCallback

        interpret_cfg = compose(config_name="interpret", overrides=list(settings.interpret_callback.overrides))
        callbacks.append(InterpretCallback(interpret_cfg, directory, hookpoint, recorded, every))
    trainer = L.Trainer(**trainer_kwargs(cfg), default_root_dir=str(directory), logger=logger if logger else False,
                        callbacks=callbacks, plugins=[AtomicCheckpointIO()])  # every checkpoint written atomically
    set_ddp_timeout(trainer, max(settings.ddp_timeout_s, 1800.0 if every > 0 else 0.0))
    record_run_config(recorded, directory, fingerprint)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    check_ranks_identical(module)

    threshold = module.calibrate(dm.heldout_batches)
    result = heldout_metrics(module, dm)
    result.update({"threshold": threshold, "k": float(settings.sae.k), "d_sae": module.c["d_sae"], "d_in": d_in,
                   "steps": trainer.global_step, "hookpoint": hookpoint, "tokens_per_s": module.throughput.tokens_per_s,
                   "resampled": int(module.resampled)})
    if trainer.is_global_zero:
        sparsity = torch.log10(result.pop("_frequency").clamp_min(1e-10))
        amax = result.pop("_amax")
        write(module, {"step": trainer.global_step, "threshold": "calibrated on held-out rows"}, sparsity)
        atomic_write_json(directory / "metrics.json", result)
        if logger is not None:
            logger.experiment.summary.update({f"final/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
            log_feature_histograms(logger, sparsity, amax)
            logger.experiment.finish()  # the next job of a multirun (same process) starts its own W&B run
        print(f"SAE exported to {export_dir}")
        print(f"held-out: FVU {result['fvu']:.4f}  MSE {result['mse']:.4g}  L0 {result['l0']:.1f}  "
              f"dead {100 * result['dead_frac']:.1f}%  ({result['rows']} rows)  |  resampled {result['resampled']} latents  |  "
              f"training {result['tokens_per_s']:,.0f} tokens/s")
    else:
        result.pop("_frequency")
        result.pop("_amax")
    return result


def log_feature_histograms(logger: Any, log10_frequency: torch.Tensor, amax: torch.Tensor) -> None:
    """Histograms of log10 firing frequency (dead latents at -10) and of A_max (each latent's largest
    activation on the held-out rows) at the end of training."""
    import wandb

    logger.experiment.log({"final/log10_feature_frequency": wandb.Histogram(log10_frequency.double().cpu().numpy()),
                           "final/feature_amax": wandb.Histogram(amax.double().cpu().numpy())})


def recorded_config(cfg: DictConfig, directory: Path, plan: TrainPlan) -> DictConfig:
    """The config a run records (run_config.yaml, cfg.json's provenance, W&B, the interpret callback), unresolved:
    `cfg` with run.dir made concrete; for a user file no model or hookpoint it was not given (`model: {name: null,
    hookpoint: null}`, `data.hookpoint: null`), not the defaults it never used."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    if isinstance(plain.get("run"), dict):
        plain["run"]["dir"] = str(directory)  # not the unresolved `${now:...}` default
    if plan.store_hookpoint is None:
        if plan.model_name is None:
            plain["model"] = {"name": None, "hookpoint": None}
        if not plan.hookpoint_given:
            plain["data"]["hookpoint"] = None
    return OmegaConf.create(plain)


def record_run_config(cfg: DictConfig, directory: Path, fingerprint: dict[str, Any]) -> None:
    """Write <run dir>/run_config.yaml (atomically, rank 0) as training starts: the config these checkpoints
    come from, which interpret and evaluate read, with its training fingerprint (`fingerprint:`, the settings a
    resume must match). A rerun that fails before this point leaves it as it was."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) != 0:
        return
    plain = strip_secrets(OmegaConf.to_container(cfg, resolve=False))
    plain["fingerprint"] = fingerprint
    atomic_write_text(directory / RUN_CONFIG, OmegaConf.to_yaml(OmegaConf.create(plain)))


@torch.no_grad()
def check_ranks_identical(module: SAEModule) -> None:
    """Under DDP, all-gather a fingerprint of every parameter and buffer; raise if ranks differ."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    state = [t.detach().double().flatten().cpu() for t in module.state_dict().values()]
    flat = torch.cat(state)
    weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64)
    fingerprint = torch.stack([flat.sum(), (flat * weights).sum(), (flat * flat).sum()])
    gathered = [torch.zeros_like(fingerprint) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, fingerprint)
    if any(not torch.equal(g, gathered[0]) for g in gathered):
        raise RuntimeError(f"DDP ranks diverged: SAE state fingerprints {[g.tolist() for g in gathered]}")
    if torch.distributed.get_rank() == 0:
        log.info("DDP: %d ranks hold identical SAE state", len(gathered))


@torch.no_grad()
def heldout_metrics(module: SAEModule, dm: ActivationDataModule) -> dict[str, Any]:
    """Inference-mode metrics on raw held-out rows with the exported SAE (what users will load)."""
    sae = module.export_sae()
    totals = metrics.ReconstructionTotals(sae.cfg.d_sae)
    amax = torch.zeros(sae.cfg.d_sae)
    for batch in dm.heldout_batches():
        acts = sae.encode_inference(batch)
        totals.update(batch, sae.decode(acts), acts)
        amax = torch.maximum(amax, acts.detach().float().amax(dim=0).cpu())
    return {**totals.summary(), "_frequency": totals.fire_counts.double() / totals.rows, "_amax": amax}
