"""Extraction: store layout, cache reuse, resume after a kill, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import pytest
import torch
from safetensors.torch import load_file

from saeforge.activations.extract import build_store
from saeforge.activations.store import read_tokens
from saeforge.lm.capture import capture_residual, run_until_captured


class Killed(Exception):
    pass


def build(cfg, **kw):
    return build_store(cfg.model, cfg.corpus, cfg.data, overwrite=list(cfg.overwrite), **kw)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_safetensors_store_matches_a_plain_forward(make_cfg, tiny_lm):
    cfg = make_cfg("data.hookpoints=[layers.1,layers.2]")
    store = build(cfg, lm=tiny_lm)
    manifest = json.loads((store.root / "manifest.json").read_text())
    assert manifest["complete"] and manifest["d_in"] == {"layers.1": 64, "layers.2": 64}
    tokens = read_tokens(store.root)
    assert tokens.dtype == torch.int32 and tokens.shape == (64, 32)
    assert (tokens[:, 0] == tiny_lm.tokenizer.bos_token_id).all()
    rows = torch.cat([load_file(str(store.root / s["path"]))["activations"] for s in manifest["shards"]["layers.2"]])
    assert rows.shape == (64 * 32, 64) and sum(s["rows"] for s in manifest["shards"]["layers.2"]) == 64 * 32
    with capture_residual(tiny_lm.model, ["layers.2"]) as cap:
        run_until_captured(tiny_lm.model, input_ids=tokens[40:43].long())
    torch.testing.assert_close(rows[40 * 32 : 43 * 32], cap["layers.2"].reshape(-1, 64))


def test_cache_reuse_runs_no_forward_and_changed_key_does(make_cfg, tiny_lm, monkeypatch):
    cfg = make_cfg()
    first = build(cfg, lm=tiny_lm)
    calls = []
    monkeypatch.setattr("saeforge.activations.shards.run_until_captured", lambda *a, **k: calls.append(1))
    again = build(cfg, lm=tiny_lm)
    assert again.reused and again.root == first.root and calls == []
    monkeypatch.undo()
    changed = build(make_cfg("data.ctx_len=16"), lm=tiny_lm)
    assert not changed.reused and changed.root != first.root
    forced = build(make_cfg("overwrite=[cache]"), lm=tiny_lm)
    assert not forced.reused and forced.root == first.root


@pytest.mark.parametrize("fmt", ["safetensors", "h5"])
def test_resume_after_kill_is_byte_identical(make_cfg, tiny_lm, tmp_path, fmt):
    ref_cfg = make_cfg(f"data.format={fmt}", f"data.cache_dir={tmp_path / 'ref'}")
    ref = build(ref_cfg, lm=tiny_lm)

    cfg = make_cfg(f"data.format={fmt}", f"data.cache_dir={tmp_path / 'killed'}")

    def kill_after_two(index: int) -> None:
        if index == 1:
            raise Killed

    with pytest.raises(Killed):
        build(cfg, lm=tiny_lm, on_shard=kill_after_two)
    partial = next(p for p in (tmp_path / "killed" / "activations").iterdir() if p.is_dir())  # not its .lock
    assert not json.loads((partial / "manifest.json").read_text())["complete"]
    if fmt == "h5":
        assert not (partial / "layers.2.h5").exists() and (partial / "layers.2.h5.partial").exists()
    redone = []
    resumed = build(cfg, lm=tiny_lm, on_shard=redone.append)
    assert redone == [2, 3]
    assert tree_bytes(resumed.root) == tree_bytes(ref.root)
    if fmt == "h5":
        with h5py.File(resumed.root / "layers.2.h5") as f:
            assert f["activations"].shape == (2048, 64) and f["activations"].chunks is not None
            assert f["tokens"].shape == (64, 32)


def test_bad_input_fails_clearly(make_cfg, tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="unknown hookpoint 'layers.9'"):
        build(make_cfg("data.hookpoint=layers.9"), lm=tiny_lm)
    with pytest.raises(ValueError, match="ctx_len=1024 exceeds the model's limit of 512"):
        build(make_cfg("data.ctx_len=1024"), lm=tiny_lm)
    with pytest.raises(ValueError, match="corpus.column='body' not in the dataset's columns"):
        build(make_cfg("corpus.column=body"), lm=tiny_lm)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        build(make_cfg("corpus=files", f"corpus.data_files=[{empty}]"), lm=tiny_lm)
    with pytest.raises(FileNotFoundError, match="no such file"):
        build(make_cfg("corpus=files", f"corpus.data_files=[{tmp_path / 'nope.jsonl'}]"), lm=tiny_lm)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        build(make_cfg("model=hub", f"model.name={tmp_path / 'no-model'}"))
    with pytest.raises(FileNotFoundError, match="gguf_file='missing.gguf' not found"):
        build(make_cfg("model=smollm2", "model.gguf_file=missing.gguf"))


def test_local_jsonl_corpus(make_cfg, tiny_lm, tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"body": f"Sentence number {i} about the dog."}) for i in range(300)))
    store = build(make_cfg("corpus=files", f"corpus.data_files=[{corpus}]", "corpus.column=body"), lm=tiny_lm)
    text = tiny_lm.tokenizer.decode(read_tokens(store.root)[0].tolist())
    assert "Sentence number 0 about the dog." in text


@pytest.mark.parametrize("fmt", ["safetensors", "h5"])
def test_two_processes_build_the_same_bytes_as_one(make_cfg, tmp_path, fmt):
    one = build(make_cfg(f"data.format={fmt}", f"data.cache_dir={tmp_path / 'one'}"))
    two = build(make_cfg(f"data.format={fmt}", f"data.cache_dir={tmp_path / 'two'}", "data.extract_devices=2"))
    assert two.root.name == one.root.name  # extract_devices is not part of the cache key
    assert tree_bytes(two.root) == tree_bytes(one.root)  # every file, manifest included
    assert not (two.root / "h5-parts").exists()


def test_two_processes_resume_a_killed_store(make_cfg, tmp_path):
    ref = build(make_cfg(f"data.cache_dir={tmp_path / 'ref'}"))
    cfg = make_cfg(f"data.cache_dir={tmp_path / 'killed'}", "data.extract_devices=2")

    def kill_rank0(index: int) -> None:  # rank 0 gets shards 0 and 2; the worker is terminated with it
        raise Killed

    with pytest.raises(Killed):
        build(cfg, on_shard=kill_rank0)
    partial = next(p for p in (tmp_path / "killed" / "activations").iterdir() if p.is_dir())  # not its .lock
    assert not json.loads((partial / "manifest.json").read_text())["complete"]
    assert (partial / "layers.2" / "shard-00000.safetensors").is_file()
    resumed = build(cfg)
    assert tree_bytes(resumed.root) == tree_bytes(ref.root)


def test_a_failing_worker_fails_the_build_with_one_line(make_cfg, tiny_lm, tmp_path):
    # rank 0 extracts with the model it was given; rank 1 must load the configured one, which does not exist
    cfg = make_cfg("model=hub", f"model.name={tmp_path / 'no-model'}", "data.extract_devices=2")
    with pytest.raises(RuntimeError, match=r"^extraction process 1 of 2 failed: FileNotFoundError: .*no such model folder"):
        build(cfg, lm=tiny_lm)
