"""The extraction loop over a set of store shards, in this process or spread over N processes/devices.

With `data.extract_devices=N`, the shards still to write are dealt round-robin to N ranks: rank 0 is
the calling process (its model already loaded), ranks 1..N-1 are spawned processes that load their
own copy of the model (on `cuda:<rank>` when the model runs on CUDA, else on the CPU with a share of
the threads). A shard is the same windows in the same batches whoever extracts it, so the store is
the same bytes for any N. Safetensors shards go straight to their final names; an HDF5 store (one
file per hookpoint) is written by rank 0 alone from per-shard parts under `h5-parts/`, in shard order.
"""

from __future__ import annotations

import logging
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from tqdm.auto import tqdm

from saeforge.activations import lora as lora_capture
from saeforge.activations.store import STORE_DTYPES, SafetensorsShardWriter, read_tokens, shard_path
from saeforge.lm.capture import capture_residual, run_until_captured, stop_after_layer
from saeforge.lm.hookpoints import LORA_HOOKPOINT
from saeforge.lm.loading import load_lm

log = logging.getLogger(__name__)
PARTS = "h5-parts"
"""Folder (inside the store) of the per-shard parts an HDF5 store is assembled from."""


@dataclass(frozen=True)
class ShardJob:
    """What every rank needs to extract its shards (plain values: it is sent to spawned processes)."""

    root: str
    hookpoints: list[str]
    d_in: dict[str, int]
    dtype: str
    ctx_len: int
    n_seq: int
    shard_seqs: int
    batch_size: int
    deepest: int
    model_cfg: dict[str, Any]
    lora: dict[str, Any] | None

    @property
    def residual(self) -> list[str]:
        return [h for h in self.hookpoints if h != LORA_HOOKPOINT]

    def span(self, index: int) -> tuple[int, int]:
        """First and stop window of shard `index`."""
        first = index * self.shard_seqs
        return first, min(first + self.shard_seqs, self.n_seq)


def adapter_sites(model: torch.nn.Module, job: ShardJob) -> list[lora_capture.LoraSite]:
    """Attach the job's LoRA adapter to `model` (in place) and return its capture sites; [] without one."""
    if LORA_HOOKPOINT not in job.hookpoints:
        return []
    assert job.lora is not None
    peft_model = lora_capture.attach_adapter(model, job.lora["adapter"])
    return lora_capture.lora_sites(peft_model, list(job.lora.get("types") or lora_capture.LORA_TYPE_ORDER))


def extract_shards(
    model: torch.nn.Module,
    device: torch.device,
    sites: list[lora_capture.LoraSite],
    job: ShardJob,
    indices: list[int],
    write: Callable[[int, int, dict[str, torch.Tensor]], None],
    desc: str = "extract",
    poll: Callable[[], None] | None = None,
) -> int:
    """Forward every window of shards `indices` with capture hooks; `write(index, first, rows)` each shard.

    Returns the number of tokens extracted. `poll()` runs after each shard (rank 0 checks its workers).
    """
    tokens = read_tokens(Path(job.root))
    dtype = STORE_DTYPES[job.dtype]
    residual = job.residual
    total = sum(job.span(i)[1] - job.span(i)[0] for i in indices) * job.ctx_len
    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=desc, dynamic_ncols=True)
    done = 0
    try:
        for index in indices:
            first, stop = job.span(index)
            chunks: dict[str, list[torch.Tensor]] = {h: [] for h in job.hookpoints}
            for b in range(first, stop, job.batch_size):
                ids = tokens[b : min(b + job.batch_size, stop)].to(device=device, dtype=torch.long)
                with ExitStack() as stack:
                    captured = stack.enter_context(capture_residual(model, residual, stop_after=False)) if residual else {}
                    lora_out = stack.enter_context(lora_capture.capture_lora(sites)) if sites else []
                    stack.enter_context(stop_after_layer(model, job.deepest))
                    run_until_captured(model, input_ids=ids)
                for h in residual:
                    chunks[h].append(captured[h].reshape(-1, job.d_in[h]).to("cpu", dtype))
                if sites:
                    chunks[LORA_HOOKPOINT].append(torch.cat(lora_out, dim=-1).reshape(-1, job.d_in[LORA_HOOKPOINT]).to("cpu", dtype))
                bar.update(ids.numel())
                done += ids.numel()
            write(index, first, {h: torch.cat(c) for h, c in chunks.items()})
            if poll is not None:
                poll()
    finally:
        bar.close()
    return done


def part_writers(job: ShardJob, root: Path) -> dict[str, SafetensorsShardWriter]:
    dtype = STORE_DTYPES[job.dtype]
    return {h: SafetensorsShardWriter(root, h, job.d_in[h], dtype, job.n_seq, job.ctx_len) for h in job.hookpoints}


def worker_device(model_device: str, rank: int) -> str:
    """The device rank `rank` loads its model on: cuda:<rank> when the model runs on CUDA, else cpu."""
    on_cuda = model_device.startswith("cuda") or (model_device == "auto" and torch.cuda.is_available())
    return f"cuda:{rank}" if on_cuda else "cpu"


def _worker(i: int, job: ShardJob, out: str, indices: list[list[int]], threads: int) -> None:
    """Spawned rank i+1: load the model, extract its shards into `out` (skipping any already there)."""
    rank = i + 1
    torch.set_num_threads(threads)
    model_cfg = {**job.model_cfg, "device": worker_device(str(job.model_cfg.get("device", "auto")), rank)}
    lm = load_lm(model_cfg)
    sites = adapter_sites(lm.model, job)
    writers = part_writers(job, Path(out))
    mine = [k for k in indices[rank] if not all(shard_path(Path(out), h, k).is_file() for h in job.hookpoints)]

    def write(index: int, first: int, rows: dict[str, torch.Tensor]) -> None:
        for h, writer in writers.items():
            writer.write_shard(index, first, rows[h])

    extract_shards(lm.model, lm.device, sites, job, mine, write, desc=f"extract rank {rank}")


def deal(indices: list[int], n: int) -> list[list[int]]:
    """Shard indices dealt round-robin to n ranks (disjoint; together all of them)."""
    return [indices[r::n] for r in range(n)]


def extract_parallel(
    model: torch.nn.Module,
    device: torch.device,
    sites: list[lora_capture.LoraSite],
    job: ShardJob,
    todo: list[int],
    n_devices: int,
    write: Callable[[int, int, dict[str, torch.Tensor]], None],
    h5: bool,
    on_shard: Callable[[int], None] | None = None,
) -> int:
    """Extract shards `todo` over `n_devices` ranks (this process is rank 0); returns the tokens extracted.

    Safetensors shards are written to the store by each rank. For an HDF5 store every rank writes
    safetensors parts under `h5-parts/`; rank 0 then passes them to `write` in shard order and deletes them.
    """
    root = Path(job.root)
    out = root / PARTS if h5 else root
    ranks = deal(todo, n_devices)
    threads = max(1, torch.get_num_threads() // n_devices)
    own_threads = torch.get_num_threads()
    context = mp.start_processes(_worker, args=(job, str(out), ranks, threads), nprocs=n_devices - 1,
                                 join=False, start_method="spawn")
    log.info("extracting %d shards on %d processes (%s)", len(todo), n_devices,
             ", ".join(f"rank {r}: {len(s)}" for r, s in enumerate(ranks)))

    def join_workers(timeout: float = 0) -> bool:
        """True once every worker finished; a failed worker raises a one-line error naming its rank."""
        try:
            return context.join(timeout=timeout)
        except mp.ProcessRaisedException as err:
            last = str(err).strip().splitlines()[-1]
            raise RuntimeError(f"extraction process {err.error_index + 1} of {n_devices} failed: {last}") from err
        except mp.ProcessExitedException as err:
            raise RuntimeError(f"extraction process {err.error_index + 1} of {n_devices} died "
                               f"(exit code {err.exit_code}); rerun to resume") from err

    writers = part_writers(job, out) if h5 else None
    mine = [k for k in ranks[0] if not (h5 and all(shard_path(out, h, k).is_file() for h in job.hookpoints))]

    def check_workers() -> None:
        join_workers()

    def write_own(index: int, first: int, rows: dict[str, torch.Tensor]) -> None:
        if writers is None:
            write(index, first, rows)
        else:
            for h, writer in writers.items():
                writer.write_shard(index, first, rows[h])
        if on_shard is not None:
            on_shard(index)

    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        extract_shards(model, device, sites, job, mine, write_own, desc="extract rank 0", poll=check_workers)
        while not join_workers(timeout=1):
            pass
    except BaseException:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join()
        raise
    finally:
        torch.set_num_threads(own_threads)
    if h5:
        for index in todo:
            first, _ = job.span(index)
            write(index, first, {h: load_file(str(shard_path(out, h, index)))["activations"] for h in job.hookpoints})
        shutil.rmtree(out, ignore_errors=True)
    return sum(job.span(i)[1] - job.span(i)[0] for i in todo) * job.ctx_len

