"""Extraction, the GPU-heavy half of concept discovery: SAE activations of every sentence prefix.

Fragments are the sentence's prefixes, one per token (BOS prepended, not a fragment): in a causal LM
the activation of the prefix ending at token t equals the activation at t in the whole sentence, so
one forward pass per batch of sentences yields every fragment.

Ordering, and why. The LM must never run once per SAE, yet resume is per configuration and memory
must stay bounded. So extraction has two phases:
1. **One LM pass** over all sentences (batches of `discover.batch_size`, stopping after the deepest
   hookpoint needed) captures every hookpoint that a not-yet-written configuration reads, into a
   float32 memory-mapped cache, one `[n_fragments, d_model]` file per hookpoint, under
   `<out>/.hookpoint_cache/` (marked complete with the extraction's fingerprint). Its size is
   n_fragments × d_model × 4 bytes per hookpoint, on disk, not in memory.
2. **Per configuration**, in the set's order: load that SAE alone, stream its hookpoint's rows from
   the cache in chunks of `discover.encode_rows`, encode, write its `.npz` atomically (through
   discover/files.py), record `batch_progress.json`, free the SAE. The write runs in a thread while
   the next configuration encodes, so the disk's time hides behind the encodes. At most two CSR
   outputs (their nonzeros) or one dense output (the reference's [n_fragments, d_sae] float32) are
   in memory at a time.
The LM runs once whatever the number of SAEs or processes: with `discover.devices` (or
`trainer.devices`) = N > 1, phase 2 is split across N processes (configuration i goes to process
i mod N; CUDA device i mod N when the model is on CUDA, else CPU processes), all reading the one
cache. A kill in phase 2 loses at most the configurations in progress (a finished file is never
rewritten: a configuration is done when its file exists, the folder's fingerprint matching); a kill
in phase 1 loses that LM pass. The cache is removed once every configuration is written.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch
from tqdm.auto import tqdm

from saeforge.atomic import atomic_write_json, reserve_blocks
from saeforge.discover.concepts import ConceptSentences
from saeforge.discover.files import ConceptActivations, read_progress, write_activations, write_progress
from saeforge.discover.sae_set import ResolvedSAE

log = logging.getLogger(__name__)
CACHE_DIR = ".hookpoint_cache"
CACHE_MARK = "complete.json"
LAYOUTS = ("auto", "dense", "csr")


@dataclass
class Fragments:
    """Every fragment (sentence prefix) in order: sentence by sentence, token by token."""

    token_ids: list[list[int]]
    """Each sentence's tokens (no BOS), truncated to max_tokens."""
    fields: dict[str, np.ndarray]
    """The npz's per-fragment fields (files.FRAGMENT_FIELDS)."""

    @property
    def n(self) -> int:
        return int(self.fields["fragments"].shape[0])


@dataclass
class ExtractStats:
    """Where extraction's time went (the bench prints these)."""

    lm_seconds: float = 0.0
    lm_batches: int = 0
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    written: list[str] = field(default_factory=list)


def build_fragments(tokenizer: Any, concepts: ConceptSentences, max_tokens: int) -> Fragments:
    """Tokenise each sentence (no special tokens) and list its prefixes with the reference's fields."""
    ids_all = tokenizer(list(concepts.sentences), add_special_tokens=False)["input_ids"]
    truncated = sum(1 for ids in ids_all if len(ids) > max_tokens)
    if truncated:
        log.warning("%d sentence(s) longer than discover.max_tokens=%d tokens were cut to that length", truncated, max_tokens)
    token_ids = [list(ids[:max_tokens]) for ids in ids_all]
    texts = [text.strip() for text in decode_prefixes(tokenizer, token_ids)]
    lengths = np.asarray([len(ids) for ids in token_ids], dtype=np.int64)
    used = np.flatnonzero(lengths)  # a sentence without tokens has no fragment (nor a place in the str width)
    positions = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    fields = {
        "fragments": np.asarray(texts, dtype=np.str_),
        "original_sentences": np.repeat(np.asarray([concepts.sentences[i] for i in used], dtype=np.str_), lengths[used]),
        "concept_strength_labels": np.repeat(np.asarray(concepts.labels, dtype=np.int64), lengths),
        "sentence_indices": np.repeat(np.arange(lengths.size, dtype=np.int64), lengths),
        "token_positions": positions,
        "is_final_token": positions == np.repeat(lengths - 1, lengths),
        "fragment_lengths": np.asarray([len(text.split()) for text in texts], dtype=np.int64),
    }
    return Fragments(token_ids, fields)


def decode_prefixes(tokenizer: Any, token_ids: list[list[int]]) -> list[str]:
    """`tokenizer.decode(ids[: t + 1], skip_special_tokens=True)` of every prefix of every sequence, in order.

    A fast tokenizer whose decode is its backend's with no clean-up decodes them all in one backend
    call (the per-call overhead of `decode` was most of the fragment building); others call `batch_decode`."""
    from transformers import PreTrainedTokenizerFast

    prefixes = [ids[: t + 1] for ids in token_ids for t in range(len(ids))]
    plain = (isinstance(tokenizer, PreTrainedTokenizerFast) and type(tokenizer)._decode is PreTrainedTokenizerFast._decode
             and not getattr(tokenizer, "clean_up_tokenization_spaces", False))
    if plain:
        return tokenizer.backend_tokenizer.decode_batch(prefixes, skip_special_tokens=True)
    return tokenizer.batch_decode(prefixes, skip_special_tokens=True)


def _cache_file(cache: Path, hookpoint: str) -> Path:
    return cache / f"{hookpoint}.npy"


def cache_ready(cache: Path, fingerprint: str, hookpoints: list[str]) -> bool:
    """Whether a complete hookpoint cache of this extraction holds every hookpoint needed."""
    try:
        mark = json.loads((cache / CACHE_MARK).read_text())
    except (OSError, ValueError):
        return False
    return mark.get("fingerprint") == fingerprint and set(hookpoints) <= set(mark.get("hookpoints", []))


def build_hookpoint_cache(lm: Any, frags: Fragments, hookpoints: list[str], cache: Path, batch_size: int,
                          fingerprint: str, stats: ExtractStats) -> None:
    """Phase 1: one LM pass over every sentence, each needed hookpoint's rows into its memory-mapped file."""
    from saeforge.lm.capture import capture_residual, run_until_captured

    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    tok = lm.tokenizer
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if bos is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start each sentence with")
    pad = tok.pad_token_id if tok.pad_token_id is not None else bos
    maps = {h: np.lib.format.open_memmap(_cache_file(cache, h), mode="w+", dtype=np.float32,
                                         shape=(frags.n, lm.d_model)) for h in hookpoints}
    for h in hookpoints:
        reserve_blocks(_cache_file(cache, h))  # a full disk: DiskFullError now, not SIGBUS at a page write
    device = lm.device
    row = 0
    start = time.perf_counter()
    with tqdm(total=len(frags.token_ids), desc="discover: LM pass", unit="sentence") as bar:
        for b in range(0, len(frags.token_ids), batch_size):
            batch = frags.token_ids[b : b + batch_size]
            width = 1 + max(len(ids) for ids in batch)
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, seq in enumerate(batch):  # right padding: a causal LM's real positions never see it
                ids[i, : 1 + len(seq)] = torch.tensor([bos, *seq])
                mask[i, : 1 + len(seq)] = 1
            with capture_residual(lm.model, hookpoints) as captured:
                run_until_captured(lm.model, input_ids=ids.to(device), attention_mask=mask.to(device))
            n_rows = sum(len(seq) for seq in batch)
            for h in hookpoints:
                hidden = captured[h].float().cpu().numpy()
                maps[h][row : row + n_rows] = np.concatenate([hidden[i, 1 : 1 + len(seq)] for i, seq in enumerate(batch)])
            row += n_rows
            stats.lm_batches += 1
            bar.update(len(batch))
    for m in maps.values():
        m.flush()
    del maps
    stats.lm_seconds += time.perf_counter() - start
    atomic_write_json(cache / CACHE_MARK, {"fingerprint": fingerprint, "hookpoints": hookpoints, "n_fragments": frags.n})


@torch.no_grad()
def encode_configuration(sae_entry: ResolvedSAE, cache: Path, n_fragments: int, device: str, layout: str,
                         encode_rows: int) -> tuple[np.ndarray | scipy.sparse.csr_matrix, float]:
    """Phase 2 for one SAE: stream its hookpoint's cached rows, encode; (activations, mean L0 measured)."""
    from saeforge.sae.formats import load_sae

    sae = load_sae(sae_entry.local)[0].eval().to(device)
    rows = np.load(_cache_file(cache, sae_entry.hookpoint), mmap_mode="r")
    dense = np.zeros((n_fragments, sae_entry.d_sae), np.float32) if layout == "dense" else None
    data, indices, counts = [], [], []
    scratch = None if dense is not None else torch.empty((min(encode_rows, n_fragments), sae_entry.d_sae),
                                                         dtype=sae.W_enc.dtype, device=device)
    for start in range(0, n_fragments, encode_rows):
        x = torch.from_numpy(np.array(rows[start : start + encode_rows])).to(device, sae.W_enc.dtype)
        if dense is not None:
            acts = sae.encode_inference(x).float()
            dense[start : start + len(x)] = acts.cpu().numpy()
            counts.append((acts != 0).sum(1).cpu().numpy())
            continue
        r, c, v = sae.encode_inference_sparse(x, scratch[: len(x)])  # row-major, the nonzeros of encode_inference
        counts.append(torch.bincount(r, minlength=len(x)).cpu().numpy())
        indices.append(c.to(torch.int32).cpu().numpy())
        data.append(v.float().cpu().numpy())
    del sae, rows, scratch
    per_row = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    mean_l0 = float(per_row.mean()) if per_row.size else 0.0
    if dense is not None:
        return dense, mean_l0
    indptr = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
    csr = scipy.sparse.csr_matrix((np.concatenate(data) if data else np.zeros(0, np.float32),
                                   np.concatenate(indices) if indices else np.zeros(0, np.int32), indptr),
                                  shape=(n_fragments, sae_entry.d_sae))
    if layout == "auto" and csr.nnz * 2 > n_fragments * sae_entry.d_sae:  # most entries non-zero: dense is smaller
        return csr.toarray().astype(np.float32), mean_l0
    return csr, mean_l0


def done_configurations(out: Path, saes: list[ResolvedSAE]) -> set[int]:
    """Configurations whose file exists (files are written atomically, so an existing one is whole)."""
    return {s.index for s in saes if (out / s.file).is_file()}


def _contiguous_done(out: Path, saes: list[ResolvedSAE]) -> int:
    done = done_configurations(out, saes)
    last = -1
    while last + 1 < len(saes) and last + 1 in done:
        last += 1
    return last


def run_configurations(saes: list[ResolvedSAE], todo: list[int], out: Path, frag_fields: dict[str, np.ndarray],
                       device: str, layout: str, encode_rows: int, rank: int = 0, threads: int | None = None) -> ExtractStats:
    """Phase 2 over `todo` (indices into `saes`), in order: encode, write the npz, record progress.

    A writer thread writes configuration i (and its progress) while i + 1 encodes, so the disk's
    time (zip, fsync) hides behind the encodes; a dense output is written before the next encode
    starts, so at most one dense (or two CSR) outputs are in memory."""
    if threads:
        torch.set_num_threads(threads)
    stats = ExtractStats()
    cache = out / CACHE_DIR
    n = int(frag_fields["fragments"].shape[0])

    def write(i: int, acts: np.ndarray | scipy.sparse.csr_matrix, mean_l0: float) -> None:
        entry = saes[i]
        start = time.perf_counter()
        write_activations(out / entry.file, ConceptActivations(
            activations=acts, **frag_fields, layer=entry.layer,
            average_l0=entry.average_l0 if entry.average_l0 is not None else mean_l0, num_features=entry.d_sae))
        write_progress(out, _contiguous_done(out, saes))
        stats.write_seconds += time.perf_counter() - start
        stats.written.append(entry.file)
        log.info("discover: wrote %s (configuration %d of %d, %s)", entry.file, i + 1, len(saes), entry.source)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="discover-write") as writer:
        pending: Future | None = None
        for i in tqdm(todo, desc=f"discover: SAEs (process {rank})", unit="sae", position=rank):
            start = time.perf_counter()
            acts, mean_l0 = encode_configuration(saes[i], cache, n, device, layout, encode_rows)
            stats.encode_seconds += time.perf_counter() - start
            if pending is not None:
                pending.result()
            pending = writer.submit(write, i, acts, mean_l0)
            if not scipy.sparse.issparse(acts):
                pending.result()
            del acts
        if pending is not None:
            pending.result()
    return stats


def _worker(args: tuple) -> ExtractStats:
    return run_configurations(*args)


def extraction_fingerprint(concepts: ConceptSentences, saes: list[ResolvedSAE], model_cfg: Any, settings: Any) -> str:
    """What decides the files' bytes: the CSV, each configuration, the model (not its device) and the
    settings that change values or layout. A folder extracted with another fingerprint is not resumed."""
    import hashlib

    from omegaconf import OmegaConf

    model = OmegaConf.to_container(model_cfg, resolve=True) if OmegaConf.is_config(model_cfg) else dict(model_cfg)
    model.pop("device", None)
    keyed = {"csv": concepts.sha256, "model": model,
             "saes": [{k: v for k, v in s.to_dict().items() if k != "neuronpedia_id"} for s in saes],
             "layout": settings.layout, "batch_size": settings.batch_size, "encode_rows": settings.encode_rows,
             "max_tokens": settings.max_tokens}
    return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()


def extract_concepts(concepts: ConceptSentences, saes: list[ResolvedSAE], model_cfg: Any, out: Path, *,
                     fingerprint: str, layout: str = "auto", batch_size: int = 16, encode_rows: int = 1024,
                     max_tokens: int = 128, devices: int = 1, lm: Any = None) -> ExtractStats:
    """Write one npz per configuration into `out` (skipping those already written), then remove the cache.

    The caller has checked the inputs and the folder's fingerprint (pipelines/discover.py). `lm`: an
    already loaded LoadedLM of `model_cfg` (else it is loaded here, only when something is left to do).
    """
    from saeforge.lm.loading import load_lm

    if layout not in LAYOUTS:
        raise ValueError(f"discover.layout must be one of {LAYOUTS}, got {layout!r}")
    out.mkdir(parents=True, exist_ok=True)
    stats = ExtractStats()
    done = done_configurations(out, saes)
    todo = [s.index for s in saes if s.index not in done]
    cache = out / CACHE_DIR
    if not todo:
        write_progress(out, len(saes) - 1)
        shutil.rmtree(cache, ignore_errors=True)
        log.info("discover: all %d configurations are already extracted in %s", len(saes), out)
        return stats
    log.info("discover: %d of %d configurations to extract (%d already written)", len(todo), len(saes), len(done))
    lm = lm if lm is not None else load_lm(model_cfg)
    frags = build_fragments(lm.tokenizer, concepts, max_tokens)
    hookpoints = sorted({saes[i].hookpoint for i in todo}, key=lambda h: int(h.split(".")[1]))
    if not cache_ready(cache, fingerprint, hookpoints):
        build_hookpoint_cache(lm, frags, hookpoints, cache, batch_size, fingerprint, stats)
    on_cuda = lm.device.type == "cuda"
    device = str(lm.device)
    del lm  # phase 2 needs only the cache
    if on_cuda:
        torch.cuda.empty_cache()
    n_proc = max(1, min(int(devices), len(todo)))
    if n_proc == 1:
        part = run_configurations(saes, todo, out, frags.fields, device, layout, encode_rows)
        parts = [part]
    else:
        threads = max(1, (os.cpu_count() or 1) // n_proc)
        jobs = [(saes, todo[r::n_proc], out, frags.fields, f"cuda:{r % torch.cuda.device_count()}" if on_cuda else "cpu",
                 layout, encode_rows, r, None if on_cuda else threads) for r in range(n_proc)]
        with multiprocessing.get_context("spawn").Pool(n_proc) as pool:
            parts = pool.map(_worker, jobs)
    for part in parts:
        stats.encode_seconds += part.encode_seconds
        stats.write_seconds += part.write_seconds
        stats.written += part.written
    last = _contiguous_done(out, saes)
    if read_progress(out) != last:  # the writers have usually recorded it already
        write_progress(out, last)
    if last == len(saes) - 1:
        shutil.rmtree(cache, ignore_errors=True)
    return stats
