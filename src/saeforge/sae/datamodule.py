"""Stream activation rows into training batches: chunk-order + buffer shuffling, per-rank parts.

- Chunks (file row ranges) are split into train and a held-out tail (`val_fraction`).
- Each epoch the train chunks are permuted (seed, epoch); DDP rank r takes chunks r, r+W, ...
  and every rank yields the same number of batches (so collective ops never wait on a rank).
- A token-level shuffle buffer of `shuffle_buffer` rows mixes rows across chunks: when it is full
  it is permuted and its first half is emitted as batches.
- Exact resume: the stream is a pure function of (seed, epoch, rank); after a restart the first
  `global_step - epoch * batches_per_epoch` batches of the epoch are regenerated and skipped.
- The stream runs `prefetch_batches` ahead in a background thread (`prefetch`), in numpy, so reading
  and shuffling overlap the training step; the batches are the same with or without it.
The first `exclude_first_tokens` positions of each stored window (default 2: BOS and the first
text token — attention sinks with ~100x the typical norm in many LMs, SmolLM2 included) are
dropped, so they skew neither the input scale nor the SAE. Non-finite rows are found in a scan before training: an error names the file and row, or with
`skip_nonfinite` they are dropped and counted.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from saeforge.activations.readers import RowChunk, RowSource, open_rows, read_chunk
from saeforge.config import DataConfig, from_config
from saeforge.sae.prefetch import prefetched

log = logging.getLogger(__name__)


@dataclass
class StreamSpec:
    """What a stream needs; plain data so it pickles into DataLoader workers."""

    chunks: list[RowChunk]
    batch_size: int
    shuffle_buffer: int
    seed: int
    shuffle: bool
    """True for training: permute chunks per epoch, take this rank's share, shuffle rows in a buffer.
    False (held-out): read the given chunks in order (the caller picked this rank's chunks)."""
    bad_rows: dict[RowChunk, list[int]] = field(default_factory=dict)
    skip: "PositionSkip" = field(default_factory=lambda: PositionSkip(0, 0))
    """Window positions dropped from every chunk (see `PositionSkip`)."""
    prefetch: int = 0
    """Batches produced ahead in a background thread (0: in the consumer's thread)."""


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class PositionSkip:
    """Drop the first `first` positions of every window of length `window` (rows i with i % window < first)."""

    window: int
    first: int

    def mask(self, chunk: RowChunk) -> np.ndarray | None:
        if not (self.window and self.first):
            return None
        return (np.arange(chunk.start, chunk.stop) % self.window) < self.first

    def count(self, chunk: RowChunk) -> int:
        mask = self.mask(chunk)
        return int(mask.sum()) if mask is not None else 0


def load_rows(chunk: RowChunk, bad_rows: Mapping[RowChunk, list[int]], skip: PositionSkip = PositionSkip(0, 0)) -> np.ndarray:
    """A chunk's float32 rows without its non-finite rows and the skipped window positions.

    numpy, not torch: the training stream runs in a background thread (`prefetch`), where torch ops
    would fork-join over the intra-op threads the training step is using.
    """
    rows = read_chunk(chunk).numpy()
    bad = bad_rows.get(chunk)
    dropped = skip.mask(chunk)
    if bad or dropped is not None:
        keep = np.ones(rows.shape[0], dtype=bool) if dropped is None else ~dropped
        if bad:
            keep[bad] = False
        rows = rows[keep]
    return rows


def guaranteed_rows(chunks: list[RowChunk], world: int, bad_rows: Mapping[RowChunk, list[int]],
                    skip: PositionSkip = PositionSkip(0, 0)) -> int:
    """Rows every rank is sure to read whatever the chunk permutation: the sum of the N//W smallest chunks."""
    sizes = sorted(c.rows - len(bad_rows.get(c, ())) - skip.count(c) for c in chunks)
    return sum(sizes[: len(chunks) // world])


def batches_per_epoch(spec: StreamSpec, world: int) -> int:
    return guaranteed_rows(spec.chunks, world, spec.bad_rows, spec.skip) // spec.batch_size


class ActivationStream(IterableDataset):
    """Yields float32 [batch_size, d_in] batches for one rank; see the module docstring."""

    def __init__(self, spec: StreamSpec, position: "StreamPosition"):
        self.spec, self.position = spec, position

    def __len__(self) -> int:
        """Batches per epoch for this rank (so Lightning knows the schedule length)."""
        if self.spec.shuffle:
            return batches_per_epoch(self.spec, rank_and_world()[1])
        return guaranteed_rows(self.spec.chunks, 1, self.spec.bad_rows, self.spec.skip) // self.spec.batch_size

    def __iter__(self) -> Iterator[torch.Tensor]:
        # Where the stream starts is read at the first next(), in the loop's thread: Lightning calls iter()
        # before it has restored a resumed run's progress (and once just to check the loader is iterable).
        epoch, skip = self.position.epoch_and_skip()
        rank, world = rank_and_world()
        yield from prefetched(self._batches(epoch, skip, rank, world), self.spec.prefetch)

    def _batches(self, epoch: int, skip: int, rank: int, world: int) -> Iterator[torch.Tensor]:
        spec = self.spec
        n_batches = batches_per_epoch(spec, world) if spec.shuffle else math.inf
        order = list(range(len(spec.chunks)))
        gen = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch * 7919 + rank)
        if spec.shuffle:
            perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(spec.seed * 31 + epoch))
            order = perm.tolist()
        mine = [spec.chunks[i] for i in (order[rank::world] if spec.shuffle else order)]
        emitted = 0
        buffer: np.ndarray | None = None
        parts: list[np.ndarray] = []  # rows read since the buffer was last formed: one concatenate per refill

        def joined() -> np.ndarray:
            return np.concatenate(([buffer] if buffer is not None else []) + parts)

        def shuffled(rows: np.ndarray) -> np.ndarray:
            return np.take(rows, torch.randperm(rows.shape[0], generator=gen).numpy(), axis=0)

        for chunk in mine:
            parts.append(load_rows(chunk, spec.bad_rows, spec.skip))
            if not spec.shuffle:
                buffer, parts = joined(), []
                while buffer.shape[0] >= spec.batch_size:
                    yield torch.from_numpy(buffer[: spec.batch_size])
                    buffer = buffer[spec.batch_size :]
                continue
            if (0 if buffer is None else buffer.shape[0]) + sum(p.shape[0] for p in parts) < spec.shuffle_buffer:
                continue
            buffer, parts = shuffled(joined()), []
            half = (buffer.shape[0] // 2 // spec.batch_size) * spec.batch_size
            for start in range(0, half, spec.batch_size):
                if emitted >= n_batches:
                    return
                if emitted >= skip:
                    yield torch.from_numpy(buffer[start : start + spec.batch_size])
                emitted += 1
            buffer = buffer[half:]
        if parts:
            buffer, parts = joined(), []
        if buffer is not None and buffer.size:
            if spec.shuffle:
                buffer = shuffled(buffer)
            for start in range(0, buffer.shape[0] - spec.batch_size + 1, spec.batch_size):
                if emitted >= n_batches:
                    return
                if emitted >= skip:
                    yield torch.from_numpy(buffer[start : start + spec.batch_size])
                emitted += 1


class StreamPosition:
    """Where the training stream starts: derived from the Trainer's restored progress."""

    def __init__(self) -> None:
        self.trainer: L.Trainer | None = None
        self.batches_per_epoch = 0

    def epoch_and_skip(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 0
        epoch = self.trainer.current_epoch
        skip = max(0, self.trainer.global_step - epoch * self.batches_per_epoch)
        return epoch, skip


class ActivationDataModule(L.LightningDataModule):
    """Batches of raw activation rows from a store or a user file (`data.path`)."""

    def __init__(self, data_cfg: DataConfig | Mapping[str, Any], path: str, hookpoint: str | None, seed: int):
        super().__init__()
        self.cfg = from_config(DataConfig, data_cfg, "data")
        self.path, self.hookpoint, self.seed = path, hookpoint, seed
        self.position = StreamPosition()
        self.source: RowSource | None = None
        self.train_chunks: list[RowChunk] = []
        self.val_chunks: list[RowChunk] = []
        self.bad_rows: dict[RowChunk, list[int]] = {}
        self.skip = PositionSkip(0, 0)

    @property
    def d_in(self) -> int:
        self.prepare()
        assert self.source is not None
        return self.source.d_in

    def prepare(self) -> None:
        """Open the source, scan it for non-finite rows, split train/held-out (idempotent)."""
        if self.source is not None:
            return
        cfg = self.cfg
        self.source = open_rows(self.path, self.hookpoint, cfg.h5_key, cfg.read_rows, verify=cfg.verify)
        self.bad_rows = scan_nonfinite(self.source, cfg.skip_nonfinite)
        self.skip = PositionSkip(self.source.window_len, cfg.exclude_first_tokens)
        chunks = self.source.chunks
        n_val = math.ceil(len(chunks) * float(cfg.val_fraction)) if len(chunks) > 1 else 0
        self.train_chunks, self.val_chunks = chunks[: len(chunks) - n_val], chunks[len(chunks) - n_val :]
        n_bad = sum(map(len, self.bad_rows.values()))
        if n_bad == self.source.n_rows:
            raise ValueError(
                f"{self.source.description}: no finite rows left — all {n_bad} rows hold NaN/Inf and "
                "data.skip_nonfinite=true dropped every one; check the file (or the extraction that wrote it)"
            )
        batch = cfg.batch_size
        train_rows = sum(c.rows - len(self.bad_rows.get(c, ())) for c in self.train_chunks)
        if train_rows < batch:
            raise ValueError(f"{self.source.description}: {train_rows} training rows is fewer than data.batch_size={batch}")
        log.info("data: %s — %d rows (d_in %d), %d train / %d held-out chunks", self.source.description,
                 self.source.n_rows, self.source.d_in, len(self.train_chunks), len(self.val_chunks))

    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        self.position.trainer = self.trainer
        _, world = rank_and_world()
        self.position.batches_per_epoch = batches_per_epoch(self._spec(self.train_chunks, True), world)
        if self.position.batches_per_epoch == 0:
            raise ValueError(f"data.batch_size={self.cfg.batch_size} is larger than each of {world} ranks' share of the data")

    def _spec(self, chunks: list[RowChunk], shuffle: bool) -> StreamSpec:
        return StreamSpec(chunks, self.cfg.batch_size, self.cfg.shuffle_buffer, self.seed, shuffle,
                          self.bad_rows, self.skip, self.cfg.prefetch_batches)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(ActivationStream(self._spec(self.train_chunks, True), self.position), batch_size=None,
                          num_workers=self.cfg.num_workers)

    def val_dataloader(self) -> DataLoader:
        rank, world = rank_and_world()
        mine = self.val_chunks[rank::world] if len(self.val_chunks) >= world else self.val_chunks
        return DataLoader(ActivationStream(self._spec(mine, False), StreamPosition()), batch_size=None)

    def heldout_batches(self, max_rows: int | None = None) -> Iterator[torch.Tensor]:
        """Every held-out row (the same on every rank), for threshold calibration and evaluation."""
        self.prepare()
        seen = 0
        for chunk in self.val_chunks or self.train_chunks[-1:]:
            rows = torch.from_numpy(load_rows(chunk, self.bad_rows, self.skip))
            yield rows
            seen += rows.shape[0]
            if max_rows is not None and seen >= max_rows:
                return

    def sample_rows(self, n: int) -> torch.Tensor:
        """A seeded random sample of ~n training rows (identical on every rank), for initialisation."""
        self.prepare()
        gen = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(len(self.train_chunks), generator=gen).tolist()
        picked, total = [], 0
        for i in order:
            rows = torch.from_numpy(load_rows(self.train_chunks[i], self.bad_rows, self.skip))
            picked.append(rows)
            total += rows.shape[0]
            if total >= n:
                break
        rows = torch.cat(picked)
        return rows[torch.randperm(rows.shape[0], generator=gen)[:n]]


def scan_nonfinite(source: RowSource, skip: bool) -> dict[RowChunk, list[int]]:
    """Row indices (within each chunk) that hold NaN/Inf; raise naming file and row unless `skip`."""
    bad: dict[RowChunk, list[int]] = {}
    for chunk in tqdm(source.chunks, desc="scan", unit="chunk", leave=False, disable=len(source.chunks) < 8):
        rows = read_chunk(chunk)
        nonfinite = (~torch.isfinite(rows)).any(dim=1).nonzero().flatten().tolist()
        if nonfinite and not skip:
            raise ValueError(
                f"{chunk.path}:{chunk.key} row {chunk.start + nonfinite[0]} holds NaN/Inf "
                f"({len(nonfinite)} such rows in rows {chunk.start}-{chunk.stop}); set data.skip_nonfinite=true to drop them"
            )
        if nonfinite:
            bad[chunk] = nonfinite
    if bad:
        log.warning("skipping %d non-finite rows (data.skip_nonfinite=true)", sum(map(len, bad.values())))
    return bad
