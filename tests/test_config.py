"""Settings are defined once (saeforge.config) and bad ones fail first, in one line, as a user sees it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from saeforge.config import (
    ChatParamsConfig,
    ConfigError,
    DataConfig,
    InterpretConfig,
    SAESettings,
    TrainConfig,
    check_overrides,
    from_config,
)
from saeforge.config.checks import trainer_arguments
from saeforge.explainers import ChatParams
from saeforge.pipelines.validate import file_hookpoint_name, trainer_kwargs_from
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data.n_tokens=8192", "data.ctx_len=64", "data.batch_size=256", "data.shuffle_buffer=1024", "data.read_rows=512",
         "sae.expansion_factor=2", "sae.k=4", "sae.warmup_steps=2", "trainer.enable_progress_bar=false"]


def train(tmp: Path, *overrides: str, timeout: int = 600) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAEFORGE_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "train.py", "model=tiny", "logger=none", f"run.dir={tmp / 'run'}", *overrides]
    start = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    return out, time.perf_counter() - start


@pytest.mark.parametrize("override, key", [
    ("sae.k=1000", "sae.k"),
    ("data.batch_size=-4", "data.batch_size"),
    ("data.hookpoint=layers.999", "data.hookpoint"),
    ("+data.batchsize=16", "data.batchsize"),
    ("data.batchsize=16", "data.batchsize"),
    ("trainer.max_stepz=10", "trainer.max_stepz"),
    ("+trainer.foo=1", "trainer.foo"),
])
def test_bad_setting_fails_first_in_one_line(tmp_path, override, key):
    out, seconds = train(tmp_path, override)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], out.stderr[-2000:]
    assert "allowed" in lines[0] or "valid" in lines[0] or "must be" in lines[0]
    assert seconds < 10, f"{seconds:.1f}s"
    assert not (tmp_path / "cache" / "activations").exists()


@pytest.mark.parametrize("script, override, key", [
    ("evaluate.py", "evaluate.exclude_first_tokens=1", "evaluate.exclude_first_tokens"),
    ("evaluate.py", "imported.exclude_first_tokens=-1", "imported.exclude_first_tokens"),
    ("interpret.py", "interpret.maxact.exclude_first_tokens=1", "interpret.maxact.exclude_first_tokens"),
    ("interpret.py", "interpret.steering.max_new_tokens=0", "interpret.steering.max_new_tokens"),
    ("interpret.py", "explainer.params.top_p=0", "explainer.params.top_p"),
])
def test_evaluate_and_interpret_fail_first_in_one_line(tmp_path, script, override, key):
    env = {**os.environ, "SAEFORGE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT / "src")}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, script, f"ckpt={tmp_path}", "logger=none", override], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, env=env)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and key in lines[0], out.stderr[-2000:]
    assert time.perf_counter() - start < 10


def test_tiny_model_trains_on_its_own_default_hookpoint(tmp_path):
    out, _ = train(tmp_path, *SMALL, "trainer.max_steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["hookpoint"] == "layers.2" and metrics["steps"] == 3
    assert (tmp_path / "run" / "sae" / "layers.2" / "cfg.json").is_file()


def test_max_steps_alone_trains_that_many_steps_on_a_user_file(tmp_path):
    path = tmp_path / "my acts-v1.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("activations", data=np.random.default_rng(0).standard_normal((3000, 16)).astype("float32"))
    out, _ = train(tmp_path, f"data.path='{path}'", "data.batch_size=128", "data.shuffle_buffer=512", "data.read_rows=500",
                   "sae.expansion_factor=2", "sae.k=4", "sae.warmup_steps=2", "trainer.max_steps=40",
                   "trainer.enable_progress_bar=false", "checkpoint_every_n_steps=1000")
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 40  # one epoch is < 3000/128 = 23 steps: several epochs
    assert metrics["hookpoint"] == "my_acts-v1"
    assert (tmp_path / "run" / "sae" / "my_acts-v1" / "cfg.json").is_file()
    assert not (tmp_path / "run" / "sae" / "layers.15").exists()


def test_trainer_epochs_and_steps():
    assert trainer_kwargs_from({"max_steps": -1, "max_epochs": None})["max_epochs"] == 1  # default: one pass
    assert trainer_kwargs_from({"max_steps": 3000, "max_epochs": None})["max_epochs"] == -1  # max_steps alone wins
    assert trainer_kwargs_from({"max_steps": 3000, "max_epochs": 4})["max_epochs"] == 4  # both given: Lightning decides
    assert trainer_kwargs_from({"max_epochs": 4})["max_epochs"] == 4


def test_trainer_arguments_match_lightnings_signature():
    import inspect

    import lightning

    assert trainer_arguments() == [p for p in inspect.signature(lightning.Trainer.__init__).parameters if p != "self"]


def test_file_hookpoint_name():
    assert file_hookpoint_name("/data/run 3/acts:final.h5") == "acts_final"
    assert file_hookpoint_name("x/.h5") in ("h5", "activations")


def test_each_model_carries_its_default_hookpoint():
    expected = {"smollm2": "layers.15", "tiny": "layers.2", "llama3_8b": "layers.16", "gemma2_2b": "layers.13"}
    for model, hookpoint in expected.items():
        cfg = compose_config("train", [f"model={model}"])
        assert cfg.data.hookpoint == hookpoint and list(cfg.data.hookpoints) == [hookpoint]
    assert compose_config("train", ["model=tiny", "data.hookpoint=layers.1"]).data.hookpoints == ["layers.1"]


def test_defaults_are_defined_once():
    """Composed YAML = schema defaults + the few overrides the YAML states (the values that ran before)."""
    cfg = compose_config("interpret", ["explainer=vllm"])
    assert cfg.explainer.max_in_flight == 16 and cfg.explainer.timeout_s == 300
    assert compose_config("interpret", ["explainer=openai"]).explainer.max_in_flight == 32
    assert ChatParams().max_tokens == ChatParamsConfig().max_tokens == cfg.explainer.params.max_tokens == 128
    train_cfg = compose_config("train", [])
    assert OmegaConf.to_container(train_cfg.sae) == dataclasses.asdict(SAESettings())
    assert train_cfg.data.exclude_first_tokens == 2 and "exclude_first_tokens" not in compose_config("interpret", []).interpret.maxact
    settings = from_config(InterpretConfig, compose_config("interpret", ["seed=7"]), "")
    assert settings.interpret.maxact.seed == 7 and settings.interpret.score.scorers == ("detection", "fuzz", "embedding")


def test_store_cache_key_unchanged():
    """The same settings give the same activation-store cache key as before the config rework."""
    from saeforge.activations.extract import store_spec

    for overrides, key in [
        (["data.hookpoint=layers.15", "data.n_tokens=250000", "data.batch_size=2048"], "c46e1f6fdea1997f"),
        (["model=tiny", "data.n_tokens=24576", "data.ctx_len=64"], "e3705534100c7901"),
    ]:
        cfg = compose_config("train", overrides)
        assert store_spec(cfg.model, cfg.corpus, cfg.data).cache_key() == key


def test_unknown_keys_name_the_full_key():
    with pytest.raises(ConfigError, match=r"^unknown key data\.batchsize; allowed keys of data: hookpoint, "):
        check_overrides(["+data.batchsize=16"], TrainConfig)
    with pytest.raises(ConfigError, match=r"unknown key interpret\.maxact\.n_exampels"):
        check_overrides(["interpret.maxact.n_exampels=3"], InterpretConfig)
    check_overrides(["model=tiny", "data=lora", "sae.k=3", "hydra.run.dir=x", "trainer.max_steps=3"], TrainConfig)
    with pytest.raises(ConfigError, match="data.batch_size must be >= 1"):
        from_config(DataConfig, {"batch_size": 0}, "data")
    cfg = compose_config("train", ["model=tiny"])
    OmegaConf.set_struct(cfg.data, False)
    cfg.data.batchsize = 1  # what `+data.batchsize=1` gives a pipeline called without the entry script
    with pytest.raises(ConfigError, match="unknown key data.batchsize"):
        from_config(TrainConfig, cfg, "")


def test_hub_model_defaults_to_its_middle_layer_read_from_its_config(tmp_path):
    """model=hub without a hookpoint: layers.<num_hidden_layers // 2>, from AutoConfig (no weights)."""
    from transformers import LlamaConfig

    from saeforge.pipelines.validate import validate_train

    LlamaConfig(num_hidden_layers=6, hidden_size=32, num_attention_heads=4, intermediate_size=64).save_pretrained(tmp_path)
    base = ["model=hub", f"model.name={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}", "sae.k=8"]
    plan = validate_train(compose_config("train", base))
    assert plan.hookpoint == "layers.3" and plan.d_in == 32
    assert validate_train(compose_config("train", [*base, "data.hookpoint=layers.5"])).hookpoint == "layers.5"
    with pytest.raises(ConfigError, match="data.hookpoint=layers.6"):
        validate_train(compose_config("train", [*base, "data.hookpoint=layers.6"]))
