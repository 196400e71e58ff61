"""Read activation rows lazily from a store, a user HDF5 file, or a folder of safetensors files.

Everything is described as a list of `RowChunk`s (file + row range) so that readers never hold a
whole file in memory: safetensors rows are sliced through `safe_open(...).get_slice`, HDF5 rows
through h5py's dataset slicing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from saeforge.activations import integrity
from saeforge.activations.store import MANIFEST, TOKENS

FLOAT_SAFETENSORS = {"F32", "F16", "BF16", "F64"}


@dataclass(frozen=True)
class RowChunk:
    """Rows [start, stop) of the 2-D tensor `key` in `path`."""

    path: Path
    key: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class RowSource:
    """All rows of one hookpoint/file set, as chunks, with their width."""

    chunks: list[RowChunk]
    d_in: int
    description: str
    window_len: int = 0
    """For a store: its ctx_len, so row i of a file is position i % window_len of a window (each
    file starts at a window boundary); 0 for user files (positions unknown)."""

    @property
    def n_rows(self) -> int:
        return sum(c.rows for c in self.chunks)


def read_chunk(chunk: RowChunk) -> torch.Tensor:
    """float32 [rows, d_in] for one chunk (only those rows are read)."""
    if chunk.path.suffix == ".h5" or chunk.path.suffix == ".hdf5":
        with h5py.File(chunk.path, "r") as f:
            data = f[chunk.key][chunk.start : chunk.stop]
        return torch.from_numpy(np.asarray(data, dtype=np.float32))
    with safe_open(str(chunk.path), "pt") as f:
        return f.get_slice(chunk.key)[chunk.start : chunk.stop].to(torch.float32)


def _split(path: Path, key: str, n_rows: int, read_rows: int) -> list[RowChunk]:
    return [RowChunk(path, key, s, min(s + read_rows, n_rows)) for s in range(0, n_rows, read_rows)]


def _h5_rows(path: Path, key: str) -> tuple[int, int]:
    try:
        with h5py.File(path, "r") as f:
            if key not in f:
                raise ValueError(f"{path}: no dataset {key!r} (found {sorted(f.keys())}); set data.h5_key")
            ds = f[key]
            if ds.ndim != 2 or ds.dtype.kind != "f":
                raise ValueError(f"{path}:{key} must be a 2-D float dataset, got shape {ds.shape} dtype {ds.dtype}")
            return int(ds.shape[0]), int(ds.shape[1])
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file (truncated or corrupt?): {err}") from err


def _safetensors_rows(path: Path, key: str) -> tuple[int, int]:
    try:
        with safe_open(str(path), "pt") as f:
            if key not in f.keys():
                raise ValueError(f"{path}: no tensor {key!r} (found {sorted(f.keys())}); set data.h5_key")
            sl = f.get_slice(key)
            shape, dtype = sl.get_shape(), sl.get_dtype()
    except SafetensorError as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    if len(shape) != 2 or dtype not in FLOAT_SAFETENSORS:
        raise ValueError(f"{path}:{key} must be a 2-D float tensor, got shape {shape} dtype {dtype}")
    return int(shape[0]), int(shape[1])


def open_rows(path: str | Path, hookpoint: str | None = None, key: str = "activations", read_rows: int = 16384,
              verify: bool = False) -> RowSource:
    """Describe the rows at `path`: a store folder (manifest.json), an .h5 file, or a safetensors folder/file.

    A store's shards are checked against its manifest (see `integrity`): headers every time,
    hashes on first use of the hookpoint, or on every open with `verify` (`data.verify=true`).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data.path={str(path)!r} does not exist")
    files: list[Path]
    window_len = 0
    manifest: dict | None = None
    manifest_path = path / MANIFEST if path.is_dir() else None
    if manifest_path is not None and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete"):
            raise ValueError(f"{path}: the activation store is incomplete; rerun extraction to finish it")
        hookpoint = hookpoint or manifest["hookpoints"][0]
        window_len = int(manifest["ctx_len"])
        if hookpoint not in manifest["shards"]:
            raise ValueError(f"{path}: hookpoint {hookpoint!r} not in this store ({sorted(manifest['shards'])})")
        files = sorted({path / s["path"] for s in manifest["shards"][hookpoint]})
        key = "activations"
    elif path.is_dir():
        files = [p for p in sorted(path.glob("*.safetensors")) if p.name != TOKENS] or sorted(path.glob("*.h5"))
        if not files:
            raise ValueError(f"{path}: no .safetensors or .h5 files in this folder")
    else:
        files = [path]
    shapes: dict[Path, tuple[int, int]] = {}
    for file in files:
        is_h5 = file.suffix in (".h5", ".hdf5")
        if not is_h5 and file.suffix != ".safetensors":
            raise ValueError(f"{file}: expected a .h5/.hdf5 or .safetensors file")
        try:
            n, d = _h5_rows(file, key) if is_h5 else _safetensors_rows(file, key)
        except (ValueError, FileNotFoundError) as err:
            if manifest is None:
                raise
            raise integrity.corrupt(path, file, str(err).removeprefix(f"{file}: ").removeprefix(f"{file}:")) from err
        shapes[file] = (n, d)
    if manifest is not None:
        assert hookpoint is not None
        integrity.check_shapes(path, manifest, hookpoint, shapes)
        integrity.verify_hashes(path, manifest, hookpoint, always=verify)
    chunks: list[RowChunk] = []
    d_in: int | None = None
    for file, (n, d) in shapes.items():
        if n == 0:
            raise ValueError(f"{file}:{key} has no rows")
        if d_in is not None and d != d_in:
            raise ValueError(f"{file}:{key} has width {d}, but earlier files have {d_in}")
        d_in = d
        chunks += _split(file, key, n, read_rows)
    assert d_in is not None
    return RowSource(chunks, d_in, f"{path} [{key}]", window_len)


TOKENS_KEY = "tokens"
"""The token windows of a user file: a 2-D integer dataset/tensor `tokens` [n_seq, ctx_len]."""


def missing_tokens_message(path: str | Path) -> str:
    """What to add to a user activation file so that interpretation can show its rows as text."""
    path = Path(path).expanduser()
    where = (f"a dataset `{TOKENS_KEY}` to {path.name}" if path.suffix in (".h5", ".hdf5")
             else f"{TOKENS} (a tensor `{TOKENS_KEY}`) to {path if path.is_dir() else path.parent}")
    return (f"data.path={str(path)!r} has no token ids, so its rows cannot be shown as text: add {where}, "
            f"integers [n_seq, ctx_len] from the tokenizer of model=, where activation row r is token "
            f"(r // ctx_len, r % ctx_len)")


def read_user_tokens(path: str | Path, n_rows: int, vocab_size: int | None = None) -> torch.Tensor | None:
    """The token windows [n_seq, ctx_len] (int64) that a user file's rows come from, or None when it has
    none: a `tokens` dataset inside an HDF5 file, or tokens.safetensors in the folder (the store layout)
    or beside a safetensors file. ValueError, naming the file, for a wrong shape or dtype, more tokens
    than activation rows, or ids outside the vocabulary."""
    path = Path(path).expanduser()
    tokens: torch.Tensor | None = None
    source = path
    if path.is_file() and path.suffix in (".h5", ".hdf5"):
        with h5py.File(path, "r") as f:
            if TOKENS_KEY in f:
                data = np.asarray(f[TOKENS_KEY][()])
                if data.dtype.kind not in "iu":
                    raise ValueError(f"{path}:{TOKENS_KEY} must hold integer token ids, got dtype {data.dtype}")
                tokens = torch.from_numpy(data.astype(np.int64))
    else:
        source = (path if path.is_dir() else path.parent) / TOKENS
        if source.is_file():
            with safe_open(str(source), "pt") as f:
                if TOKENS_KEY not in f.keys():
                    raise ValueError(f"{source}: no tensor {TOKENS_KEY!r} (found {sorted(f.keys())})")
                tokens = f.get_tensor(TOKENS_KEY)
            if tokens.is_floating_point() or tokens.dtype == torch.bool:
                raise ValueError(f"{source}:{TOKENS_KEY} must hold integer token ids, got {tokens.dtype}")
            tokens = tokens.long()
    if tokens is None:
        return None
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"{source}:{TOKENS_KEY} must be 2-D [n_seq, ctx_len], got shape {tuple(tokens.shape)}")
    if tokens.numel() > n_rows:
        raise ValueError(f"{source}:{TOKENS_KEY} has {tokens.numel()} tokens but the activations have only {n_rows} rows")
    if vocab_size is not None and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(f"{source}:{TOKENS_KEY} has ids outside [0, {vocab_size}) of model='s tokenizer")
    return tokens
