"""One process per run directory (issue 21, item 2): train, evaluate and interpret refuse a run another process
holds, naming it; run.wait=true waits; a killed holder's lock is taken over. Real entry scripts, tiny model."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from saeforge.pipelines.run import RUN_LOCK
from saeforge.runlock import read_holder
from tests.faults.entry import HP, ROOT, env, interpret_args, run, train_args


def wait_until(condition, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the holder ended early (exit {proc.returncode})"
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_second_process_on_a_run_fails_at_once_naming_the_holder_and_wait_takes_over(tmp_path):
    R = tmp_path / "R"
    # a long run, killed at the end: it holds R for as long as the checks take
    holder = subprocess.Popen([sys.executable, *train_args(tmp_path, "R", "trainer.max_steps=1000000")], cwd=ROOT,
                              env=env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    waiter = None
    try:
        wait_until(lambda: (R / "sae" / HP / "cfg.json").is_file(), holder)  # trained and exported a first checkpoint
        holder.send_signal(signal.SIGSTOP)  # it keeps the lock without taking the CPU the other processes need
        info = read_holder(R / RUN_LOCK)
        assert info is not None and info.pid == holder.pid and info.host == socket.gethostname()

        for args in (train_args(tmp_path, "R"), interpret_args(tmp_path, "R", "interpret.stages=[maxact]"),
                     ["evaluate.py", f"ckpt={R}", "logger=none", "evaluate.n_tokens=512"]):
            started = time.time()
            refused = run(args, tmp_path, expect=2)
            lines = refused.stderr.strip().splitlines()
            assert len(lines) == 1, refused.stderr[-3000:]
            assert f"pid {holder.pid}" in lines[0] and socket.gethostname() in lines[0] and "train.py" in lines[0], lines[0]
            assert "run.wait=true" in lines[0]
            assert time.time() - started < 60
        assert not (R / "interpret").exists() and not (R / "eval").exists()

        waiter = subprocess.Popen([sys.executable, *train_args(tmp_path, "R", "trainer.max_steps=8", "run.wait=true")],
                                  cwd=ROOT, env=env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines: list[str] = []  # our log lines go to stdout (Hydra's console handler), Lightning's to stderr
        reader = threading.Thread(target=lambda: lines.extend(iter(waiter.stdout.readline, "")), daemon=True)
        reader.start()
        wait_until(lambda: any("waiting for" in line for line in lines), waiter)
        assert waiter.poll() is None, "run.wait=true did not wait"
        assert any(f"pid {holder.pid}" in line for line in lines if "waiting for" in line)
    finally:
        holder.kill()
        holder.wait()
    assert waiter is not None
    waiter.wait(timeout=300)
    reader.join(timeout=10)
    err = "".join(lines)
    assert waiter.returncode == 0, err[-3000:]
    assert "died without releasing it" in err  # the killed holder's lock was taken over, with a warning
    assert "resuming from" in err
    assert read_holder(R / RUN_LOCK) is None, "the lock still names a holder after the run ended"
