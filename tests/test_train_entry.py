"""train.py end to end through the real entry script (subprocess + Hydra overrides)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def train_cmd(tmp: Path, run: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "train.py"), "model=tiny", "logger=none", f"run.dir={tmp / run}",
        f"data.cache_dir={tmp / 'cache'}", "data.hookpoint=layers.2", "data.n_tokens=24576", "data.ctx_len=64",
        "data.batch_size=256", "data.shuffle_buffer=2048", "data.read_rows=1024", "sae.expansion_factor=4",
        "sae.k=8", "sae.warmup_steps=5", "checkpoint_every_n_steps=10", "trainer.enable_progress_bar=false", *extra,
    ]


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, **kw)


@pytest.mark.slow
def test_extract_only_then_killed_run_resumes_bit_identical(tmp_path):
    done = run(train_cmd(tmp_path, "x", "extract_only=true"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "activation store ready" in done.stdout
    assert not (tmp_path / "x" / "checkpoints").exists()

    ref = run(train_cmd(tmp_path, "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "reusing activation store" in ref.stdout + ref.stderr
    metrics = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    assert 0 < metrics["fvu"] < 1 and abs(metrics["l0"] - 8) <= 0.16 and metrics["steps"] > 40

    proc = subprocess.Popen(train_cmd(tmp_path, "killed"), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    sizes = [-1, -2]
    while time.time() < deadline and proc.poll() is None:  # kill once the first checkpoint is written whole
        sizes = [sizes[-1], last.stat().st_size if last.exists() else -1]
        if sizes[0] == sizes[1] > 0:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last.exists() and not (tmp_path / "killed" / "metrics.json").exists(), "the run finished before it was killed"
    resumed = run(train_cmd(tmp_path, "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    a = load_file(str(tmp_path / "ref" / "sae" / "layers.2" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "killed" / "sae" / "layers.2" / "sae_weights.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_ddp_two_cpu_processes_train_identical_ranks(tmp_path):
    out = run(train_cmd(tmp_path, "ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp"))
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "GLOBAL_RANK: 1" in text or "global_rank=1" in text.lower() or "Initializing distributed: GLOBAL_RANK: 1" in text
    assert "ranks hold identical SAE state" in text
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert 0 < metrics["fvu"] < 1


def test_bad_overrides_fail_before_training(tmp_path):
    out = run(train_cmd(tmp_path, "bad", "sae.k=300"))
    assert out.returncode != 0 and "must be positive and smaller than d_sae=256" in out.stderr


@pytest.mark.slow
def test_wandb_offline_run_holds_metrics_config_and_no_secrets(tmp_path):
    from saeforge.pipelines.wandb_records import read_run

    cmd = [c for c in train_cmd(tmp_path, "wb") if c != "logger=none"] + ["logger=wandb", "trainer.log_every_n_steps=5"]
    env_secret = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "OPENROUTER_API_KEY": "sk-SECRET-123"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **env_secret})
    assert out.returncode == 0, out.stderr[-3000:]
    logged = read_run(tmp_path / "wb")
    keys = set().union(*logged["history"])
    assert {"train/loss", "train/fvu", "train/l0", "train/l0_inference", "train/dead_frac", "train/auxk_loss", "train/lr",
            "train/tokens_per_s"} <= keys
    assert logged["summary"]["final/l0"] == pytest.approx(8, rel=0.02)
    assert logged["config"]["sae"]["k"] == 8, logged["config"]["sae"]
    raw = b"".join(p.read_bytes() for p in (tmp_path / "wb").rglob("*") if p.is_file())
    assert b"sk-SECRET-123" not in raw


def test_strip_secrets_redacts_secret_looking_keys():
    from omegaconf import OmegaConf

    from saeforge.pipelines.run import strip_secrets

    cfg = OmegaConf.create({"explainer": {"api_key": "sk-1", "api_key_env": "OPENAI_API_KEY", "auth_token": "t"}, "k": 3})
    assert strip_secrets(cfg) == {"explainer": {"api_key": "<redacted>", "api_key_env": "OPENAI_API_KEY", "auth_token": "<redacted>"}, "k": 3}
