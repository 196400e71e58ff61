"""Sparse fast paths for the SAE's decoder and encoder backward.

Only the encoder forward GEMM (x − b_dec)·W_enc must be dense. Everything after the top-k
selection touches a few entries per row, so we keep the kept latents as a list of
``(row, latent, value)`` triples — sorted row-major and unique, i.e. the layout of a CSR
matrix ``A`` [B, d_sae] — and use sparse×dense products:

* decode:            out = A · W_dec                        (CSR spmm)
* ∂/∂values:         g_e = ⟨∂out[row_e], W_dec[lat_e]⟩      (SDDMM: sampled_addmm)
* ∂/∂W_dec:          Aᵀ · ∂out                              (CSR spmm on the transposed pattern)
* encoder ∂/∂W_enc:  xcᵀ · G = (Gᵀ · xc)ᵀ, G nonzero only at kept entries (CSR spmm)
* encoder ∂/∂b_enc:  Σ_rows G  (index_add over latents);  ∂/∂b_dec = −W_enc · Σ_rows G

This is what EleutherAI sparsify's fused encoder / decoder do on GPU with embedding_bag and
index_add; on CPU the MKL-backed CSR kernels are several times faster than gathering
[nnz, d_in] rows. `saeforge.sae.model` holds the plain dense reference with the same signatures
(`dense_decode`, `dense_encode_gather`); `tests/sae/test_sparse_ops.py` checks they agree.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _crow(rows: Tensor, n_rows: int) -> Tensor:
    """CSR row pointer for row-major sorted `rows`."""
    crow = torch.zeros(n_rows + 1, dtype=torch.long, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=n_rows).cumsum(0)
    return crow


def csr(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR matrix from row-major sorted, unique (row, col, val) triples."""
    return torch.sparse_csr_tensor(
        _crow(rows, shape[0]), cols, vals, shape, check_invariants=False
    )


def transpose_order(rows: Tensor, cols: Tensor, n_rows: int, n_cols: int) -> Tensor:
    """The permutation that puts row-major sorted triples in column-major order (rows ascending
    within each column): a stable sort by column.

    On CPU, numpy's stable argsort (a radix sort for 16-bit keys: ~1 ms for 131k entries) — torch's
    CPU sort runs its threads in lock-step and takes 50–500 ms for the same keys on 2 busy cores.
    """
    if rows.device.type == "cpu":
        dtype = np.uint16 if n_cols <= 1 << 16 else np.int32 if n_cols < 1 << 31 else np.int64
        return torch.from_numpy(np.argsort(cols.numpy().astype(dtype), kind="stable"))
    return (cols * n_rows + rows).sort().indices  # unique keys: no stable sort needed


def csr_transposed(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR of the transpose [shape[1], shape[0]] from row-major sorted triples."""
    perm = transpose_order(rows, cols, *shape)
    return torch.sparse_csr_tensor(
        _crow(cols, shape[1]), rows[perm], vals[perm], (shape[1], shape[0]),
        check_invariants=False,
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
        with _full_precision(W_dec):
            return csr(rows, cols, vals, (n_rows, W_dec.shape[0])) @ W_dec

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        rows, cols, vals, W_dec = ctx.saved_tensors
        shape = (ctx.n_rows, W_dec.shape[0])
        grad_vals = grad_W_dec = None
        if rows.numel() == 0:
            return None, None, torch.zeros_like(vals), torch.zeros_like(W_dec), None
        grad_out = grad_out.to(W_dec.dtype).contiguous()
        with _full_precision(W_dec):
            if ctx.needs_input_grad[2]:
                pattern = csr(rows, cols, torch.zeros_like(vals), shape)
                grad_vals = torch.sparse.sampled_addmm(
                    pattern, grad_out, W_dec.t().contiguous(), beta=0.0
                ).values()
            if ctx.needs_input_grad[3]:
                grad_W_dec = csr_transposed(rows, cols, vals, shape) @ grad_out
        return None, None, grad_vals, grad_W_dec, None


class _SparseEncodeGather(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
        rows: Tensor, cols: Tensor, pre_kept: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(x, W_enc, b_dec, rows, cols, pre_kept)
        return pre_kept.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad_vals: Tensor) -> tuple[Tensor | None, ...]:
        x, W_enc, b_dec, rows, cols, pre_kept = ctx.saved_tensors
        g = (grad_vals * (pre_kept > 0)).to(W_enc.dtype)  # ReLU; under autocast grads may be bf16: use W_enc's dtype
        shape = (x.shape[0], W_enc.shape[1])
        grad_b_enc = torch.zeros_like(W_enc[0]).index_add_(0, cols, g)
        grad_x = grad_W_enc = grad_b_dec = None
        with _full_precision(W_enc):
            if ctx.needs_input_grad[1]:
                xc = (x - b_dec).to(W_enc.dtype)
                grad_W_enc = (csr_transposed(rows, cols, g, shape) @ xc).t().contiguous()
            if ctx.needs_input_grad[3]:
                grad_b_dec = -(W_enc @ grad_b_enc)
            if ctx.needs_input_grad[0]:
                grad_x = csr(rows, cols, g, shape) @ W_enc.t().contiguous()
        b_enc_grad = grad_b_enc if ctx.needs_input_grad[2] else None
        return grad_x, grad_W_enc, b_enc_grad, grad_b_dec, None, None, None


def sparse_decode(rows: Tensor, cols: Tensor, vals: Tensor, W_dec: Tensor, n_rows: int) -> Tensor:
    """out[r] = Σ_{e: rows_e = r} vals_e · W_dec[cols_e]  → [n_rows, d_in] (no bias).

    `rows`/`cols` must be sorted row-major and unique (CSR order).
    """
    return _SparseDecode.apply(rows, cols, vals, W_dec, n_rows)


def sparse_encode_gather(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor,
    rows: Tensor, cols: Tensor, pre_kept: Tensor,
) -> Tensor:
    """ReLU((x − b_dec)·W_enc + b_enc) at the entries (rows, cols), with a sparse backward.

    `pre_kept` must hold those pre-activations, already computed (without grad) by the dense
    forward GEMM; the forward only re-attaches them to the graph. `rows`/`cols` row-major sorted
    and unique.
    """
    return _SparseEncodeGather.apply(x, W_enc, b_enc, b_dec, rows, cols, pre_kept)
