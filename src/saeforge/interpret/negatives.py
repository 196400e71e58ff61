"""Hard non-activating examples (`interpret.maxact.non_activating_source`), chosen after the max-act pass.

A window is non-activating for feature f when f is zero at every counted position of it (the pass
keeps that as a `fired` mask [n_seq, features]); every example chosen here comes from such a window.

- **neighbours**: the top examples of the `n_neighbours` features nearest to f by decoder cosine
  (nearest feature first, each one's examples by activation, one per window), shown over the
  neighbour's display context. Each example records `neighbour` and `cosine`.
- **faiss**: up to `faiss_candidates` windows (a seeded sample) are cut to a display-length slice (a
  seeded start, as for random windows) and embedded with MiniLM (unit vectors) into a faiss
  inner-product index. The query of f is the normalised mean embedding of its top examples' texts;
  the nearest candidate windows where f never fires are its examples, each with its `similarity`
  (cosine to the query).

When a hard source finds fewer than `n_non_activating` windows, the random ones fill up the list.
Every example records its `source` (neighbours | faiss | random).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

Embed = Callable[[list[str]], np.ndarray]
"""Texts → unit-norm float32 embeddings [n, dim]."""


def example_text(example: Mapping[str, Any]) -> str:
    """The text of an example: its display tokens joined."""
    return "".join(example.get("tokens") or [])


def minilm_embed(model: str | None = None) -> Embed:
    """An `Embed` over a sentence-transformers folder (None: the embedded all-MiniLM-L6-v2)."""
    from saeforge.interpret.score import load_embedder

    embedder = load_embedder(model)

    def embed(texts: list[str]) -> np.ndarray:
        vecs = embedder.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True,
                               show_progress_bar=len(texts) > 256)
        return np.ascontiguousarray(vecs, dtype=np.float32)

    return embed


def _fill(chosen: list[dict[str, Any]], random: Sequence[Mapping[str, Any]], n: int) -> list[dict[str, Any]]:
    """Top up `chosen` to n with random windows of sequences not used yet (source: random)."""
    seen = {ex["seq"] for ex in chosen}
    for ex in random:
        if len(chosen) >= n:
            break
        if ex["seq"] not in seen:
            seen.add(ex["seq"])
            chosen.append({**ex, "source": "random"})
    return chosen


def neighbour_negatives(entries: Mapping[int, dict[str, Any]], targets: Sequence[int],
                        neighbours: Mapping[int, Sequence[tuple[int, float]]], fired: Tensor,
                        column: Mapping[int, int], n: int) -> int:
    """Replace `non_activating` of each target by its neighbours' top examples (module docstring).

    `entries` holds the max-act entries of the targets and of their neighbours; `column[f]` is f's
    column of `fired`. Returns how many examples came from neighbours (the rest are random fill)."""
    total = 0
    for f in targets:
        chosen: list[dict[str, Any]] = []
        seen: set[int] = set()
        col = column[f]
        for g, cos in neighbours.get(f, ()):
            for ex in entries[g]["top"]:
                if len(chosen) >= n:
                    break
                seq = int(ex["seq"])
                if seq in seen or bool(fired[seq, col]):
                    continue
                seen.add(seq)
                chosen.append({"tokens": ex["tokens"], "token_ids": ex["token_ids"], "seq": seq, "start": ex["start"],
                               "source": "neighbours", "neighbour": int(g), "cosine": round(float(cos), 5)})
        total += len(chosen)
        entries[f]["non_activating"] = _fill(chosen, entries[f]["non_activating"], n)
    return total


class ContextIndex:
    """Candidate contexts (display-length slices of a seeded sample of windows) in a faiss index."""

    def __init__(self, tokens: list[list[int]], length: int, n_candidates: int, seed: int,
                 decode: Callable[[Sequence[int]], list[str]], embed: Embed) -> None:
        import faiss

        n_seq, T = len(tokens), len(tokens[0])
        self.length = L = min(length, T)
        gen = torch.Generator().manual_seed(seed + 2)
        self.seqs = torch.randperm(n_seq, generator=gen)[:n_candidates].sort().values
        lo = 1 if T > L else 0  # skip window position 0 (BOS in packed windows) when there is room
        self.starts = torch.randint(lo, max(lo, T - L) + 1, (self.seqs.numel(),), generator=gen)
        self.examples = []
        for seq, start in zip(self.seqs.tolist(), self.starts.tolist()):
            ids = tokens[seq][start : start + L]
            self.examples.append({"tokens": decode(ids), "token_ids": ids, "seq": seq, "start": start})
        vecs = embed([example_text(ex) for ex in self.examples])
        self.index = faiss.IndexFlatIP(vecs.shape[1])
        self.index.add(vecs)
        self.embed = embed
        log.info("faiss negatives: %d candidate windows embedded (dim %d)", len(self.examples), vecs.shape[1])


def faiss_negatives(entries: Mapping[int, dict[str, Any]], targets: Sequence[int], index: ContextIndex,
                    fired: Tensor, column: Mapping[int, int], n: int) -> int:
    """Replace `non_activating` of each target with top examples by its nearest candidate contexts
    where it never fires (module docstring). Returns how many examples came from the index."""
    queried = [f for f in targets if entries[f]["top"]]
    if not queried or n == 0:
        return 0
    texts = [example_text(ex) for f in queried for ex in entries[f]["top"]]
    vecs = index.embed(texts)
    queries, at = [], 0
    for f in queried:
        k = len(entries[f]["top"])
        mean = vecs[at : at + k].mean(0)
        queries.append(mean / max(float(np.linalg.norm(mean)), 1e-12))
        at += k
    cols = torch.tensor([column[f] for f in queried])
    cand_fired = fired[index.seqs][:, cols]  # [n_candidates, len(queried)]
    k = min(index.index.ntotal, n + int(cand_fired.sum(0).max()))
    sims, found = index.index.search(np.stack(queries).astype(np.float32), k)
    total = 0
    for q, f in enumerate(queried):
        chosen: list[dict[str, Any]] = []
        for sim, i in zip(sims[q].tolist(), found[q].tolist()):
            if len(chosen) >= n:
                break
            if i < 0 or bool(cand_fired[i, q]):
                continue
            chosen.append({**index.examples[i], "source": "faiss", "similarity": round(float(sim), 5)})
        total += len(chosen)
        entries[f]["non_activating"] = _fill(chosen, entries[f]["non_activating"], n)
    return total
