"""The activation store on disk: manifest, cache key, token windows and shard/HDF5 writers.

Layout (a directory named by the cache key, see docs/architecture.md):
    manifest.json                      spec, d_in per hookpoint, shards with row counts and sha256, `complete`
    verified.json                      written once the shard hashes were checked (see integrity.py)
    tokens.safetensors                 `tokens` int32 [n_seq, ctx_len]
    <hookpoint>/shard-00000.safetensors  `activations` [rows, d_in]   (format=safetensors)
    <hookpoint>.h5                     `activations` [N, d_in] chunked, plus `tokens`   (format=h5)
Row r of a hookpoint is token (r // ctx_len, r % ctx_len). Every file is written to a temporary
name and renamed; an HDF5 file grows under `<name>.partial` (with a `seqs_done` attribute) and is
renamed when complete, so nothing half-written ever carries its final name.

Each shard entry of the manifest carries a `sha256`, computed as the shard is written: for
safetensors over the shard file's bytes, for HDF5 over the raw bytes of the shard's rows in the
stored dtype (one file holds every shard). The manifest's `integrity` says which. Stores written
before hashes existed have none; readers then check row counts and headers only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from saeforge.atomic import atomic_path, atomic_write_json, commit_file, disk_full_as

MANIFEST = "manifest.json"
TOKENS = "tokens.safetensors"
VERIFIED = "verified.json"
INTEGRITY = {
    "safetensors": {"algorithm": "sha256", "over": "file bytes"},
    "h5": {"algorithm": "sha256", "over": "row bytes (stored dtype, C order)"},
}
"""What each shard's `sha256` covers, per store format (recorded in the manifest as `integrity`)."""
FORMATS = ("safetensors", "h5")
STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StoreSpec:
    """Everything that determines a store's content; its hash is the cache key."""

    model: str
    revision: str | None
    hookpoints: list[str]
    corpus: dict[str, Any]
    n_tokens: int
    ctx_len: int
    dtype: str
    format: str
    prepend_bos: bool
    lora: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"data.format={self.format!r} must be one of {FORMATS}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"data.store_dtype={self.dtype!r} must be one of {sorted(STORE_DTYPES)}")
        if self.format == "h5" and self.dtype == "bfloat16":
            raise ValueError("data.format=h5 cannot store bfloat16; use float16/float32 or format=safetensors")
        if self.n_tokens <= 0 or self.ctx_len <= 1:
            raise ValueError(f"need n_tokens > 0 and ctx_len > 1, got {self.n_tokens}, {self.ctx_len}")

    def cache_key(self) -> str:
        """Stable 16-hex-digit hash of the spec (sorted-key JSON)."""
        blob = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Manifest:
    """manifest.json, as other tools read it."""

    spec: dict[str, Any]
    cache_key: str
    n_seq: int
    d_in: dict[str, int]
    shards: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    complete: bool = False

    def to_json(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "model": spec["model"],
            "hookpoints": spec["hookpoints"],
            "d_in": self.d_in,
            "dtype": spec["dtype"],
            "ctx_len": spec["ctx_len"],
            "n_tokens": self.n_seq * spec["ctx_len"],
            "n_seq": self.n_seq,
            "corpus": spec["corpus"],
            "format": spec["format"],
            "cache_key": self.cache_key,
            "spec": spec,
            "shards": self.shards,
            **self.extra,
            "complete": self.complete,
        }


def write_manifest(root: Path, manifest: Manifest) -> None:
    atomic_write_json(root / MANIFEST, manifest.to_json())


def read_manifest(root: Path) -> dict[str, Any] | None:
    path = root / MANIFEST
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def is_complete(root: Path) -> bool:
    manifest = read_manifest(root)
    return bool(manifest and manifest.get("complete"))


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors written to a temp name in the same folder, then renamed."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_tokens(root: Path, tokens: torch.Tensor) -> None:
    save_safetensors_atomic({"tokens": tokens.to(torch.int32)}, root / TOKENS)


def read_tokens(root: Path) -> torch.Tensor:
    return load_file(str(root / TOKENS))["tokens"]


def shard_path(root: Path, hookpoint: str, index: int) -> Path:
    return root / hookpoint / f"shard-{index:05d}.safetensors"


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_h5_rows(path: Path, start: int, stop: int, key: str = "activations") -> str:
    """sha256 of rows [start, stop) of an HDF5 dataset, as raw bytes in the stored dtype."""
    with h5py.File(path, "r") as f:
        return hashlib.sha256(np.ascontiguousarray(f[key][start:stop]).tobytes()).hexdigest()


class SafetensorsShardWriter:
    """One safetensors file per shard; a shard that exists under its final name is complete.

    Each shard's sha256 is taken from its temp file just after writing it (still in the page
    cache), before the rename: measured cheaper here than serialising to memory, hashing and
    writing those bytes (see the notes of issue 11).
    """

    def __init__(self, root: Path, hookpoint: str, d_in: int, dtype: torch.dtype, n_seq: int, ctx_len: int):
        self.root, self.hookpoint, self.dtype, self.ctx_len = root, hookpoint, dtype, ctx_len
        self.hashes: dict[int, str] = {}

    def has_shard(self, index: int, first_seq: int, n_seq: int) -> bool:
        return shard_path(self.root, self.hookpoint, index).is_file()

    def write_shard(self, index: int, first_seq: int, acts: torch.Tensor) -> dict[str, Any]:
        path = shard_path(self.root, self.hookpoint, index)
        with atomic_path(path) as tmp:
            save_file({"activations": acts.to(self.dtype).contiguous()}, str(tmp))
            self.hashes[index] = sha256_file(tmp)
        return self.describe(index, first_seq, acts.shape[0])

    def describe(self, index: int, first_seq: int, rows: int) -> dict[str, Any]:
        path = shard_path(self.root, self.hookpoint, index)
        if index not in self.hashes:  # written by an earlier, interrupted run: hash it once now
            self.hashes[index] = sha256_file(path)
        return {
            "path": str(path.relative_to(self.root)),
            "rows": rows,
            "first_row": first_seq * self.ctx_len,
            "sha256": self.hashes[index],
        }

    def finish(self) -> None:
        pass


class H5Writer:
    """One HDF5 file per hookpoint, pre-allocated; grows under `.partial` and is renamed at the end."""

    def __init__(self, root: Path, hookpoint: str, d_in: int, dtype: torch.dtype, n_seq: int, ctx_len: int):
        self.final = root / f"{hookpoint}.h5"
        self.partial = root / f"{hookpoint}.h5.partial"
        self.ctx_len = ctx_len
        self.hashes: dict[int, str] = {}
        self.np_dtype = {torch.float32: np.float32, torch.float16: np.float16}[dtype]
        if self.final.is_file():
            self.file = None
            return
        if not self.partial.is_file():
            with disk_full_as(self.final, self.partial), h5py.File(self.partial, "w", track_order=False) as f:
                rows = n_seq * ctx_len
                chunk_rows = min(rows, max(1, 2**20 // (d_in * np.dtype(self.np_dtype).itemsize)))
                f.create_dataset(
                    "activations", shape=(rows, d_in), dtype=self.np_dtype, chunks=(chunk_rows, d_in),
                    fillvalue=0, track_times=False,
                )
                f.create_dataset("tokens", data=read_tokens(root).numpy(), track_times=False)
                f.attrs["seqs_done"] = 0
        self.file = h5py.File(self.partial, "r+")

    def has_shard(self, index: int, first_seq: int, n_seq: int) -> bool:
        if self.file is None:
            return True
        return int(self.file.attrs["seqs_done"]) >= first_seq + n_seq

    def write_shard(self, index: int, first_seq: int, acts: torch.Tensor) -> dict[str, Any]:
        assert self.file is not None
        start = first_seq * self.ctx_len
        rows = np.ascontiguousarray(acts.float().numpy().astype(self.np_dtype))
        self.hashes[index] = hashlib.sha256(rows.tobytes()).hexdigest()
        with disk_full_as(self.final, self.partial):  # the .partial file keeps the rows written so far
            self.file["activations"][start : start + acts.shape[0]] = rows
            self.file.attrs["seqs_done"] = first_seq + acts.shape[0] // self.ctx_len
            self.file.flush()
        return self.describe(index, first_seq, acts.shape[0])

    def describe(self, index: int, first_seq: int, rows: int) -> dict[str, Any]:
        start = first_seq * self.ctx_len
        if index not in self.hashes:  # written by an earlier, interrupted run: hash it once now
            self.hashes[index] = sha256_h5_rows(self.final if self.file is None else self.partial, start, start + rows)
        return {"path": self.final.name, "rows": rows, "first_row": start, "sha256": self.hashes[index]}

    def finish(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
            with disk_full_as(self.final, self.partial):
                commit_file(self.partial, self.final)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


WRITERS = {"safetensors": SafetensorsShardWriter, "h5": H5Writer}
