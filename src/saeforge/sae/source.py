"""Resolve `ckpt=...`: a run directory, a Lightning checkpoint, or an exported/imported SAE.

Returns the SAE (on raw activations), its hookpoint, and — when the SAE came from one of our runs —
that run's directory and config, so later stages reuse its model, corpus and activation store.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from saeforge.lm.hookpoints import canonical_name
from saeforge.sae.formats import load_sae
from saeforge.sae.model import SparseAutoencoder


@dataclass
class SAESource:
    """What `ckpt=` pointed at."""

    sae: SparseAutoencoder
    hookpoint: str
    run_dir: Path | None
    run_cfg: DictConfig | None
    description: str


RUN_CONFIG = "run_config.yaml"
"""The config that trained a run's checkpoints, written by training when it starts (`pipelines/train.py`)."""


def run_config_path(run: Path) -> Path | None:
    """The run's recorded config: run_config.yaml, else (older runs) Hydra's .hydra/config.yaml."""
    for candidate in (run / RUN_CONFIG, run / ".hydra" / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def find_run_dir(path: Path) -> Path | None:
    """The nearest ancestor (or self) holding a run config (run_config.yaml or .hydra/config.yaml) — one of our training runs."""
    for candidate in [path, *path.parents]:
        if run_config_path(candidate) is not None:
            return candidate
    return None


def _from_lightning(path: Path) -> tuple[SparseAutoencoder, dict[str, Any]]:
    from saeforge.sae.module import SAEModule

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    hparams = ckpt.get("hyper_parameters") or {}
    if "sae" not in hparams or "d_in" not in hparams:
        raise ValueError(f"{path}: not a saeforge Lightning checkpoint (no sae hyper-parameters)")
    module = SAEModule(hparams["sae"], int(hparams["d_in"]))
    module.load_state_dict(ckpt["state_dict"])
    return module.export_sae(), {"format": "lightning", "step": ckpt.get("global_step")}


def resolve_sae(ckpt: str | Path, hookpoint: str | None = None) -> SAESource:
    """Load what `ckpt` names; `hookpoint` picks one SAE in a run with several or names an import's."""
    path = Path(str(ckpt)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ckpt={str(ckpt)!r} does not exist")
    run = find_run_dir(path)
    config_file = run_config_path(run) if run else None
    run_cfg = OmegaConf.load(config_file) if config_file else None
    if path.is_dir() and run == path:
        exported = sorted((path / "sae").glob("*/cfg.json"))
        if not exported:
            raise ValueError(f"run directory {path} has no exported SAE under sae/ (did training finish a checkpoint?)")
        if hookpoint:
            found = [p for p in exported if p.parent.name == canonical_name(hookpoint)]
            if not found:
                raise ValueError(f"run directory {path} has no SAE at hookpoint {hookpoint}; it has "
                                 f"{', '.join(p.parent.name for p in exported)}")
            exported = found
        path = exported[0].parent
    if path.suffix == ".ckpt":
        sae, info = _from_lightning(path)
        hp = hookpoint or (run_cfg.data.hookpoint if run_cfg is not None else None)
    else:
        sae, info = load_sae(path)
        cfg = info.get("cfg") or {}
        hp = hookpoint or cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    if not hp:
        raise ValueError(f"ckpt={str(ckpt)!r}: cannot tell the SAE's hookpoint; pass hookpoint=layers.N")
    return SAESource(sae.eval(), canonical_name(str(hp)), run, run_cfg, f"{path} ({info.get('format')})")
