"""A full disk at each write site of the real entry scripts (issue 21, item 5), injected at the write
layer ($SAEFORGE_FAULT_ENOSPC, see saeforge.atomic): one line on stderr naming the file and the free
bytes, exit status 4, no half-written file under a final name, and a rerun with space resumes.
Also a truncated last.ckpt (item 4): the rerun warns once and resumes from the newest readable step checkpoint.

One training run is shared (subprocesses are the cost): its extraction, then its training hit the full
disk; its last.ckpt is then truncated and the third start completes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from saeforge.atomic import FAULT_ENOSPC
from saeforge.pipelines.run import EXIT_DISK_FULL
from tests.discover.tiny_set import write_concepts, write_saes
from tests.faults.entry import HP, interpret_args, run, train_args

pytestmark = pytest.mark.slow
FREE = re.compile(r"^error: no space left on device writing (?P<path>\S+) \((needs ~\d+ bytes, )?\d+ bytes free on \S+\)$")


def full_disk(args: list[str], tmp: Path, pattern: str) -> Path:
    """Run with writes matching `pattern` failing with ENOSPC: exit 4, the last stderr line names the file
    and the free bytes, no temp file is left beside it and it does not exist; returns the file's path."""
    done = run(args, tmp, expect=EXIT_DISK_FULL, **{FAULT_ENOSPC: pattern})
    last = done.stderr.strip().splitlines()[-1]
    match = FREE.match(last)
    assert match, done.stderr[-3000:]
    path = Path(match["path"])
    assert path.match(pattern) and not path.exists(), last
    assert not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")], "a temp file was left"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return path


def stamps(files: list[Path]) -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in files}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One run (12 steps, a checkpoint every 4) started three times: its extraction fails at shard 3,
    then its training at the step-12 checkpoint; then, last.ckpt truncated, it completes.
    Returns the folder and the third start's output."""
    tmp = tmp_path_factory.mktemp("disk")
    args = train_args(tmp, "run", "trainer.max_steps=12")
    shard = full_disk(args, tmp, "*/shard-00003.safetensors")
    finished = sorted(shard.parent.glob("shard-*.safetensors"))
    assert [p.name for p in finished] == [f"shard-0000{i}.safetensors" for i in range(3)]
    before = stamps(finished)

    full_disk(args, tmp, "*step=12.ckpt")
    assert stamps(finished) == before, "the rerun rewrote shards that were finished"
    assert len(list(shard.parent.glob("shard-*.safetensors"))) == 8
    checkpoints = tmp / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 8
    assert not (tmp / "run" / "metrics.json").exists()

    last = checkpoints / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # as a non-atomic writer killed mid-save leaves it
    done = run(args, tmp)
    return tmp, done.stdout + done.stderr


def test_full_disk_in_extraction_and_checkpointing_then_the_rerun_completes(trained: tuple[Path, str]) -> None:
    tmp, _ = trained
    checkpoints = tmp / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == \
        ["epoch=0-step=12.ckpt", "epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt", "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True, mmap=True)["global_step"] == 12
    assert (tmp / "run" / "metrics.json").is_file()


def test_truncated_last_ckpt_resumes_from_the_newest_readable_step_checkpoint(trained: tuple[Path, str]) -> None:
    tmp, output = trained
    checkpoints = tmp / "run" / "checkpoints"
    lines = output.splitlines()
    naming = [line for line in lines if "last.ckpt" in line]
    assert len(naming) == 1 and "WARNING" in naming[0] and "truncated or corrupt" in naming[0], naming
    assert any("WARNING" in line and "resuming from" in line and "epoch=0-step=8.ckpt" in line for line in lines), output
    assert f"Restored all states from the checkpoint at {checkpoints / 'epoch=0-step=8.ckpt'}" in output


def test_full_disk_writing_an_interpretation_file_then_rerun_completes(trained: tuple[Path, str]) -> None:
    tmp, _ = trained
    args = interpret_args(tmp, "run", "interpret.stages=[maxact]")
    maxact = full_disk(args, tmp, "*/maxact.json")
    assert maxact == tmp / "run" / "interpret" / HP / "maxact.json"
    run(args, tmp)
    assert maxact.is_file()


def test_full_disk_writing_a_discovery_file_then_rerun_resumes(tmp_path: Path) -> None:
    saes = write_saes(tmp_path, [(1, 8), (2, 8)], d_sae=64)
    concepts = write_concepts(tmp_path / "concepts.csv", n=8)
    args = ["discover.py", "model=tiny", "logger=none", f"concepts={concepts}", f"saes={saes}",
            f"run.dir={tmp_path / 'run'}", "discover.stage=extract"]
    failed = full_disk(args, tmp_path, "*/layer_2_l0_8_activations.npz")
    first = failed.parent / "layer_1_l0_8_activations.npz"
    before = stamps([first])
    done = run(args, tmp_path)
    assert stamps([first]) == before and failed.is_file(), done.stdout[-2000:]
