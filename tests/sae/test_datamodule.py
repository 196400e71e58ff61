"""Streaming DataModule: coverage, determinism, per-rank disjointness, bad files, resume skip."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from saeforge.activations.readers import read_chunk
from saeforge.sae import datamodule as dm_mod
from saeforge.sae.datamodule import ActivationDataModule

CFG = {"batch_size": 64, "shuffle_buffer": 256, "read_rows": 100, "val_fraction": 0.1, "h5_key": "activations"}


def write_h5(path: Path, rows: np.ndarray, key: str = "activations") -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset(key, data=rows)
    return path


def ids_rows(n: int, d: int = 8) -> np.ndarray:
    """Row i holds the value i in column 0, so batches reveal which rows they carry."""
    rows = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    rows[:, 0] = np.arange(n)
    return rows


def epoch_ids(dm: ActivationDataModule) -> list[int]:
    return [int(v) for batch in dm.train_dataloader() for v in batch[:, 0]]


def test_stream_covers_train_rows_once_shuffled_and_deterministic(tmp_path):
    path = write_h5(tmp_path / "a.h5", ids_rows(2000))
    dm = ActivationDataModule(CFG, str(path), None, seed=3)
    dm.setup()
    ids = epoch_ids(dm)
    assert len(ids) == len(set(ids)) == (1800 // 64) * 64  # 10% held out; whole batches only
    assert set(ids) <= set(range(1800))
    assert ids != sorted(ids)  # shuffled across chunks by the buffer
    assert max(abs(a - b) for a, b in zip(ids[:64], sorted(ids[:64]))) > 0
    again = ActivationDataModule(CFG, str(path), None, seed=3)
    again.setup()
    assert epoch_ids(again) == ids
    other = ActivationDataModule(CFG, str(path), None, seed=4)
    other.setup()
    assert epoch_ids(other) != ids
    held = torch.cat(list(dm.heldout_batches()))
    assert set(held[:, 0].long().tolist()) == set(range(1800, 2000))


def test_ranks_read_disjoint_parts_with_equal_batch_counts(tmp_path, monkeypatch):
    path = write_h5(tmp_path / "a.h5", ids_rows(3050))
    per_rank = []
    for rank in range(2):
        monkeypatch.setattr(dm_mod, "rank_and_world", lambda rank=rank: (rank, 2))
        dm = ActivationDataModule(CFG, str(path), None, seed=0)
        dm.setup()
        per_rank.append(epoch_ids(dm))
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    assert not set(per_rank[0]) & set(per_rank[1])


def test_resume_skips_exactly_the_batches_already_trained(tmp_path):
    path = write_h5(tmp_path / "a.h5", ids_rows(2000))
    dm = ActivationDataModule(CFG, str(path), None, seed=1)
    dm.setup()
    full = [b.clone() for b in dm.train_dataloader()]

    class FakeTrainer:
        current_epoch, global_step = 0, 7

    dm.position.trainer = FakeTrainer()
    resumed = list(dm.train_dataloader())
    assert len(resumed) == len(full) - 7
    for a, b in zip(resumed, full[7:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_safetensors_folder_and_store_dtype(tmp_path):
    folder = tmp_path / "st"
    folder.mkdir()
    rows = torch.from_numpy(ids_rows(900))
    save_file({"activations": rows[:500].to(torch.bfloat16)}, str(folder / "a.safetensors"))
    save_file({"activations": rows[500:].half()}, str(folder / "b.safetensors"))
    dm = ActivationDataModule(CFG, str(folder), None, seed=0)
    dm.setup()
    assert dm.d_in == 8 and dm.source.n_rows == 900
    batch = next(iter(dm.train_dataloader()))
    assert batch.dtype == torch.float32 and batch.shape == (64, 8)


def test_nonfinite_rows_error_or_skip(tmp_path):
    rows = ids_rows(1000)
    rows[437, 3] = np.nan
    path = write_h5(tmp_path / "nan.h5", rows)
    with pytest.raises(ValueError, match=r"nan\.h5:activations row 437 holds NaN/Inf"):
        ActivationDataModule(CFG, str(path), None, seed=0).setup()
    dm = ActivationDataModule({**CFG, "skip_nonfinite": True}, str(path), None, seed=0)
    dm.setup()
    ids = epoch_ids(dm) + [int(v) for b in dm.heldout_batches() for v in b[:, 0]]
    assert 437 not in ids and torch.isfinite(torch.tensor(ids, dtype=torch.float32)).all()


def test_bad_files_fail_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ActivationDataModule(CFG, str(tmp_path / "nope.h5"), None, 0).setup()
    write_h5(tmp_path / "k.h5", ids_rows(10), key="acts")
    with pytest.raises(ValueError, match=r"no dataset 'activations' \(found \['acts'\]\)"):
        ActivationDataModule(CFG, str(tmp_path / "k.h5"), None, 0).setup()
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f.create_dataset("activations", shape=(0, 8), dtype="f4")
    with pytest.raises(ValueError, match="has no rows"):
        ActivationDataModule(CFG, str(tmp_path / "e.h5"), None, 0).setup()
    save_file({"activations": torch.randn(100, 8)}, str(tmp_path / "t.safetensors"))
    blob = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        ActivationDataModule(CFG, str(tmp_path / "t.safetensors"), None, 0).setup()
    save_file({"activations": torch.arange(10)}, str(tmp_path / "i.safetensors"))
    with pytest.raises(ValueError, match="must be a 2-D float tensor"):
        ActivationDataModule(CFG, str(tmp_path / "i.safetensors"), None, 0).setup()


def test_peak_memory_is_bounded_by_buffer_not_file(tmp_path):
    """The stream never materialises the file: live tensor bytes stay ~ buffer + chunk."""
    path = write_h5(tmp_path / "big.h5", ids_rows(20000, d=64))
    dm = ActivationDataModule({**CFG, "shuffle_buffer": 512}, str(path), None, seed=0)
    dm.setup()
    largest = 0
    for batch in dm.train_dataloader():
        largest = max(largest, batch.untyped_storage().nbytes())
    assert largest <= (512 + 100) * 64 * 4 * 2


def test_store_bos_and_first_token_rows_are_dropped_by_default(make_cfg, tiny_lm):
    from saeforge.activations.extract import build_store

    cfg = make_cfg()
    store = build_store(cfg.model, cfg.corpus, cfg.data, lm=tiny_lm)
    dm = ActivationDataModule({**CFG, "batch_size": 32}, str(store.root), "layers.2", seed=0)
    dm.setup()
    bos_row = read_chunk(dm.source.chunks[0])[0]  # row 0 of the first shard: window 0, position 0
    rows = torch.cat([*dm.train_dataloader(), *dm.heldout_batches()])
    n_seq, ctx_len = 2048 // 32, 32
    assert dm.source.window_len == ctx_len
    assert not (rows == bos_row).all(dim=1).any()
    first_token_row = read_chunk(dm.source.chunks[0])[1]
    assert not (rows == first_token_row).all(dim=1).any()
    held = sum(b.shape[0] for b in dm.heldout_batches())
    assert held + len(dm.train_dataloader()) * 32 <= n_seq * (ctx_len - 2) < held + (len(dm.train_dataloader()) + 2) * 32 + 32 * 8
