"""pipelines/train.py: the activation store a DDP child uses."""

from __future__ import annotations

from saeforge.activations.extract import build_store
from saeforge.pipelines.train import data_source
from saeforge.pipelines.validate import validate_train


def test_a_ddp_child_reuses_the_store_rank_0_built_even_with_overwrite(make_cfg, tiny_lm, monkeypatch):
    cfg = make_cfg("overwrite=[cache]")
    plan = validate_train(cfg)
    store = build_store(cfg.model, cfg.corpus, cfg.data, lm=tiny_lm)  # what rank 0 built before launching its children
    built = (store.root / "manifest.json").stat().st_mtime_ns

    monkeypatch.setenv("LOCAL_RANK", "1")
    assert data_source(cfg, plan)[0] == str(store.root)
    assert (store.root / "manifest.json").stat().st_mtime_ns == built  # reused, not rebuilt under rank 0's feet

    monkeypatch.setenv("LOCAL_RANK", "0")
    assert data_source(cfg, plan)[0] == str(store.root)
    assert (store.root / "manifest.json").stat().st_mtime_ns != built  # rank 0 honours overwrite=[cache]
