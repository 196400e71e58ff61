"""The sparse autoencoder: batch-TopK / TopK, with AuxK, in plain PyTorch.

    pre     = ReLU((x − b_dec) · W_enc + b_enc)                    [B, d_sae]
    keep    = batchtopk: the round(k·B) largest entries of `pre` over the whole batch
              topk:      the k largest entries of each row
              jumprelu:  entries with pre > threshold (imported SAEs; also batchtopk inference)
    x̂       = Σ_kept pre[r, j] · W_dec[j] + b_dec
    loss    = mse(x, x̂) + auxk_coef · ‖ê − e‖² / ‖e − mean(e)‖²     (AuxK, Gao et al. 2024)
              e = x − x̂ (detached), ê = decode of the top-k_aux dead-latent pre-activations

Kept latents travel as (row, latent, value) triples sorted row-major, so that the decoder and
the encoder's backward can be sparse (`sparse_ops`). `dense_decode` / `dense_encode_gather`
below are the plain reference math with the same signatures; `SparseAutoencoder.sparse_kernels`
picks the implementation.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, NamedTuple

import torch
from torch import Tensor, nn

from saeforge.sae import metrics
from saeforge.sae.sparse_ops import dense_cpu, serial_cpu, sparse_decode, sparse_encode_gather

Architecture = Literal["batchtopk", "topk", "jumprelu"]


@dataclass
class SAEConfig:
    """Shape and sparsity of an SAE."""

    d_in: int
    """Input (activation) dimension."""
    d_sae: int
    """Number of latents."""
    k: float | None = None
    """Active latents per row: exact for topk (integer), on average over the batch for batchtopk
    (may be fractional). Unused for jumprelu (imported SAEs)."""
    architecture: Architecture = "batchtopk"
    """batchtopk (trains with batch-TopK, infers with JumpReLU at `threshold`), topk, or jumprelu
    (inference-only, for imported SAEs with their own thresholds)."""
    k_aux: int | None = None
    """Dead latents used by the AuxK loss per row; None → d_in // 2."""
    auxk_coef: float = 1 / 32
    """Weight of the AuxK loss."""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.architecture not in ("batchtopk", "topk", "jumprelu"):
            raise ValueError(f"architecture must be 'batchtopk', 'topk' or 'jumprelu', got {self.architecture!r}")
        if self.architecture != "jumprelu":
            if self.k is None or not 0 < self.k < self.d_sae:
                raise ValueError(f"k must satisfy 0 < k < d_sae={self.d_sae}, got k={self.k}")
        if self.architecture == "topk" and not float(self.k).is_integer():
            raise ValueError(f"topk needs an integer k, got k={self.k} (use batchtopk for fractional k)")
        if self.k_aux is None:
            self.k_aux = max(1, self.d_in // 2)
        if self.k_aux <= 0:
            raise ValueError(f"k_aux must be positive, got {self.k_aux}")
        if self.auxk_coef < 0:
            raise ValueError(f"auxk_coef must be >= 0, got {self.auxk_coef}")


class ForwardOutput(NamedTuple):
    """What `SparseAutoencoder.forward` returns. nnz = number of kept (row, latent) pairs."""

    sae_out: Tensor
    """Reconstruction x̂ [B, d_in]."""
    latent_acts: Tensor
    """Values of the kept latents [nnz] (all > 0), row-major order."""
    latent_indices: Tensor
    """Latent index of each kept value [nnz] (long)."""
    row_indices: Tensor
    """Batch row of each kept value [nnz] (long, ascending)."""
    fvu: Tensor
    """Fraction of variance unexplained (`metrics.fvu`), differentiable."""
    mse: Tensor
    """Mean squared error per element (`metrics.mse`), differentiable."""
    auxk_loss: Tensor
    """auxk_coef × normalised AuxK loss; 0 when no latent is dead."""
    min_kept: Tensor
    """Smallest kept activation (detached; 0 if nothing kept) — tracks the batch-TopK threshold."""
    l0: Tensor
    """Mean kept latents per row (detached)."""
    l0_inference: Tensor
    """Mean active latents per row under `encode_inference` (JumpReLU at `threshold` for
    batchtopk), from the same pre-activations (detached)."""


def dense_decode(rows: Tensor, cols: Tensor, vals: Tensor, W_dec: Tensor, n_rows: int) -> Tensor:
    """Reference: scatter the triples into dense acts [n_rows, d_sae], then acts · W_dec."""
    acts = vals.new_zeros(n_rows, W_dec.shape[0]).index_put((rows, cols), vals)
    return acts @ W_dec


def dense_encode_gather(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
    rows: Tensor, cols: Tensor, pre_kept: Tensor,
) -> Tensor:
    """Reference: ReLU((x − b_dec)·W_enc + b_enc)[rows, cols] (recomputed densely; `pre_kept` unused)."""
    return torch.relu((x - b_dec) @ W_enc + b_enc)[rows, cols]


def _row_major(vals: Tensor, cols: Tensor, keep: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Candidates [B, c] (values, latent ids, keep mask) → row-major (rows, cols, vals) triples."""
    cols, order = cols.sort(dim=1)
    vals, keep = vals.gather(1, order), keep.gather(1, order)
    rows, pos = keep.nonzero(as_tuple=True)
    return rows, cols[rows, pos], vals[rows, pos]


def select_topk(pre: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row top-k of `pre` [B, d_sae] as row-major (rows, cols, vals), zeros dropped."""
    vals, cols = pre.topk(k, dim=1, sorted=False)
    return _row_major(vals, cols, vals > 0)


def batch_topk_candidates(pre: Tensor, n_keep: int, sample_size: int = 200_000) -> tuple[Tensor, Tensor, float]:
    """Flat indices (ascending, i.e. row-major) and values of the entries of `pre` [B, d_sae] above
    `below`, a value a little below the n_keep-th largest; and `below` (−inf: all entries).

    A fixed-seed random sample of the entries gives `below` (its quantile 1 − n_keep/N − 0.2%), so
    ~1.3·n_keep entries pass; if fewer than n_keep pass, all entries are candidates.
    """
    flat = pre.reshape(-1)
    n_keep = min(n_keep, flat.numel())
    if flat.numel() > 4 * sample_size:
        gen = torch.Generator(device=pre.device).manual_seed(0)
        sample = flat[torch.randint(0, flat.numel(), (sample_size,), generator=gen, device=pre.device)]
        rank = int(sample_size * max(0.0, 1.0 - n_keep / flat.numel() - 0.002))
        if rank >= 1:
            below = float(sample.kthvalue(rank).values)
            candidates = (flat > below).nonzero().squeeze(1)
            if candidates.numel() >= n_keep:
                return candidates, flat[candidates], below
    return torch.arange(flat.numel(), device=pre.device), flat, -math.inf


def pick_batch_topk(candidates: Tensor, cand_vals: Tensor, n_keep: int, d_sae: int) -> tuple[Tensor, Tensor, Tensor]:
    """The n_keep largest positive candidates as row-major (rows, cols, vals): the picks are marked,
    not sorted, since the candidates are already row-major."""
    n_keep = min(n_keep, cand_vals.numel())
    keep = torch.zeros_like(cand_vals, dtype=torch.bool).index_fill_(0, cand_vals.topk(n_keep, sorted=False).indices, True)
    keep &= cand_vals > 0
    idx, vals = candidates[keep], cand_vals[keep]
    return idx // d_sae, idx % d_sae, vals


def select_batch_topk(pre: Tensor, n_keep: int, sample_size: int = 200_000) -> tuple[Tensor, Tensor, Tensor]:
    """The `n_keep` largest entries of the whole batch `pre` [B, d_sae], zeros and negatives dropped, row-major.

    Exact, without a top-k over all B·d_sae values: the top-k runs only over the candidates of
    `batch_topk_candidates` (~1.3·n_keep entries, already row-major), so the result never depends
    on its random sample — only the speed does.
    """
    candidates, cand_vals, _ = batch_topk_candidates(pre, n_keep, sample_size)
    return pick_batch_topk(candidates, cand_vals, n_keep, pre.shape[1])


def select_above(pre: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """JumpReLU: entries with pre > threshold (scalar or [d_sae]), row-major."""
    rows, cols = ((pre > threshold) & (pre > 0)).nonzero(as_tuple=True)  # already row-major
    return rows, cols, pre[rows, cols]


def geometric_median(x: Tensor, iters: int = 20, eps: float = 1e-8) -> Tensor:
    """Weiszfeld's algorithm: argmin_y Σ‖x_i − y‖, started at the mean."""
    y = x.mean(dim=0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(eps)
        y = (w[:, None] * x).sum(dim=0) / w.sum()
    return y


class SparseAutoencoder(nn.Module):
    """Batch-TopK / TopK sparse autoencoder (see the module docstring for the math)."""

    def __init__(self, cfg: SAEConfig, sparse_kernels: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.sparse_kernels = sparse_kernels
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("threshold", torch.zeros(()))  # scalar, or [d_sae] for imports
        with torch.no_grad():
            self.W_dec.copy_(torch.randn(cfg.d_sae, cfg.d_in))
            self.normalize_decoder_()
            self.W_enc.copy_(self.W_dec.t())

    # ---- encoder / decoder -------------------------------------------------------------------
    def pre_acts(self, x: Tensor) -> Tensor:
        """ReLU((x − b_dec)·W_enc + b_enc) → [B, d_sae]."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc).relu_()

    def select(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Training-time selection of kept latents from `pre` (row-major triples)."""
        return self._select_train(pre)[:3]

    def encode_inference(self, x: Tensor) -> Tensor:
        """Dense activations [B, d_sae]: JumpReLU at `threshold` (batchtopk, jumprelu) or per-row top-k."""
        pre = (x - self.b_dec) @ self.W_enc + self.b_enc
        if self.cfg.architecture == "topk":
            vals, idx = pre.topk(int(self.cfg.k), dim=1, sorted=False)
            return torch.zeros_like(pre).scatter_(1, idx, vals.relu())
        return torch.relu(pre) * (pre > self.threshold)

    def encode_inference_sparse(self, x: Tensor, scratch: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """The nonzeros of `encode_inference(x)` as row-major (rows, cols, vals), columns ascending per row,
        without building the dense [B, d_sae] result. `scratch`: a [B, d_sae] buffer of W_enc's dtype
        reused for the pre-activations (a fresh one per call costs more than the GEMM on CPU)."""
        pre = torch.matmul(x - self.b_dec, self.W_enc, out=scratch) if scratch is not None else (x - self.b_dec) @ self.W_enc
        pre += self.b_enc  # as encode_inference, bit for bit
        if self.cfg.architecture == "topk":
            vals, idx = pre.topk(int(self.cfg.k), dim=1, sorted=False)
            idx, order = idx.sort(dim=1)
            vals = vals.gather(1, order)
            keep = vals > 0
            rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(idx)
            return rows[keep], idx[keep], vals[keep]
        rows, cols = ((pre > self.threshold) & (pre > 0)).nonzero(as_tuple=True)
        return rows, cols, pre[rows, cols]

    def decode(self, acts: Tensor) -> Tensor:
        """x̂ = acts · W_dec + b_dec for dense acts [B, d_sae]."""
        return acts @ self.W_dec + self.b_dec

    def decode_sparse(self, rows: Tensor, cols: Tensor, vals: Tensor, n_rows: int) -> Tensor:
        """x̂ = acts · W_dec + b_dec for acts given as row-major triples (e.g. `encode_inference_sparse`)."""
        return self._decode_sparse(rows, cols, vals, n_rows) + self.b_dec

    def _encode_gather(self, x: Tensor, xc: Tensor, rows: Tensor, cols: Tensor, pre_kept: Tensor) -> Tensor:
        if self.sparse_kernels:
            return sparse_encode_gather(x, self.W_enc, self.b_enc, self.b_dec, rows, cols, pre_kept, xc=xc)
        return dense_encode_gather(x, self.W_enc, self.b_enc, self.b_dec, rows, cols, pre_kept)

    def _decode_sparse(self, rows: Tensor, cols: Tensor, vals: Tensor, n_rows: int) -> Tensor:
        fn = sparse_decode if self.sparse_kernels else dense_decode
        return fn(rows, cols, vals, self.W_dec, n_rows)

    def _select_train(self, pre: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """`select` and the inference L0 (mean count of relu(pre) > threshold per row) from the same
        pre-activations, which may be negative (ReLU not applied: both ignore entries ≤ 0)."""
        B = pre.shape[0]
        if self.cfg.architecture == "topk":
            rows, cols, vals = select_topk(pre, int(self.cfg.k))
            return rows, cols, vals, (pre > 0).sum(1).clamp_max(int(self.cfg.k)).float().mean()
        threshold = self.threshold.clamp_min(0)  # relu(pre) > t ⇔ pre > max(t, 0) for t ≥ 0 (training thresholds are)
        if self.cfg.architecture == "jumprelu":
            rows, cols, vals = select_above(pre, self.threshold)
            return rows, cols, vals, torch.count_nonzero(pre > threshold) / B
        candidates, cand_vals, below = batch_topk_candidates(pre, round(self.cfg.k * B))
        rows, cols, vals = pick_batch_topk(candidates, cand_vals, round(self.cfg.k * B), pre.shape[1])
        if threshold.numel() == 1 and float(threshold) >= below:  # every entry above it is a candidate
            return rows, cols, vals, torch.count_nonzero(cand_vals > threshold) / B
        return rows, cols, vals, torch.count_nonzero(pre > threshold) / B

    # ---- training forward --------------------------------------------------------------------
    def forward(self, x: Tensor, dead_mask: Tensor | None = None) -> ForwardOutput:
        B = x.shape[0]
        with torch.no_grad():  # the dense GEMM; gradients flow through _encode_gather
            xc = x - self.b_dec
            with dense_cpu(x):  # all threads, also inside the one-thread `SAEModule.step_threads`
                pre = torch.addmm(self.b_enc, xc, self.W_enc)  # pre_acts without its ReLU pass (see _select_train)
            with serial_cpu(pre):
                rows, cols, pre_kept, l0_inf = self._select_train(pre)
        vals = self._encode_gather(x, xc, rows, cols, pre_kept)
        sae_out = self._decode_sparse(rows, cols, vals, B) + self.b_dec
        auxk = self._auxk_loss(x, xc, sae_out, pre, dead_mask)
        min_kept = vals.detach().min() if vals.numel() else x.new_zeros(())
        return ForwardOutput(
            sae_out=sae_out, latent_acts=vals, latent_indices=cols, row_indices=rows,
            fvu=metrics.fvu(x, sae_out), mse=metrics.mse(x, sae_out), auxk_loss=auxk,
            min_kept=min_kept, l0=x.new_tensor(rows.numel() / B), l0_inference=l0_inf.to(x.dtype),
        )

    def _auxk_loss(self, x: Tensor, xc: Tensor, sae_out: Tensor, pre: Tensor, dead_mask: Tensor | None) -> Tensor:
        """auxk_coef · ‖ê − e‖² / ‖e − mean(e)‖², ê from the top-k_aux dead latents of each row."""
        if dead_mask is None or self.cfg.auxk_coef == 0 or not bool(dead_mask.any()):
            return x.new_zeros(())
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(int(self.cfg.k_aux), dead.numel())
        with torch.no_grad():
            v, j = pre[:, dead].topk(k_aux, dim=1, sorted=False)
            rows, cols, pre_kept = _row_major(v, dead[j], v > 0)
        e = (x - sae_out).detach()
        e_hat = self._decode_sparse(rows, cols, self._encode_gather(x, xc, rows, cols, pre_kept), x.shape[0])
        return self.cfg.auxk_coef * metrics.fvu(e, e_hat)

    # ---- decoder constraint ------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        """Rescale each W_dec row to unit norm."""
        with serial_cpu(self.W_dec):
            self.W_dec.div_(torch.linalg.vector_norm(self.W_dec, dim=1, keepdim=True).clamp_min_(1e-12))

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        """Remove from W_dec.grad the component parallel to each W_dec row: g ← g − ⟨g,w⟩w/‖w‖²."""
        if self.W_dec.grad is None:
            return
        w, g = self.W_dec, self.W_dec.grad
        with serial_cpu(w):
            coef = torch.linalg.vecdot(g, w).div_(torch.linalg.vecdot(w, w).clamp_min_(1e-12))
            g.addcmul_(w, coef.unsqueeze(1), value=-1)

    # ---- init / export -----------------------------------------------------------------------
    @torch.no_grad()
    def init_from_sample(self, sample: Tensor, b_dec_init: str = "geometric_median") -> None:
        """Unit-norm random W_dec rows (global RNG), W_enc = W_decᵀ, b_enc = 0, b_dec from `sample`."""
        if b_dec_init not in ("geometric_median", "mean"):
            raise ValueError(f"b_dec_init must be 'geometric_median' or 'mean', got {b_dec_init!r}")
        sample = sample.to(self.W_dec.dtype)
        self.W_dec.copy_(torch.randn_like(self.W_dec))
        self.normalize_decoder_()
        self.W_enc.copy_(self.W_dec.t())
        self.b_enc.zero_()
        self.b_dec.copy_(geometric_median(sample) if b_dec_init == "geometric_median" else sample.mean(0))

    @torch.no_grad()
    def fold_input_normalization(self, scale: float, mean: Tensor | None = None) -> SparseAutoencoder:
        """A copy that takes RAW x when this SAE was trained on x_n = (x − μ)·s.

        Encoder: (x_n − b_dec)·W_enc = ((x − μ)s − b_dec)·W_enc = (x − (μ + b_dec/s))·(s·W_enc).
        Decoder: x = x̂_n/s + μ = a·(W_dec/s) + (b_dec/s + μ).
        So W_enc' = s·W_enc, W_dec' = W_dec/s, b_dec' = b_dec/s + μ (the same b_dec' on both
        sides), while the latent activations a, hence b_enc and threshold, are unchanged.
        """
        out = copy.deepcopy(self)
        mu = torch.zeros_like(self.b_dec) if mean is None else mean.to(self.b_dec)
        out.W_enc.mul_(scale)
        out.W_dec.div_(scale)
        out.b_dec.copy_(self.b_dec / scale + mu)
        return out


@torch.no_grad()
def calibrate_threshold(sae: SparseAutoencoder, batches: Iterable[Tensor] | Callable[[], Iterable[Tensor]]) -> float:
    """Set and return `sae.threshold` so JumpReLU inference has L0 = k on `batches` (exact).

    t lies midway between the (round(k·N)+1)-th and the round(k·N)-th largest positive
    pre-activation over all N rows, so exactly round(k·N) entries exceed it. Pass 1 pools each
    row's top min(d_sae, 8⌈k⌉) values: its t₁ is exact unless some row had all its pooled values above t₁ (a row with many active latents);
    then pass 2 re-reads the rows and finds t exactly among the entries above t₁ (t₁ ≤ t, since
    the pool is a subset of all entries). `batches` is a callable returning a fresh iterable (re-read for pass 2) or an iterable
    (kept in memory).
    """
    read = batches if callable(batches) else (lambda rows=list(batches): rows)
    k = float(sae.cfg.k)
    kk = min(sae.cfg.d_sae, 8 * math.ceil(k))
    pool, row_mins, n = [], [], 0
    for x in read():
        v = sae.pre_acts(x.to(sae.W_enc)).topk(kk, dim=1, sorted=False).values
        pool.append(v.flatten())
        row_mins.append(v.min(dim=1).values)
        n += x.shape[0]
    if n == 0:
        raise ValueError("calibrate_threshold got no rows")
    target = round(k * n)
    t = _kth_above(torch.cat(pool), target)
    if kk < sae.cfg.d_sae and bool((torch.cat(row_mins) > t).any()):
        above = [pre[pre > t] for pre in (sae.pre_acts(x.to(sae.W_enc)) for x in read())]
        t = max(t, _kth_above(torch.cat(above), target))
    sae.threshold = torch.tensor(t, dtype=sae.W_enc.dtype, device=sae.W_enc.device)
    return t


def _kth_above(values: Tensor, target: int) -> float:
    """Midway between the (target+1)-th and the target-th largest positive value (0.0 when there are at
    most `target`): exactly `target` values exceed it, and no value sits on it (rounding cannot flip one)."""
    values = values[values > 0]
    n = values.numel()
    if target >= n:
        return 0.0
    below = float(values.kthvalue(n - target).values)
    return below if target == 0 else (below + float(values.kthvalue(n - target + 1).values)) / 2
