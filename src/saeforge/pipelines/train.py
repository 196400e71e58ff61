"""`python train.py`: build/reuse the activation store, train the SAE, calibrate, export, report."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from saeforge.activations.extract import build_store
from saeforge.atomic import atomic_write_json
from saeforge.pipelines.callbacks import ExportSAECallback
from saeforge.sae.datamodule import ActivationDataModule
from saeforge.sae import metrics
from saeforge.lm.hookpoints import canonical_name, hookpoint_layer
from saeforge.pipelines.run import make_wandb_logger, run_dir, strip_secrets
from saeforge.sae.formats import write_saelens
from saeforge.sae.module import SAEModule, resolve_sae_config

log = logging.getLogger(__name__)
INIT_SAMPLE_ROWS = 32768


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """The `trainer` group as Lightning kwargs; `precision: auto` → bf16-mixed on CUDA, fp32 on CPU."""
    kwargs = dict(cfg.trainer)
    if kwargs.get("precision") == "auto":
        on_gpu = kwargs.get("accelerator") in ("gpu", "cuda") or (kwargs.get("accelerator") == "auto" and torch.cuda.is_available())
        kwargs["precision"] = "bf16-mixed" if on_gpu else "32-true"
    return kwargs


def resolve_ckpt(cfg: DictConfig, directory: Path) -> str | None:
    """`ckpt_path=last` or an existing <run.dir>/checkpoints/last.ckpt resumes; else a fresh run."""
    last = directory / "checkpoints" / "last.ckpt"
    if cfg.ckpt_path in (None, "last"):
        if last.is_file():
            log.info("resuming from %s", last)
            return str(last)
        if cfg.ckpt_path == "last":
            raise FileNotFoundError(f"ckpt_path=last but {last} does not exist")
        return None
    path = Path(str(cfg.ckpt_path))
    if not path.is_file():
        raise FileNotFoundError(f"ckpt_path={str(path)!r} does not exist")
    return str(path)


def check_ckpt_d_in(ckpt: str, d_in: int) -> None:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    ckpt_d_in = state["sae.W_enc"].shape[0]
    if ckpt_d_in != d_in:
        raise ValueError(f"checkpoint {ckpt} has d_in={ckpt_d_in} but the data has d_in={d_in}")


def data_source(cfg: DictConfig) -> tuple[str, str | None, str, str]:
    """(path, hookpoint within a store, hookpoint name for the export, model name)."""
    if cfg.data.get("path"):
        return str(cfg.data.path), None, canonical_name(str(cfg.data.hookpoint)), str(cfg.model.get("name") or "unknown")
    store = build_store(cfg.model, cfg.corpus, cfg.data, overwrite=list(cfg.get("overwrite") or []))
    hookpoint = canonical_name(str(cfg.data.hookpoint))
    return str(store.root), hookpoint, hookpoint, str(store.manifest.get("model"))


def train(cfg: DictConfig) -> dict[str, Any]:
    """Run one training job; returns the final held-out metrics (also written to metrics.json)."""
    directory = run_dir(cfg)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    path, store_hookpoint, hookpoint, model_name = data_source(cfg)
    if cfg.get("extract_only"):
        print(f"activation store ready: {path}")
        return {"store": path}

    dm = ActivationDataModule(cfg.data, path, store_hookpoint, int(cfg.seed))
    d_in = dm.d_in
    d_sae = resolve_sae_config(cfg.sae, d_in)["d_sae"]
    if not 0 < float(cfg.sae.k) < d_sae:
        raise ValueError(f"sae.k={cfg.sae.k} must be positive and smaller than d_sae={d_sae}")
    module = SAEModule(cfg.sae, d_in)
    ckpt = resolve_ckpt(cfg, directory)
    if ckpt:
        check_ckpt_d_in(ckpt, d_in)
    module.initialize(dm.sample_rows(INIT_SAMPLE_ROWS))
    export_dir = directory / "sae" / hookpoint
    provenance = {"config": strip_secrets(cfg), "git_sha": git_sha(), "data": path}

    def write(pl_module: SAEModule, extra: dict[str, Any], sparsity: torch.Tensor | None = None) -> Path:
        return write_saelens(pl_module.export_sae(), export_dir, hook_name=hookpoint, hook_layer=hookpoint_layer(hookpoint),
                             model_name=model_name, provenance={**provenance, **extra}, sparsity=sparsity)

    checkpoint = ModelCheckpoint(dirpath=directory / "checkpoints", save_last=True, save_top_k=-1,
                                 every_n_train_steps=int(cfg.checkpoint_every_n_steps))
    logger = make_wandb_logger(cfg, directory, "train")
    callbacks: list[L.Callback] = [checkpoint, ExportSAECallback(write)]
    every = int(cfg.interpret_callback.every_n_steps)
    if every > 0:
        from hydra import compose

        from saeforge.pipelines.callbacks import InterpretCallback

        interpret_cfg = compose(config_name="interpret", overrides=list(cfg.interpret_callback.overrides))
        callbacks.append(InterpretCallback(interpret_cfg, directory, hookpoint, cfg, every))
    trainer = L.Trainer(**trainer_kwargs(cfg), default_root_dir=str(directory), logger=logger if logger else False,
                        callbacks=callbacks)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt)
    check_ranks_identical(module)

    threshold = module.calibrate(dm.heldout_batches())
    result = heldout_metrics(module, dm)
    result.update({"threshold": threshold, "k": float(cfg.sae.k), "d_sae": module.c["d_sae"], "d_in": d_in,
                   "steps": trainer.global_step, "hookpoint": hookpoint})
    if trainer.is_global_zero:
        sparsity = torch.log10(result.pop("_frequency").clamp_min(1e-10))
        write(module, {"step": trainer.global_step, "threshold": "calibrated on held-out rows"}, sparsity)
        atomic_write_json(directory / "metrics.json", result)
        if logger is not None:
            logger.experiment.summary.update({f"final/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
        print(f"SAE exported to {export_dir}")
        print(f"held-out: FVU {result['fvu']:.4f}  MSE {result['mse']:.4g}  L0 {result['l0']:.1f}  "
              f"dead {100 * result['dead_frac']:.1f}%  ({result['rows']} rows)")
    else:
        result.pop("_frequency")
    return result


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
    for batch in dm.heldout_batches():
        acts = sae.encode_inference(batch)
        totals.update(batch, sae.decode(acts), acts)
    return {**totals.summary(), "_frequency": totals.fire_counts.double() / totals.rows}
