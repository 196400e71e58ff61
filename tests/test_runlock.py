"""runlock: one holder at a time across processes, named in the error; a dead holder is taken over;
wait mode returns once the holder ends; a forked child does not keep its parent's lock."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from saeforge.runlock import LockedError, hold, read_holder

SRC = str(Path(__file__).resolve().parents[1] / "src")
HOLDER = """
import os, sys, time
from saeforge.runlock import hold
with hold(sys.argv[1], "building the marker store") as lock:
    lock.note(done=1, total=3)
    if sys.argv[2] == "fork":
        ready, tell = os.pipe()
        child = os.fork()
        if child == 0:  # the fork hooks (which close the lock's copy) have run once os.fork returns here
            os.write(tell, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(ready, 1)  # the child runs: report it only then
        print(child, flush=True)
    print("held", flush=True)
    sys.stdin.readline()  # hold until the test closes stdin (or kills us)
"""


def start_holder(path: Path, mode: str = "plain") -> tuple[subprocess.Popen, list[str]]:
    """A process holding the lock on `path` (argv carries a marker to find in messages); returns it and its stdout lines."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), mode, "--marker-7f3"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SRC})
    assert proc.stdout is not None
    lines = []
    while not lines or lines[-1] != "held":
        line = proc.stdout.readline().strip()
        assert line, f"the holder exited with {proc.wait()}"
        lines.append(line)
    return proc, lines


def test_second_holder_in_another_process_fails_naming_it(tmp_path):
    path = tmp_path / "x.lock"
    proc, _ = start_holder(path)
    try:
        with pytest.raises(LockedError) as err, hold(path, "a second builder"):
            pass
        message = str(err.value)
        assert f"pid {proc.pid}" in message and socket.gethostname() in message and "--marker-7f3" in message
        assert "building the marker store" in message and str(path) in message
        assert err.value.holder is not None and err.value.holder.progress == {"done": 1, "total": 3}
    finally:
        proc.communicate("")
    assert proc.returncode == 0
    assert read_holder(path) is None  # released: the info is cleared, no takeover warning next
    with hold(path, "after") as lock:
        assert lock.took_over is None


def test_dead_holder_is_taken_over_with_a_warning(tmp_path, caplog):
    path = tmp_path / "x.lock"
    proc, _ = start_holder(path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert read_holder(path).pid == proc.pid  # its info is still there, its lock is gone
    with caplog.at_level(logging.WARNING, logger="saeforge.runlock"), hold(path, "the next builder") as lock:
        assert lock.took_over is not None and lock.took_over.pid == proc.pid
        assert read_holder(path).pid == os.getpid() and read_holder(path).purpose == "the next builder"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"pid {proc.pid}" in warnings[0] and "--marker-7f3" in warnings[0]
    assert "died" in warnings[0]
    assert read_holder(path) is None


def test_wait_mode_returns_once_the_holder_exits(tmp_path, caplog):
    path = tmp_path / "x.lock"
    proc, _ = start_holder(path)
    seen = []

    def on_wait(holder):
        seen.append(holder)
        if len(seen) == 3:
            proc.stdin.close()  # the holder finishes its work and releases

    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="saeforge.runlock"), \
            hold(path, "waiter", wait=True, on_wait=on_wait, poll=0.05) as lock:
        assert proc.wait(timeout=10) == 0
        assert lock.took_over is None
    assert time.monotonic() - start < 10
    assert len(seen) >= 3 and seen[0].pid == proc.pid and seen[0].progress == {"done": 1, "total": 3}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_forked_child_does_not_keep_the_lock_of_its_killed_parent(tmp_path):
    path = tmp_path / "x.lock"
    proc, lines = start_holder(path, "fork")
    child = int(lines[0])
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.kill(child, 0)  # the forked child still runs...
        with hold(path, "next") as lock:  # ...and the lock is free
            assert lock.took_over.pid == proc.pid
    finally:
        os.kill(child, signal.SIGKILL)


def test_this_process_holding_it_already_fails_at_once_even_when_waiting(tmp_path):
    path = tmp_path / "x.lock"
    with hold(path, "outer") as lock:
        lock.note(step=5)
        assert read_holder(path).progress == {"step": 5}
        with pytest.raises(LockedError, match=f"pid {os.getpid()}.*outer"), hold(path, "inner", wait=True):
            pass
    assert read_holder(path) is None and path.is_file()
