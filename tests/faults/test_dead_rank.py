"""kill -9 of one DDP rank (2 CPU processes, gloo) in the middle of training: the surviving rank ends within
seconds (never the collective timeout) with one line naming the dead rank, and a rerun resumes from the
last checkpoint to the same SAE as an uninterrupted 2-rank run (issue 21)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.faults.entry import ROOT, content_hashes, diff, env, run, train_args

DDP = ["trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy=ddp", "data.n_tokens=4096", "data.batch_size=64",
       "checkpoint_every_n_steps=8"]


def children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def kill_rank_one_after_a_checkpoint(args: list[str], tmp: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Start the 2-rank run; once a checkpoint exists, SIGKILL rank 1 (the launcher's child, LOCAL_RANK=1).
    Returns the launcher's (rank 0's) result and the seconds it took to end after the kill."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env(tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((tmp / "run" / "checkpoints").glob("epoch=*.ckpt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
            time.sleep(0.01)
        (rank1,) = children(proc.pid)
        assert b"LOCAL_RANK=1\0" in Path(f"/proc/{rank1}/environ").read_bytes()
        killed = time.monotonic()
        os.kill(rank1, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(args, proc.returncode, out, err), time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_a_killed_rank_ends_the_other_in_seconds_and_the_rerun_resumes_identical(tmp_path):
    args = train_args(tmp_path, "run", *DDP)
    run(args, tmp_path)
    reference = content_hashes(tmp_path / "run")
    (tmp_path / "run").rename(tmp_path / "ref-run")

    done, seconds = kill_rank_one_after_a_checkpoint(args, tmp_path)
    assert done.returncode != 0 and seconds < 60, (done.returncode, seconds)
    named = [line for line in done.stderr.splitlines() if "rank 1" in line and "died" in line]
    assert named == [f"error: DDP rank 1 (pid {named[0].split('pid ')[1].split(')')[0]}) died; stopping"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not (tmp_path / "run" / "metrics.json").exists()

    run(args, tmp_path)
    got = content_hashes(tmp_path / "run")
    assert not diff(reference, got), diff(reference, got)


def test_ddp_timeout_and_nccl_error_handling_are_set(monkeypatch):
    import lightning as L

    from saeforge.pipelines.train import set_ddp_timeout

    monkeypatch.delenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", raising=False)
    for strategy in ("ddp", "auto"):
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, logger=False, enable_checkpointing=False)
        set_ddp_timeout(trainer, 60.0)
        assert trainer.strategy._timeout.total_seconds() == 60.0
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1"
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "3")
    set_ddp_timeout(trainer, 60.0)
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"  # the user's value is kept
