"""Which checkpoint a training run resumes from (issue 21, item 4): `validate.resume_checkpoint`, the one
choice for validation and training. An unreadable last.ckpt (truncated, empty, not a checkpoint) gets a
warning naming it and the newest readable step checkpoint is used; none readable: one ConfigError line.
The end-to-end case (a real run's truncated last.ckpt) is in test_disk_full.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from saeforge.config import ConfigError
from saeforge.pipelines.validate import resume_checkpoint


def cfg(run: Path, ckpt_path: str | None = None):
    return OmegaConf.create({"ckpt_path": ckpt_path, "extract_only": False, "run": {"dir": str(run)}})


def save(path: Path, step: int, d_in: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"sae.W_enc": torch.zeros(d_in, 16)}}, path)
    return path


def truncate(path: Path) -> Path:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_no_checkpoint_is_a_fresh_run_and_a_readable_last_ckpt_is_resumed(tmp_path, caplog):
    assert resume_checkpoint(cfg(tmp_path), 8) is None
    with pytest.raises(ConfigError, match="ckpt_path=last but .*last.ckpt does not exist"):
        resume_checkpoint(cfg(tmp_path, "last"), 8)
    folder = tmp_path / "checkpoints"
    save(folder / "epoch=0-step=4.ckpt", 4)
    last = save(folder / "last.ckpt", 4)
    with caplog.at_level(logging.INFO):
        assert resume_checkpoint(cfg(tmp_path), 8) == last
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    with pytest.raises(ConfigError, match=r"checkpoint .*last.ckpt has d_in=8 but the data has d_in=4"):
        resume_checkpoint(cfg(tmp_path), 4)


def test_unreadable_last_ckpt_falls_back_to_the_newest_readable_step_checkpoint(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    for step in (4, 8, 12, 40):  # by step, not by name: 40 sorts before 8
        save(folder / f"epoch=0-step={step}.ckpt", step)
    truncate(folder / "epoch=0-step=40.ckpt")
    (folder / "epoch=0-step=12.ckpt").write_bytes(b"")
    truncate(save(folder / "last.ckpt", 40))
    with caplog.at_level(logging.INFO):
        assert resume_checkpoint(cfg(tmp_path), 8) == folder / "epoch=0-step=8.ckpt"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 4, warnings
    assert [w.split()[1] for w in warnings[:3]] == [str(folder / n) for n in ("last.ckpt", "epoch=0-step=40.ckpt", "epoch=0-step=12.ckpt")]
    assert "truncated or corrupt (PytorchStreamReader failed reading zip archive" in warnings[0]
    assert warnings[2].endswith("is empty: skipping it")
    assert warnings[3].startswith(f"resuming from {folder / 'epoch=0-step=8.ckpt'} instead")


def test_no_readable_checkpoint_refuses_in_one_line(tmp_path):
    folder = tmp_path / "checkpoints"
    truncate(save(folder / "last.ckpt", 4))
    truncate(save(folder / "epoch=0-step=4.ckpt", 4))
    (folder / "notes.ckpt").write_text("not a checkpoint")
    with pytest.raises(ConfigError) as caught:
        resume_checkpoint(cfg(tmp_path), 8)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"no readable checkpoint in {folder} (last.ckpt, ")
    assert "epoch=0-step=4.ckpt" in message and "notes.ckpt" in message and "new run.dir" in message


def test_an_explicit_ckpt_path_must_be_readable(tmp_path):
    bad = truncate(save(tmp_path / "x.ckpt", 4))
    with pytest.raises(ConfigError, match=r"ckpt_path='.*x.ckpt' is unreadable: truncated or corrupt"):
        resume_checkpoint(cfg(tmp_path, str(bad)), 8)
    with pytest.raises(ConfigError, match="does not exist"):
        resume_checkpoint(cfg(tmp_path, str(tmp_path / "missing.ckpt")), 8)
    torch.save({"weights": torch.zeros(2)}, bad)
    with pytest.raises(ConfigError, match="not a Lightning checkpoint"):
        resume_checkpoint(cfg(tmp_path, str(bad)), 8)
    good = save(tmp_path / "y.ckpt", 4)
    assert resume_checkpoint(cfg(tmp_path, str(good)), 8) == good
