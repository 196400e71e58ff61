"""An SAE trained on the user's own HDF5 file: with a `tokens` dataset (or tokens.safetensors) max-act,
steering and labels run on the file's rows; without one, the stages that need text are skipped and
the message says exactly what to add."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from saeforge.activations.extract import build_store
from saeforge.activations.readers import open_rows, read_chunk, read_user_tokens
from saeforge.activations.store import read_tokens
from saeforge.pipelines.interpret import interpret
from saeforge.sae.formats import write_saelens
from saeforge.sae.model import SAEConfig, SparseAutoencoder
from tests.conftest import compose_config

HP = "layers.2"


@pytest.fixture(scope="module")
def store_rows(tmp_path_factory):
    """The rows and token windows of a tiny-model store (what a user's file would hold)."""
    tmp = tmp_path_factory.mktemp("store")
    cfg = compose_config("train", ["model=tiny", f"data.cache_dir={tmp}", f"data.hookpoint={HP}", "data.n_tokens=1024",
                                   "data.ctx_len=32", "data.shard_tokens=512", "data.extract_batch_size=4"])
    OmegaConf.resolve(cfg)
    store = build_store(cfg.model, cfg.corpus, cfg.data)
    source = open_rows(store.root, HP)
    rows = torch.cat([read_chunk(c) for c in source.chunks])
    return rows, read_tokens(store.root).long()


def fake_run(tmp: Path, data_path: Path, rows: torch.Tensor) -> Path:
    """A run directory as training on `data.path` leaves it: run_config.yaml and the exported SAE."""
    run = tmp / "run"
    cfg = compose_config("train", ["model=tiny", "logger=none", f"run.dir={run}", f"data.path={data_path}",
                                   f"data.hookpoint={HP}", f"data.cache_dir={tmp / 'cache'}"])
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "run_config.yaml")
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=rows.shape[1], d_sae=32, k=4))
    sae.init_from_sample(rows[:512])
    write_saelens(sae, run / "sae" / HP, hook_name=HP, hook_layer=2)
    return run


def interpret_cfg(run: Path, *extra: str):
    return compose_config("interpret", [f"ckpt={run}", "model=tiny", "logger=none", "interpret.features=[0,1,2]",
                                        "interpret.n_tokens=1024", "interpret.steering.max_new_tokens=3",
                                        "interpret.steering.n_prompts=1", *extra])


def test_user_hdf5_with_tokens_gives_maxact_and_steering(tmp_path, store_rows, tiny_lm):
    rows, tokens = store_rows
    path = tmp_path / "mine.h5"
    with h5py.File(path, "w") as f:
        f["activations"] = rows.numpy()
        f["tokens"] = tokens.numpy().astype(np.int32)
    out = interpret(interpret_cfg(fake_run(tmp_path, path, rows),
                                  "interpret.stages=[maxact,logit_lens,steering,explain,dashboard]",
                                  "explainer.params.max_tokens=8"), lm=tiny_lm)
    maxact = json.loads((out / "maxact.json").read_text())
    assert maxact["layer"] == 2 and maxact["features"]
    # every example's token ids are a window of the file's `tokens`
    flat = tokens.flatten().tolist()
    for entry in maxact["features"].values():
        for ex in entry["top"]:
            start = ex["seq"] * tokens.shape[1] + ex["start"]
            assert ex["token_ids"] == flat[start : start + len(ex["token_ids"])]
    stages = json.loads((out / "stages.json").read_text())
    assert not any("not_applicable" in e for e in stages.values() if isinstance(e, dict))
    assert json.loads((out / "steering" / "effects.json").read_text())
    labels = json.loads((out / "explanations.json").read_text())["2"]
    assert set(labels) == set(maxact["features"]) and all(e["status"] in ("ok", "parse_error") for e in labels.values())


def test_user_hdf5_without_tokens_says_what_to_add(tmp_path, store_rows, tiny_lm, caplog):
    rows, _ = store_rows
    path = tmp_path / "mine.h5"
    with h5py.File(path, "w") as f:
        f["activations"] = rows.numpy()
    with caplog.at_level("INFO"):
        out = interpret(interpret_cfg(fake_run(tmp_path, path, rows),
                                      "interpret.stages=[maxact,logit_lens,steering,explain,dashboard]"), lm=tiny_lm)
    stages = json.loads((out / "stages.json").read_text())
    reason = stages["maxact"]["not_applicable"]
    assert "add a dataset `tokens` to mine.h5" in reason and "[n_seq, ctx_len]" in reason and "model=" in reason
    assert stages["steering"]["not_applicable"].startswith("needs maxact")
    assert stages["explain"]["not_applicable"].startswith("needs maxact")
    assert "not_applicable" not in stages["logit_lens"] and (out / "logit_lens.json").is_file()
    assert f"stage maxact: not applicable: {reason}" in caplog.text
    assert "not applicable" in (out / "dashboard.html").read_text()


def test_tokens_safetensors_beside_a_safetensors_folder(tmp_path, store_rows):
    rows, tokens = store_rows
    folder = tmp_path / "acts"
    folder.mkdir()
    save_file({"activations": rows.contiguous()}, str(folder / "part-0.safetensors"))
    assert read_user_tokens(folder, rows.shape[0]) is None
    save_file({"tokens": tokens.to(torch.int32).contiguous()}, str(folder / "tokens.safetensors"))
    assert open_rows(folder).n_rows == rows.shape[0]  # tokens.safetensors is not read as activations
    assert torch.equal(read_user_tokens(folder, rows.shape[0]), tokens)
    with pytest.raises(ValueError, match="only 10 rows"):
        read_user_tokens(folder, 10)
    with pytest.raises(ValueError, match=r"ids outside \[0, 5\)"):
        read_user_tokens(folder, rows.shape[0], vocab_size=5)
