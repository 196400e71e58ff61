"""Shared fixtures: Hydra composition of the real configs, the tiny model, tiny stores."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def compose_config(name: str, overrides: list[str]) -> DictConfig:
    """Compose `configs/<name>.yaml` with overrides, resolved, as the entry scripts see it."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=False)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Tiny-model train config writing under tmp_path."""

    def make(*overrides: str, name: str = "train") -> DictConfig:
        base = [
            "model=tiny",
            "logger=none",
            f"run.dir={tmp_path / 'run'}",
            f"data.cache_dir={tmp_path / 'cache'}",
            "data.hookpoint=layers.2",
            "data.n_tokens=2048",
            "data.ctx_len=32",
            "data.shard_tokens=512",
            "data.extract_batch_size=4",
        ]
        cfg = compose_config(name, base + list(overrides))
        OmegaConf.resolve(cfg)
        return cfg

    return make


@pytest.fixture(scope="session")
def tiny_lm():
    from saeforge.lm.loading import load_lm

    cfg = compose_config("train", ["model=tiny"]).model
    return load_lm(cfg)
