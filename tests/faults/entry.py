"""Helpers for fault tests that drive the real entry scripts (train.py, interpret.py) as subprocesses:
tiny-model settings, running to completion, killing at a progress point, content hashes of outputs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HP = "layers.2"

TIMING_KEYS = {"finished", "started", "timestamp", "time", "seconds", "elapsed_s", "duration_s", "wall_s",
               "tokens_per_s", "created", "updated"}
"""JSON keys dropped before comparing outputs: timing, not content."""
EXCLUDED_PARTS = {"wandb", ".hydra", "lightning_logs", "logs"}
EXCLUDED_SUFFIXES = (".log",)


def env(tmp: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "SAEFORGE_CACHE": str(tmp / "cache"),
            "PYTHONPATH": str(ROOT / "src"), **extra}


def train_args(tmp: Path, run: str = "run", *extra: str) -> list[str]:
    return ["train.py", "model=tiny", "logger=none", f"run.dir={tmp / run}", f"data.cache_dir={tmp / 'cache'}",
            f"data.hookpoint={HP}", "data.n_tokens=8192", "data.ctx_len=64", "data.shard_tokens=1024",
            "data.extract_batch_size=8", "data.batch_size=256", "data.shuffle_buffer=1024", "data.read_rows=512",
            "sae.expansion_factor=2", "sae.k=4", "sae.warmup_steps=2", "checkpoint_every_n_steps=4",
            "trainer.enable_progress_bar=false", *extra]


def interpret_args(tmp: Path, run: str = "run", *extra: str) -> list[str]:
    return ["interpret.py", f"ckpt={tmp / run}", "logger=none", "interpret.max_latents=4", "interpret.n_tokens=2048",
            "interpret.steering.max_new_tokens=4", "interpret.steering.n_prompts=2", *extra]


def run(args: list[str], tmp: Path, expect: int | None = 0, timeout: int = 600, **extra_env: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env(tmp, **extra_env))
    if expect is not None:
        assert done.returncode == expect, (done.stdout + done.stderr)[-4000:]
    return done


def run_and_kill(args: list[str], tmp: Path, reached: Callable[[], bool], timeout: float = 300, **extra_env: str) -> bool:
    """Start the entry script; SIGKILL it as soon as `reached()` holds (polled every 10 ms).
    Returns whether it was killed (False: it finished first)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(tmp, **extra_env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while proc.poll() is None and time.time() < deadline:
            if reached():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return False


def count_files(root: Path, pattern: str) -> Callable[[], int]:
    def count() -> int:
        return sum(1 for p in root.glob(pattern) if p.is_file() and not p.name.startswith("."))
    return count


def _normalise(node):
    if isinstance(node, dict):
        return {k: _normalise(v) for k, v in node.items() if k not in TIMING_KEYS}
    if isinstance(node, list):
        return [_normalise(v) for v in node]
    return node


def content_hashes(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every output file under `root` (JSON with timing keys dropped), by relative path;
    logs, W&B and Hydra dirs, temp files and `exclude`d relative paths left out."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS & set(rel.parts) or path.suffix in EXCLUDED_SUFFIXES or str(rel) in exclude:
            continue
        data = path.read_bytes()
        if path.suffix == ".json":
            try:
                data = json.dumps(_normalise(json.loads(data)), sort_keys=True).encode()
            except ValueError:
                pass
        out[str(rel)] = hashlib.sha256(data).hexdigest()
    return out


def diff(ref: dict[str, str], got: dict[str, str]) -> list[str]:
    return sorted(k for k in ref.keys() | got.keys() if ref.get(k) != got.get(k))
