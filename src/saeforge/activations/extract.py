"""Build (or reuse, or resume) an activation store: batched forward with capture hooks."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from tqdm.auto import tqdm

from saeforge.activations import lora as lora_capture
from saeforge.activations.store import (
    INTEGRITY,
    STORE_DTYPES,
    WRITERS,
    Manifest,
    StoreSpec,
    is_complete,
    read_manifest,
    read_tokens,
    shard_path,
    write_manifest,
    write_tokens,
)
from saeforge.activations.corpus import iter_texts, load_corpus
from saeforge.activations.shards import PARTS, ShardJob, adapter_sites, extract_parallel, extract_shards
from saeforge.activations.windows import pack_windows
from saeforge.config import corpus_identity
from saeforge.lm.hookpoints import LORA_HOOKPOINT, check_hookpoint
from saeforge.lm.loading import LoadedLM, load_lm
from saeforge.paths import cache_root
from saeforge.runlock import Holder, Lock, hold

log = logging.getLogger(__name__)


@dataclass
class Store:
    """A finished store: its folder and manifest."""

    root: Path
    manifest: dict[str, Any]
    reused: bool


def plain(node: Any) -> Any:
    """A config node as plain dicts/lists (JSON-serialisable)."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node) if isinstance(node, Mapping) else node


def store_spec(model_cfg: Mapping[str, Any], corpus_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> StoreSpec:
    """The cache-key spec from the `model`, `corpus` and `data` config nodes."""
    lora_cfg = data_cfg.get("lora")
    hookpoints = [str(h) for h in (data_cfg.get("hookpoints") or [data_cfg["hookpoint"]])]
    if LORA_HOOKPOINT in hookpoints and not (lora_cfg and lora_cfg.get("adapter")):
        raise ValueError("hookpoint `lora` needs data.lora.adapter=<peft adapter folder>")
    model_id = str(model_cfg.get("name") or "")
    if model_cfg.get("gguf_file"):
        model_id = f"{model_id}:{model_cfg['gguf_file']}" if model_id else str(model_cfg["gguf_file"])
    if model_cfg.get("tiny"):
        model_id = f"tiny:{sorted(dict(model_cfg['tiny']).items())}:seed{model_cfg.get('seed', 0)}"
    return StoreSpec(
        model=model_id,
        revision=model_cfg.get("revision"),
        hookpoints=hookpoints,
        corpus=corpus_identity(plain(corpus_cfg)),
        n_tokens=int(data_cfg["n_tokens"]),
        ctx_len=int(data_cfg["ctx_len"]),
        dtype=str(data_cfg.get("store_dtype", "float32")),
        format=str(data_cfg.get("format", "safetensors")),
        prepend_bos=bool(data_cfg.get("prepend_bos", True)),
        lora=plain(lora_cfg) if lora_cfg and lora_cfg.get("adapter") else None,
    )


def store_root(model_cfg: Mapping[str, Any], corpus_cfg: Mapping[str, Any], data_cfg: Mapping[str, Any]) -> Path:
    """Where the store for this config lives: <cache_dir>/activations/<cache key>."""
    return cache_root(data_cfg.get("cache_dir")) / "activations" / store_spec(model_cfg, corpus_cfg, data_cfg).cache_key()


def store_lock(root: Path) -> Path:
    """The lock file of a store, beside it: `<cache>/activations/<cache key>.lock` (see `saeforge.runlock`)."""
    return root.with_name(f"{root.name}.lock")


class WaitLine:
    """What a process waiting for another's build shows: a line naming the builder, then its shards done."""

    def __init__(self, root: Path):
        self.root = root
        self.builder: int | None = None
        self.bar: Any = None

    def __call__(self, holder: Holder | None) -> None:
        if holder is None:
            return
        if holder.pid != self.builder:
            self.close()
            self.builder = holder.pid
            log.info("activation store %s is being built by %s; waiting for it (this process resumes the build "
                     "if that one dies)", self.root, holder)
            self.bar = tqdm(total=0, unit="shard", desc=f"waiting for builder pid {holder.pid}", dynamic_ncols=True)
        if "total" in holder.progress:
            self.bar.total, self.bar.n = holder.progress["total"], holder.progress["done"]
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def build_store(
    model_cfg: Mapping[str, Any],
    corpus_cfg: Mapping[str, Any],
    data_cfg: Mapping[str, Any],
    overwrite: list[str] | tuple[str, ...] = (),
    lm: LoadedLM | None = None,
    on_shard: Callable[[int], None] | None = None,
) -> Store:
    """Return the store for this config, building or resuming it when needed.

    A complete store with the same cache key is reused without loading the model; `overwrite`
    containing "cache" rebuilds it. An incomplete one is resumed: finished shards are kept.
    One process builds a store at a time (the lock beside it, `store_lock`): another that needs it
    waits, showing the builder's progress, then reuses it, or resumes the build if the builder died.
    `on_shard(i)` is called after shard i is written (tests use it to simulate a kill).
    """
    spec = store_spec(model_cfg, corpus_cfg, data_cfg)
    root = store_root(model_cfg, corpus_cfg, data_cfg)
    if "cache" not in overwrite and is_complete(root):
        return reuse_store(root, spec)
    waiting = WaitLine(root)
    try:
        with hold(store_lock(root), f"building activation store {root}", wait=True, on_wait=waiting, poll=1.0) as lock:
            waiting.close()
            if "cache" in overwrite and root.exists():
                log.info("overwrite=[cache]: removing %s", root)
                shutil.rmtree(root)
            if is_complete(root):
                return reuse_store(root, spec)
            return extract_store(spec, root, model_cfg, corpus_cfg, data_cfg, lm, on_shard, lock)
    finally:
        waiting.close()


def reuse_store(root: Path, spec: StoreSpec) -> Store:
    log.info("reusing activation store %s (same cache key %s)", root, spec.cache_key())
    return Store(root, read_manifest(root) or {}, reused=True)


def extract_store(
    spec: StoreSpec,
    root: Path,
    model_cfg: Mapping[str, Any],
    corpus_cfg: Mapping[str, Any],
    data_cfg: Mapping[str, Any],
    lm: LoadedLM | None,
    on_shard: Callable[[int], None] | None,
    lock: Lock,
) -> Store:
    """Build (or resume) the store at `root` while holding its lock; progress is noted in the lock file."""
    cache = cache_root(data_cfg and data_cfg.get("cache_dir"))
    corpus = load_corpus(corpus_cfg, cache)
    lm = lm or load_lm(model_cfg)
    hookpoints = [check_hookpoint(h, lm.n_layers) for h in spec.hookpoints]
    if lm.max_ctx is not None and spec.ctx_len > lm.max_ctx:
        raise ValueError(f"data.ctx_len={spec.ctx_len} exceeds the model's limit of {lm.max_ctx} positions")

    root.mkdir(parents=True, exist_ok=True)
    if (root / "tokens.safetensors").is_file():
        tokens = read_tokens(root)
    else:
        tokens = pack_windows(
            iter_texts(corpus, corpus_cfg.get("column", "text")), lm.tokenizer, spec.ctx_len, spec.n_tokens, spec.prepend_bos
        )
        write_tokens(root, tokens)
    n_seq = tokens.shape[0]

    extra: dict[str, Any] = {"prepend_bos": spec.prepend_bos, "integrity": INTEGRITY[spec.format]}
    job = ShardJob(root=str(root), hookpoints=hookpoints, d_in={}, dtype=spec.dtype, ctx_len=spec.ctx_len, n_seq=n_seq,
                   shard_seqs=max(1, int(data_cfg.get("shard_tokens", 65536)) // spec.ctx_len),
                   batch_size=int(data_cfg.get("extract_batch_size", 8)), deepest=0, model_cfg=plain(model_cfg),
                   lora=spec.lora)
    sites = adapter_sites(lm.model, job)
    if sites:
        extra["lora_layout"] = lora_capture.layout(sites)
    residual = job.residual
    d_in = {h: lm.d_model for h in residual}
    if sites:
        d_in[LORA_HOOKPOINT] = sum(site.rank for site in sites)
    deepest = max([int(h.split(".")[1]) for h in residual] + [s.layer for s in sites])
    job = replace(job, d_in=d_in, deepest=deepest)

    writers = {h: WRITERS[spec.format](root, h, d_in[h], STORE_DTYPES[spec.dtype], n_seq, spec.ctx_len) for h in hookpoints}
    manifest = Manifest(spec=asdict(spec), cache_key=spec.cache_key(), n_seq=n_seq, d_in=d_in, extra=extra,
                        shards={h: [] for h in hookpoints})
    write_manifest(root, manifest)

    starts = [job.span(i)[0] for i in range(-(-n_seq // job.shard_seqs))]
    todo = [i for i, s in enumerate(starts) if not all(w.has_shard(i, s, job.span(i)[1] - s) for w in writers.values())]
    if len(todo) < len(starts):
        log.info("resuming %s: %d of %d shards already written", root, len(starts) - len(todo), len(starts))
    parts = root / PARTS

    def report(index: int) -> None:
        """Note the shards finished so far (any rank's) for waiting processes; then the caller's `on_shard`."""
        done = sum(1 for i, s in enumerate(starts) if all(w.has_shard(i, s, job.span(i)[1] - s) for w in writers.values())
                   or all(shard_path(parts, h, i).is_file() for h in hookpoints))
        lock.note(done=done, total=len(starts))
        if on_shard is not None:
            on_shard(index)

    lock.note(done=len(starts) - len(todo), total=len(starts))
    n_devices = min(int(data_cfg.get("extract_devices", 1) or 1), max(1, len(todo)))

    def write(index: int, first: int, rows: dict[str, torch.Tensor]) -> None:
        for h, writer in writers.items():
            writer.write_shard(index, first, rows[h])

    def write_and_report(index: int, first: int, rows: dict[str, torch.Tensor]) -> None:
        write(index, first, rows)
        report(index)

    t0 = time.perf_counter()
    try:
        if n_devices > 1:
            done_tokens = extract_parallel(lm.model, lm.device, sites, job, todo, n_devices, write,
                                           h5=spec.format == "h5", on_shard=report)
        else:
            done_tokens = extract_shards(lm.model, lm.device, sites, job, todo, write_and_report)
        for h, writer in writers.items():
            writer.finish()
            manifest.shards[h] = [writer.describe(i, s, (job.span(i)[1] - s) * spec.ctx_len) for i, s in enumerate(starts)]
    finally:
        for writer in writers.values():
            getattr(writer, "close", lambda: None)()
    manifest.complete = True
    write_manifest(root, manifest)
    if done_tokens:
        log.info("extracted %d tokens in %.1fs (%.0f tok/s) → %s", done_tokens, time.perf_counter() - t0,
                 done_tokens / (time.perf_counter() - t0), root)
    return Store(root, read_manifest(root) or {}, reused=False)
