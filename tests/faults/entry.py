"""Helpers for fault tests that drive the real entry scripts (train.py, interpret.py) as subprocesses:
tiny-model settings, running to completion, killing at a progress point, content hashes of outputs."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HP = "layers.2"

TIMING_KEYS = {"finished", "started", "timestamp", "time", "seconds", "elapsed_s", "duration_s", "wall_s",
               "tokens_per_s", "created", "updated"}
"""JSON keys dropped before comparing outputs: timing, not content."""
# "datasets": the HF `datasets` Arrow cache of the corpus under the cache root — the library's files
# (lock files, fingerprints), not our outputs; the stores built from it are compared.
EXCLUDED_PARTS = {"wandb", ".hydra", "lightning_logs", "logs", "datasets"}
EXCLUDED_SUFFIXES = (".log", ".lock")


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
                          env=env(tmp, **extra_env), check=False)
    if expect is not None:
        assert done.returncode == expect, (done.stdout + done.stderr)[-4000:]
    return done


def run_and_kill(args: list[str], tmp: Path, reached: Callable[[str], bool], timeout: float = 300, **extra_env: str) -> bool:
    """Start the entry script; SIGKILL it as soon as `reached(stderr so far)` holds (polled every 10 ms).
    Returns whether it was killed (False: it finished first)."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(tmp, **extra_env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for chunk in iter(lambda: proc.stderr.read1(4096), b""):
            err.append(chunk.decode(errors="replace"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    killed = False
    try:
        while proc.poll() is None and time.time() < deadline:
            if reached("".join(err)):
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None and not killed:
            proc.kill()
        proc.wait()
        reader.join(timeout=10)
    return killed


def at_least(root: Path, pattern: str, n: int) -> Callable[[str], bool]:
    """A kill point: `n` finished files matching `pattern` under `root` (temp names left out)."""
    def reached(_stderr: str) -> bool:
        return sum(1 for p in root.glob(pattern) if p.is_file() and not p.name.startswith(".")) >= n
    return reached


def printed(text: str) -> Callable[[str], bool]:
    """A kill point: `text` has appeared on stderr (e.g. a stage's progress bar)."""
    return lambda stderr: text in stderr


def _normalise(node):
    if isinstance(node, str) and ISO_TIME.match(node):
        return "<time>"
    if isinstance(node, dict):
        return {k: _normalise(v) for k, v in node.items() if k not in TIMING_KEYS}
    if isinstance(node, list):
        return [_normalise(v) for v in node]
    return node


ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d+)?)?(Z|[+-]\d\d:?\d\d)?$")


def _canonical(node) -> bytes:
    """Bytes that identify a loaded checkpoint's content: every tensor's dtype, shape and data, every
    other value's repr, dicts in key order (pickle bytes differ between equal checkpoints)."""
    import torch

    if torch.is_tensor(node):
        return f"{node.dtype}{tuple(node.shape)}".encode() + node.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    if isinstance(node, dict):
        return b"{" + b",".join(repr(k).encode() + b":" + _canonical(node[k]) for k in sorted(node, key=repr)) + b"}"
    if isinstance(node, (list, tuple)):
        return b"[" + b",".join(_canonical(v) for v in node) + b"]"
    return repr(node).encode()


def content_hashes(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every output file under `root` (JSON with timing keys and timestamps dropped, Lightning
    checkpoints by their loaded content), by relative path;
    logs, W&B and Hydra dirs, temp files and `exclude`d relative paths left out."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root)
        if EXCLUDED_PARTS & set(rel.parts) or path.suffix in EXCLUDED_SUFFIXES or str(rel) in exclude:
            continue
        data = path.read_bytes()
        if path.suffix == ".ckpt":
            import torch

            data = _canonical(torch.load(path, map_location="cpu", weights_only=False))
        elif path.suffix == ".json":
            try:
                data = json.dumps(_normalise(json.loads(data)), sort_keys=True).encode()
            except ValueError:
                pass
        out[str(rel)] = hashlib.sha256(data).hexdigest()
    return out


def diff(ref: dict[str, str], got: dict[str, str]) -> list[str]:
    return sorted(k for k in ref.keys() | got.keys() if ref.get(k) != got.get(k))
