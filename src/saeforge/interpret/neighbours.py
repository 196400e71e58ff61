"""Nearest features by decoder cosine: cos(W_dec[f], W_dec[g]) over all g ≠ f, the k largest.

Used by the logit lens (the `neighbours` it reports) and by the max-act pass (neighbour hard negatives).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def decoder_neighbours(W_dec: Tensor, features: Sequence[int], k: int,
                       chunk_elements: int = 1 << 24) -> tuple[Tensor, Tensor]:
    """(ids [n, k'], cosines [n, k']) of the k' = min(k, d_sae − 1) features nearest to each of
    `features` by decoder cosine, nearest first, the feature itself excluded. Computed in chunks of
    at most `chunk_elements` cosines."""
    W = W_dec.detach().float().cpu()
    d_sae = W.shape[0]
    unit = W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)
    idx = torch.as_tensor(list(features), dtype=torch.long)
    k = max(0, min(int(k), d_sae - 1))
    ids = torch.zeros(idx.numel(), k, dtype=torch.long)
    cos = torch.zeros(idx.numel(), k)
    chunk = max(1, chunk_elements // d_sae)
    with torch.inference_mode():
        for s in range(0, idx.numel(), chunk):
            f = idx[s : s + chunk]
            c = unit[f] @ unit.t()
            c[torch.arange(len(f)), f] = -torch.inf
            if k:
                cos[s : s + chunk], ids[s : s + chunk] = c.topk(k, dim=1)
    return ids, cos
