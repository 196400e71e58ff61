"""A rerun resumes only the run it would have trained: a changed setting is refused, overwrite=[run] starts fresh
(issue 21, item 1). The real train.py on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from saeforge.config.fingerprint import RESUMABLE, fingerprint_changes, training_fingerprint
from tests.faults.entry import HP, content_hashes, run, train_args


def test_fingerprint_takes_what_changes_weights_and_leaves_what_may_change():
    base = {"seed": 0, "model": {"name": "m", "device": "cpu"}, "corpus": {"kind": "gutenberg"},
            "data": {"n_tokens": 10, "path": None, "cache_dir": "/a", "prefetch_batches": 2, "lora": None},
            "sae": {"k": 32.0}, "trainer": {"max_steps": 8, "precision": "32-true", "devices": 1}}
    old = training_fingerprint(base)
    assert old["sae.k"] == 32.0 and old["model.name"] == "m" and old["trainer.precision"] == "32-true"
    assert not {"trainer.max_steps", "data.cache_dir", "data.prefetch_batches", "model.device"} & set(old)
    assert all(key in RESUMABLE for key in ("trainer.max_steps", "data.cache_dir", "model.device"))

    def changed(**groups):
        return fingerprint_changes(old, training_fingerprint({**base, **groups}))

    assert changed(sae={"k": 8.0}) == ["sae.k: 32.0 → 8.0"]
    assert changed(trainer={**base["trainer"], "max_steps": 100, "enable_progress_bar": False}) == []
    assert changed(data={**base["data"], "cache_dir": "/b", "lora": {"adapter": "x"}}) == ["data.lora: None → {'adapter': 'x'}"]
    assert changed(trainer={**base["trainer"], "accumulate_grad_batches": 2}) == ["trainer.accumulate_grad_batches: '<unset>' → 2"]
    assert changed(trainer={**base["trainer"], "devices": 2}, seed=1) == ["seed: 0 → 1", "trainer.devices: 1 → 2"]
    # a user file's rows depend on no model, corpus or store setting (its fingerprint names no default model or hookpoint)
    user = {**base, "data": {**base["data"], "path": "acts.h5", "hookpoint": "layers.15", "n_tokens": 10}}
    assert "data.hookpoint" not in training_fingerprint(user) and "model.name" not in training_fingerprint(user)
    other = {**user, "model": {"name": "other"}, "data": {**user["data"], "hookpoint": "layers.3", "n_tokens": 99}}
    assert fingerprint_changes(training_fingerprint(user), training_fingerprint(other)) == []
    # a schema key of another saeforge version is not a change
    assert fingerprint_changes({**old, "sae.new_setting": 1}, old) == []


@pytest.mark.slow
def test_changed_k_is_refused_and_overwrite_run_starts_fresh(tmp_path):
    run(train_args(tmp_path, "R", "sae.k=32", "trainer.max_steps=8"), tmp_path)
    R = tmp_path / "R"
    recorded = OmegaConf.load(R / "run_config.yaml")
    assert recorded.fingerprint["sae.k"] == 32.0
    ckpt = torch.load(R / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["saeforge_fingerprint"] == OmegaConf.to_container(recorded.fingerprint)
    before = content_hashes(tmp_path)

    refused = run(train_args(tmp_path, "R", "sae.k=8", "trainer.max_steps=8"), tmp_path, expect=2)
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr[-3000:]
    assert "sae.k: 32.0 → 8.0" in lines[0] and "run.dir" in lines[0] and "overwrite=[run]" in lines[0]
    assert content_hashes(tmp_path) == before, "the refused rerun wrote into the run or the cache"

    # a setting allowed to change (extend the run, quieter logs) resumes it
    extended = run(train_args(tmp_path, "R", "sae.k=32", "trainer.max_steps=12", "trainer.log_every_n_steps=1"), tmp_path)
    assert "resuming from" in extended.stderr
    assert json.loads((R / "metrics.json").read_text())["steps"] == 12

    fresh = run(train_args(tmp_path, "R", "sae.k=8", "trainer.max_steps=8", "overwrite=[run]"), tmp_path)
    assert "resuming from" not in fresh.stderr
    aside = list(tmp_path.glob("R.replaced-*"))
    assert len(aside) == 1, "the old run was not kept beside the new one"
    old_cfg = OmegaConf.load(aside[0] / "run_config.yaml")
    assert old_cfg.sae.k == 32 and (aside[0] / "checkpoints" / "last.ckpt").is_file()
    metrics = json.loads((R / "metrics.json").read_text())
    assert metrics["k"] == 8.0 and metrics["steps"] == 8
    assert json.loads((R / "sae" / HP / "cfg.json").read_text())["saeforge"]["k"] == 8
    assert OmegaConf.load(R / "run_config.yaml").fingerprint["sae.k"] == 8.0
