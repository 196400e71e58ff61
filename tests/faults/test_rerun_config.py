"""A failed training rerun must not change the run it was pointed at (issue 11, item 1)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from tests.faults.entry import HP, interpret_args, run, train_args


@pytest.mark.slow
def test_failed_rerun_with_other_data_leaves_run_and_its_interpretation_unchanged(tmp_path):
    run(train_args(tmp_path, "R", "trainer.max_steps=8"), tmp_path)
    recorded = tmp_path / "R" / "run_config.yaml"
    assert recorded.is_file() and not (tmp_path / "R" / ".hydra").exists()
    before = recorded.read_bytes()
    stages = ["interpret.stages=[maxact,steering]"]
    run(interpret_args(tmp_path, "R", *stages), tmp_path)
    out = tmp_path / "R" / "interpret" / HP
    maxact = (out / "maxact.json").read_bytes()
    steering = {p.name: p.read_bytes() for p in (out / "steering").glob("*.json")}
    assert steering

    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_dataset("activations", data=np.random.default_rng(0).standard_normal((2000, 32)).astype("float32"))
    failed = run(train_args(tmp_path, "R", f"data.path={other}", "trainer.max_steps=8"), tmp_path, expect=2)
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "has d_in=64 but the data has d_in=32" in lines[0], failed.stderr[-2000:]
    assert recorded.read_bytes() == before, "the failed rerun rewrote the run's recorded config"
    assert not (tmp_path / "R" / ".hydra").exists()

    (tmp_path / "R" / "interpret").rename(tmp_path / "first-interpret")
    run(interpret_args(tmp_path, "R", *stages), tmp_path)
    assert (out / "maxact.json").read_bytes() == maxact
    assert {p.name: p.read_bytes() for p in (out / "steering").glob("*.json")} == steering


def test_old_runs_without_run_config_still_resolve(tmp_path):
    """Runs trained before run_config.yaml existed carry only Hydra's .hydra/config.yaml."""
    from omegaconf import OmegaConf

    from saeforge.sae.source import find_run_dir, run_config_path

    run_dir = tmp_path / "old"
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"data": {"hookpoint": HP}}), run_dir / ".hydra" / "config.yaml")
    (run_dir / "sae" / HP).mkdir(parents=True)
    assert find_run_dir(run_dir / "sae" / HP) == run_dir
    assert run_config_path(run_dir) == run_dir / ".hydra" / "config.yaml"
    OmegaConf.save(OmegaConf.create({"data": {"hookpoint": "layers.1"}}), run_dir / "run_config.yaml")
    assert run_config_path(run_dir) == run_dir / "run_config.yaml"
