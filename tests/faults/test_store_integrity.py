"""A corrupt activation-store shard is caught before training, with an error naming it and the fix.

Kinds of corruption: a shard with the wrong row count (caught by the header check on every
open), all zeros and finite garbage of the right size (caught by the sha256 check on first use,
or on every open with data.verify=true), and garbage bytes over the whole file (unreadable header).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from tests.conftest import compose_config

from saeforge.activations import integrity
from saeforge.activations.extract import build_store
from saeforge.activations.readers import open_rows
from saeforge.activations.store import VERIFIED
from saeforge.sae.datamodule import ActivationDataModule

SHARD = "layers.2/shard-00001.safetensors"
REBUILD = r"overwrite=\[cache\]"


def build(tmp: Path, fmt: str, lm) -> Path:
    cfg = compose_config("train", [
        "model=tiny", "logger=none", f"data.cache_dir={tmp}", "data.hookpoint=layers.2", f"data.format={fmt}",
        "data.n_tokens=1024", "data.ctx_len=32", "data.shard_tokens=256", "data.extract_batch_size=8",
    ])
    OmegaConf.resolve(cfg)
    return build_store(cfg.model, cfg.corpus, cfg.data, lm=lm).root


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_lm) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("stores")
    return {fmt: build(tmp / fmt, fmt, tiny_lm) for fmt in ("safetensors", "h5")}


@pytest.fixture
def store(built, tmp_path) -> Path:
    """A fresh copy of the safetensors store (never opened: not yet verified)."""
    return Path(shutil.copytree(built["safetensors"], tmp_path / "store"))


def rows_of(path: Path) -> torch.Tensor:
    return load_file(str(path))["activations"]


def wrong_row_count(path: Path) -> None:
    save_file({"activations": rows_of(path)[:-32].contiguous()}, str(path))


def all_zeros(path: Path) -> None:
    save_file({"activations": torch.zeros_like(rows_of(path))}, str(path))


def finite_garbage(path: Path) -> None:
    """Same header, data bytes replaced by random finite floats."""
    size = path.stat().st_size
    n_data = rows_of(path).numel() * 4
    data = np.random.default_rng(0).normal(size=n_data // 4).astype(np.float32).tobytes()
    with open(path, "r+b") as f:
        f.seek(size - n_data)
        f.write(data)
    assert path.stat().st_size == size and torch.isfinite(rows_of(path)).all()


def garbage_file(path: Path) -> None:
    """The whole file replaced by random bytes of the same size."""
    path.write_bytes(np.random.default_rng(1).bytes(path.stat().st_size))


def test_good_store_verifies_once_and_opens(store) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["integrity"]["algorithm"] == "sha256"
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"]["layers.2"])
    assert not (store / VERIFIED).exists()
    source = open_rows(store)
    assert source.n_rows == 1024 and (store / VERIFIED).exists()
    assert not integrity.verify_hashes(store, manifest, "layers.2")  # recorded: not read again
    assert integrity.verify_hashes(store, manifest, "layers.2", always=True)


@pytest.mark.parametrize("damage", [wrong_row_count, all_zeros, finite_garbage, garbage_file])
def test_corrupt_shard_is_named_on_first_use(store, damage) -> None:
    damage(store / SHARD)
    with pytest.raises(integrity.CorruptStoreError, match=rf"shard-00001\.safetensors.*{REBUILD}"):
        open_rows(store)
    assert not (store / VERIFIED).exists()


@pytest.mark.parametrize("damage", [wrong_row_count, all_zeros, finite_garbage])
def test_after_verification_headers_are_checked_always_and_hashes_with_data_verify(store, damage) -> None:
    open_rows(store)  # first use: verified
    damage(store / SHARD)
    cfg = {"batch_size": 64, "read_rows": 128}
    if damage is wrong_row_count:
        with pytest.raises(integrity.CorruptStoreError, match=rf"shard-00001.*holds 224 rows.*says 256.*{REBUILD}"):
            open_rows(store)
    else:
        ActivationDataModule(cfg, str(store), None, seed=0).prepare()  # verified once: not re-read
    with pytest.raises(integrity.CorruptStoreError, match=rf"shard-00001\.safetensors.*{REBUILD}"):
        ActivationDataModule({**cfg, "verify": True}, str(store), None, seed=0).prepare()


def test_h5_store_shard_rows_are_hashed(built, tmp_path) -> None:
    store = Path(shutil.copytree(built["h5"], tmp_path / "h5store"))
    import h5py

    with h5py.File(store / "layers.2.h5", "r+") as f:
        f["activations"][300:310] = 0.0
    with pytest.raises(integrity.CorruptStoreError, match=rf"layers\.2\.h5.*rows 256-512.*{REBUILD}"):
        open_rows(store)


def test_old_store_without_hashes_opens_with_one_log_line(store, caplog) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    for shard in manifest["shards"]["layers.2"]:
        del shard["sha256"]
    manifest.pop("integrity")
    (store / "manifest.json").write_text(json.dumps(manifest))
    caplog.set_level(logging.INFO, logger="saeforge.activations.integrity")
    for _ in range(3):
        assert open_rows(store, verify=True).n_rows == 1024
    assert caplog.text.count("has no shard hashes") == 1
    assert not (store / VERIFIED).exists()
    wrong_row_count(store / SHARD)
    with pytest.raises(integrity.CorruptStoreError, match=REBUILD):
        open_rows(store)
