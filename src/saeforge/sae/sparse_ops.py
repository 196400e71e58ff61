"""Sparse fast paths for the SAE's decoder and encoder backward.

Only the encoder forward GEMM (x − b_dec)·W_enc must be dense. Everything after the top-k
selection touches a few entries per row, so we keep the kept latents as a list of
``(row, latent, value)`` triples — sorted row-major and unique, i.e. the layout of a CSR
matrix ``A`` [B, d_sae] — and use sparse×dense products:

* decode:            out = A · W_dec                        (bag sum over each row's latents)
* ∂/∂values:         g_e = ⟨∂out[row_e], W_dec[lat_e]⟩      (SDDMM: sampled_addmm)
* ∂/∂W_dec:          Aᵀ · ∂out                              (bag sum over each latent's rows)
* encoder ∂/∂W_enc:  xcᵀ · G = (Gᵀ · xc)ᵀ, G nonzero only at kept entries (bag sum, as ∂/∂W_dec)
* encoder ∂/∂b_enc:  Σ_rows G  (index_add over latents);  ∂/∂b_dec = −W_enc · Σ_rows G

A "bag sum" out[b] = Σ_{e ∈ bag b} w_e · table[i_e] is `embedding_bag(mode="sum")` — what
EleutherAI sparsify's decoder uses on GPU; on CPU its kernel is 3–6× faster than MKL's CSR
spmm at these shapes. `saeforge.sae.model` holds the plain dense reference with the same
signatures (`dense_decode`, `dense_encode_gather`); `tests/sae/test_sparse_ops.py` checks they agree.
"""

from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


_replaced = threading.local()  # .threads: the count the innermost active serial_cpu replaced (for dense_cpu)


SERIAL_MAX_THREADS = 4
"""`serial_cpu` applies up to this many intra-op threads (measured on 2 cores); with more threads the
sparse work is left to torch's own split, since an idle many-core CPU pays the fork-join gladly."""


@contextmanager
def serial_cpu(t: Tensor) -> Iterator[None]:
    """Run the enclosed ops on one thread when `t` is on the CPU (`dense_cpu` inside lends the
    replaced threads back to a dense op).

    For the sparse work of a training step (the k·B kept entries, a few ms on one thread): split over
    threads, each op pays a fork-join, which costs 10–30 ms per op as soon as other processes share
    the cores — more than the work itself.
    """
    if t.device.type != "cpu" or not 1 < torch.get_num_threads() <= SERIAL_MAX_THREADS:
        yield
        return
    threads, outer = torch.get_num_threads(), getattr(_replaced, "threads", None)
    _replaced.threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _replaced.threads = outer


@contextmanager
def dense_cpu(t: Tensor) -> Iterator[None]:
    """Inside `serial_cpu`: run the enclosed dense op (the encoder GEMM) on the threads it replaced."""
    threads = getattr(_replaced, "threads", None)
    if t.device.type != "cpu" or threads is None or torch.get_num_threads() != 1:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)


def _crow(keys: Tensor, n: int) -> Tensor:
    """CSR row pointer [n + 1] (bag offsets) of the entries' `keys` in 0..n-1 (any order)."""
    crow = torch.zeros(n + 1, dtype=torch.long, device=keys.device)
    crow[1:] = torch.bincount(keys, minlength=n).cumsum(0)
    return crow


def transpose_order(rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """The permutation that puts row-major sorted triples in column-major order (rows ascending
    within each column): a stable sort by column.

    On CPU, numpy's stable argsort (a radix sort for 16-bit keys: ~1 ms for 131k entries) — torch's
    CPU sort runs its threads in lock-step and takes 50–500 ms for the same keys on 2 busy cores.
    """
    if rows.device.type == "cpu":
        dtype = np.uint16 if n_cols <= 1 << 16 else np.int64
        return torch.from_numpy(np.argsort(cols.numpy().astype(dtype), kind="stable"))
    return (cols * n_rows + rows).sort().indices  # unique keys: no stable sort needed


def bag_sum(index: Tensor, weights: Tensor, table: Tensor, offsets: Tensor) -> Tensor:
    """out[b] = Σ_{e ∈ bag b} weights_e · table[index_e], bag b = entries offsets[b]:offsets[b+1]."""
    return F.embedding_bag(index, table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True)


def spmm(rows: Tensor, cols: Tensor, vals: Tensor, dense: Tensor, n_rows: int) -> Tensor:
    """A · dense for A [n_rows, dense.shape[0]] given as row-major sorted triples."""
    return bag_sum(cols, vals, dense, _crow(rows, n_rows))


def spmm_transposed(rows: Tensor, cols: Tensor, vals: Tensor, dense: Tensor, n_cols: int) -> Tensor:
    """Aᵀ · dense → [n_cols, dense.shape[1]] for A [dense.shape[0], n_cols] given as row-major sorted triples."""
    perm = transpose_order(rows, cols, dense.shape[0], n_cols)
    return bag_sum(rows[perm], vals[perm], dense, _crow(cols, n_cols))


def csr(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR matrix from row-major sorted, unique (row, col, val) triples (int32 indices: MKL's own)."""
    return torch.sparse_csr_tensor(
        _crow(rows, shape[0]).int(), cols.int(), vals, shape, check_invariants=False
    )


def _full_precision(t: Tensor) -> Any:
    """Autocast off inside the kernels: they compute in the weights' dtype (sparse matmuls have no bf16 on CPU)."""
    return torch.autocast(device_type=t.device.type, enabled=False)


class _SparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, rows: Tensor, cols: Tensor, vals: Tensor, W_dec: Tensor, n_rows: int) -> Tensor:
        vals = vals.to(W_dec.dtype)  # under autocast the kept values may be bf16; compute in W_dec's dtype
        ctx.save_for_backward(rows, cols, vals, W_dec)
        ctx.n_rows = n_rows
        if rows.numel() == 0:
            return W_dec.new_zeros(n_rows, W_dec.shape[1])
        with _full_precision(W_dec), serial_cpu(W_dec):
            return spmm(rows, cols, vals, W_dec, n_rows)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        rows, cols, vals, W_dec = ctx.saved_tensors
        shape = (ctx.n_rows, W_dec.shape[0])
        grad_vals = grad_W_dec = None
        if rows.numel() == 0:
            return None, None, torch.zeros_like(vals), torch.zeros_like(W_dec), None
        grad_out = grad_out.to(W_dec.dtype).contiguous()
        with _full_precision(W_dec), serial_cpu(W_dec):
            if ctx.needs_input_grad[2]:
                pattern = csr(rows, cols, torch.zeros_like(vals), shape)
                grad_vals = torch.sparse.sampled_addmm(pattern, grad_out, W_dec.t(), beta=0.0).values()
            if ctx.needs_input_grad[3]:
                grad_W_dec = spmm_transposed(rows, cols, vals, grad_out, shape[1])
        return None, None, grad_vals, grad_W_dec, None


class _SparseEncodeGather(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
        rows: Tensor, cols: Tensor, pre_kept: Tensor, xc: Tensor | None,
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols, pre_kept, xc)
        return pre_kept.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad_vals: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, b_dec, rows, cols, pre_kept, xc = ctx.saved_tensors
        shape = (x.shape[0], W_enc.shape[1])
        grad_x = grad_W_enc = grad_b_dec = None
        with _full_precision(W_enc), serial_cpu(W_enc):
            g = (grad_vals * (pre_kept > 0)).to(W_enc.dtype)  # ReLU; under autocast grads may be bf16: use W_enc's dtype
            grad_b_enc = torch.zeros_like(W_enc[0]).index_add_(0, cols, g)
            if ctx.needs_input_grad[1]:
                xc = (x - b_dec if xc is None else xc).to(W_enc.dtype)
                grad_W_enc = spmm_transposed(rows, cols, g, xc, shape[1]).t().contiguous()
            if ctx.needs_input_grad[3]:
                grad_b_dec = -(W_enc @ grad_b_enc)
            if ctx.needs_input_grad[0]:
                grad_x = spmm(rows, cols, g, W_enc.t().contiguous(), shape[0])
        b_enc_grad = grad_b_enc if ctx.needs_input_grad[2] else None
        return grad_x, grad_W_enc, b_enc_grad, grad_b_dec, None, None, None, None


def sparse_decode(rows: Tensor, cols: Tensor, vals: Tensor, W_dec: Tensor, n_rows: int) -> Tensor:
    """out[r] = Σ_{e: rows_e = r} vals_e · W_dec[cols_e]  → [n_rows, d_in] (no bias).

    `rows`/`cols` must be sorted row-major and unique (CSR order).
    """
    return _SparseDecode.apply(rows, cols, vals, W_dec, n_rows)


def sparse_encode_gather(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
    rows: Tensor, cols: Tensor, pre_kept: Tensor, xc: Tensor | None = None,
) -> Tensor:
    """ReLU((x − b_dec)·W_enc + b_enc) at the entries (rows, cols), with a sparse backward.

    `pre_kept` must hold those pre-activations, already computed (without grad) by the dense
    forward GEMM; the forward only re-attaches them to the graph. `rows`/`cols` row-major sorted
    and unique. `xc`: x − b_dec if the caller has it (saves recomputing it in the backward).
    """
    return _SparseEncodeGather.apply(x, W_enc, b_enc, b_dec, rows, cols, pre_kept, xc)
