"""Reconstruction and sparsity metrics, each formula written once.

Training (`saeforge.sae.model`, `saeforge.sae.module`, the held-out metrics of
`saeforge.pipelines.train`) and evaluation (`saeforge.sae.spliced`) import these; never recompute a
metric inline elsewhere. All functions take float tensors ``x`` (inputs) and
``x_hat`` (reconstructions) of shape [B, d] and return 0-d tensors (differentiable where it makes
sense), unless stated otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor


def squared_error(x: Tensor, x_hat: Tensor) -> Tensor:
    """Σ_rows ‖x − x̂‖², summed over the batch and the feature dimension."""
    return (x - x_hat).pow(2).sum()


def total_variance(x: Tensor) -> Tensor:
    """Σ_rows ‖x − mean(x)‖², with mean(x) the per-dimension mean over the batch."""
    return (x - x.mean(dim=0, keepdim=True)).pow(2).sum()


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Mean squared error per element: Σ‖x − x̂‖² / (B·d)."""
    return (x - x_hat).pow(2).mean()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean(x)‖² over the batch.

    0 is a perfect reconstruction; 1 is as good as predicting the batch mean. The denominator is
    clamped at the smallest positive float so a constant batch does not divide by zero.
    """
    return squared_error(x, x_hat) / total_variance(x).clamp_min(torch.finfo(x.dtype).tiny)


def cosine_similarity(x: Tensor, x_hat: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over rows of cos(x, x̂) = ⟨x, x̂⟩ / (‖x‖‖x̂‖) (eps guards zero rows)."""
    return torch.nn.functional.cosine_similarity(x, x_hat, dim=-1, eps=eps).mean()


def l0(acts: Tensor) -> Tensor:
    """Mean number of nonzero latents per row of dense activations [B, d_sae]."""
    return (acts != 0).sum(dim=-1).float().mean()


def dead_fraction(fire_counts: Tensor) -> Tensor:
    """Fraction of latents that never fired: mean(fire_counts == 0) for counts [d_sae]."""
    return (fire_counts == 0).float().mean()


def dense_fraction(fire_counts: Tensor, n_tokens: int, threshold: float = 0.1) -> Tensor:
    """Fraction of latents firing on more than `threshold` of `n_tokens` tokens."""
    return (fire_counts.float() / max(n_tokens, 1) > threshold).float().mean()


class ReconstructionTotals:
    """Streaming version of the metrics above over many batches (float64 sums, exact, O(d) memory).

    FVU uses the mean over ALL rows seen: Σ‖x − x̂‖² / (Σ‖x‖² − ‖Σx‖²/N), the same formula as `fvu`
    applied to the concatenation of the batches.
    """

    def __init__(self, d_sae: int) -> None:
        self.sse = 0.0
        self.sum_sq = 0.0
        self.sum_x: Tensor | None = None
        self.rows = 0
        self.dims = 0
        self.cos_sum = 0.0
        self.l0_sum = 0.0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.long)

    def update(self, x: Tensor, x_hat: Tensor, acts: Tensor) -> None:
        """Add a batch: inputs, reconstructions [B, d] and dense latent activations [B, d_sae]."""
        x64 = x.double()
        self.sse += float(squared_error(x64, x_hat.double()))
        self.sum_sq += float(x64.pow(2).sum())
        batch_sum = x64.sum(0).cpu()
        self.sum_x = batch_sum if self.sum_x is None else self.sum_x + batch_sum
        self.rows += x.shape[0]
        self.dims = x.shape[1]
        self.cos_sum += float(cosine_similarity(x, x_hat)) * x.shape[0]
        self.l0_sum += float(l0(acts)) * x.shape[0]
        self.fire_counts += (acts != 0).sum(0).cpu()

    def summary(self) -> dict[str, float]:
        assert self.sum_x is not None, "no batches were added"
        total_var = self.sum_sq - float(self.sum_x.pow(2).sum()) / self.rows
        return {
            "mse": self.sse / (self.rows * self.dims),
            "fvu": self.sse / max(total_var, 1e-300),
            "cosine": self.cos_sum / self.rows,
            "l0": self.l0_sum / self.rows,
            "dead_frac": float(dead_fraction(self.fire_counts)),
            "dense_frac": float(dense_fraction(self.fire_counts, self.rows)),
            "rows": self.rows,
        }
