"""Two processes that need the same activation store: one builds it, the other waits, shows the
builder's progress and reuses the store; if the builder is killed -9, the waiter takes over and resumes
from the finished shards, ending with the bytes of the store the first pair's builder wrote alone (issue 21).

The overlap is made certain with SIGSTOP/SIGCONT, not timing: the builder is paused while it holds the
lock until the second process reports that it is waiting for it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from saeforge.activations.extract import store_lock, store_root
from saeforge.runlock import read_holder
from tests.conftest import compose_config
from tests.faults.entry import HP, ROOT, at_least, content_hashes, diff, env, train_args

pytestmark = pytest.mark.slow
N_SHARDS = 64


def extract_args(tmp: Path, run: str = "run") -> list[str]:
    """extract_only on the tiny model, 64 shards of 512 tokens (so a kill lands mid-way); each process has its
    own `run` directory (two jobs of a sweep), the store under `tmp` is shared."""
    base = [a for a in train_args(tmp, run) if not a.startswith(("data.n_tokens=", "data.shard_tokens="))]
    return [*base, "data.n_tokens=32768", f"data.shard_tokens={32768 // N_SHARDS}", "extract_only=true"]


class Started:
    """An entry script running in the background, its output (log lines on stdout, bars on stderr) collected."""

    def __init__(self, args: list[str], tmp: Path):
        self.proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(tmp), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.chunks: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read1(4096), b""):
            self.chunks.append(chunk.decode(errors="replace"))

    @property
    def output(self) -> str:
        return "".join(self.chunks)

    def wait_for(self, reached: Callable[[], bool], what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not reached():
            assert self.proc.poll() is None or reached(), f"exited ({self.proc.returncode}) before {what}:\n{self.output[-3000:]}"
            assert time.time() < deadline, f"timed out waiting for {what}:\n{self.output[-3000:]}"
            time.sleep(0.002)

    def finish(self, timeout: float = 300) -> str:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(timeout=10)
        return self.output


def store_of(tmp: Path) -> Path:
    return next(p for p in (tmp / "cache" / "activations").iterdir() if p.is_dir())


def lock_of(tmp: Path) -> Path:
    """The store lock for `extract_args(tmp)` (before the store exists)."""
    cfg = compose_config("train", extract_args(tmp)[1:])
    return store_lock(store_root(cfg.model, cfg.corpus, cfg.data))


def start_then_pause_builder(tmp: Path, lock: Path, reached: Callable[[], bool]) -> Started:
    """Start a builder and SIGSTOP it once `reached()`, checking that it holds the store lock."""
    builder = Started(extract_args(tmp), tmp)
    builder.wait_for(reached, "the builder's progress point")
    builder.proc.send_signal(signal.SIGSTOP)
    holder = read_holder(lock)
    assert holder is not None and holder.pid == builder.proc.pid and "extract_only=true" in holder.command
    return builder


@dataclass
class Pair:
    """Two extractions of one store started together: the output of each, the store's content hashes."""

    builder_pid: int
    built: str
    waited: str
    store: dict[str, str]
    lock: Path


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> Pair:
    """The builder is paused once it holds the lock, until the second process says it waits for it."""
    tmp = tmp_path_factory.mktemp("pair")
    lock = lock_of(tmp)
    builder = start_then_pause_builder(tmp, lock, lambda: read_holder(lock) is not None)
    waiter = Started(extract_args(tmp, "other-run"), tmp)
    try:
        waiter.wait_for(lambda: f"is being built by pid {builder.proc.pid}" in waiter.output, "the waiting line")
    finally:
        builder.proc.send_signal(signal.SIGCONT)
    built, waited = builder.finish(), waiter.finish()
    assert builder.proc.returncode == 0, built[-3000:]
    assert waiter.proc.returncode == 0, waited[-3000:]
    return Pair(builder.proc.pid, built, waited, content_hashes(store_of(tmp)), lock)


def test_a_second_process_waits_for_the_builder_then_reuses_its_store(pair):
    assert f"extracted {N_SHARDS * 512} tokens" in pair.built and "reusing activation store" not in pair.built
    assert "extracted" not in pair.waited and "reusing activation store" in pair.waited
    assert pair.waited.index("is being built by") < pair.waited.index("reusing activation store")
    assert "waiting for builder pid" in pair.waited  # the progress line
    assert pair.lock.read_bytes() == b""  # released
    assert len([k for k in pair.store if k.startswith(f"{HP}/shard-")]) == N_SHARDS


def test_the_waiter_takes_over_a_killed_builder_and_resumes_its_shards(tmp_path, pair):
    """The reference: the pair's store, which its builder wrote alone (the test above checks that)."""
    lock = lock_of(tmp_path)
    shards = at_least(tmp_path / "cache" / "activations", f"*/{HP}/shard-*.safetensors", 2)
    builder = start_then_pause_builder(tmp_path, lock, lambda: shards(""))
    waiter = Started(extract_args(tmp_path, "other-run"), tmp_path)
    try:
        waiter.wait_for(lambda: f"is being built by pid {builder.proc.pid}" in waiter.output, "the waiting line")
    finally:
        builder.proc.send_signal(signal.SIGKILL)
        builder.finish()
    waited = waiter.finish()
    assert waiter.proc.returncode == 0, waited[-3000:]
    taken = [line for line in waited.splitlines() if "taking over" in line]
    assert len(taken) == 1 and "WARNING" in taken[0] and f"pid {builder.proc.pid}" in taken[0], waited[-3000:]
    resumed = [line for line in waited.splitlines() if "resuming" in line]
    assert resumed, waited[-3000:]
    kept = int(resumed[0].split(": ")[-1].split(" of ")[0])
    assert 2 <= kept < N_SHARDS, resumed[0]  # the dead builder's finished shards were kept
    assert f"extracted {(N_SHARDS - kept) * 512} tokens" in waited
    assert not diff(pair.store, content_hashes(store_of(tmp_path)))
    assert lock.read_bytes() == b""
