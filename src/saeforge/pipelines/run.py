"""Helpers shared by the entry points: the run directory, secret stripping, logging to W&B."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)
SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password|authorization)$", re.IGNORECASE)


def run_dir(cfg: DictConfig) -> Path:
    """Where this run writes: Hydra's output dir when Hydra runs us (DDP children share it), else run.dir."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        path = Path(HydraConfig.get().runtime.output_dir)
    else:
        path = Path(str(cfg.run.dir))
    path.mkdir(parents=True, exist_ok=True)
    return path


def strip_secrets(node: Any) -> Any:
    """A plain copy of a config with secret-looking values removed (names of env vars are kept)."""
    if isinstance(node, (DictConfig,)):
        node = OmegaConf.to_container(node, resolve=True)
    if isinstance(node, dict):
        return {k: ("<redacted>" if SECRET_KEY.search(str(k)) and v else strip_secrets(v)) for k, v in node.items()}
    if isinstance(node, list):
        return [strip_secrets(v) for v in node]
    return node


def make_wandb_logger(cfg: DictConfig, directory: Path, job: str) -> Any | None:
    """A Lightning WandbLogger (offline by default) or None for `logger=none`."""
    logger_cfg = cfg.get("logger") or {}
    if logger_cfg.get("kind", "none") == "none":
        return None
    from lightning.pytorch.loggers import WandbLogger

    os.environ.setdefault("WANDB_SILENT", "true")
    mode = str(logger_cfg.get("mode", "offline"))
    return WandbLogger(
        project=logger_cfg.get("project", "saeforge"),
        entity=logger_cfg.get("entity"),
        name=logger_cfg.get("name") or f"{job}-{directory.name}",
        save_dir=str(directory),
        mode=mode,
        tags=list(logger_cfg.get("tags") or []),
        job_type=job,
        config=strip_secrets(cfg),
    )


def setup_logging() -> None:
    """Quiet the chattiest libraries; keep our INFO lines."""
    logging.getLogger("saeforge").setLevel(logging.INFO)
    for name in ("httpx", "httpx2", "httpcore", "urllib3", "datasets", "filelock", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
