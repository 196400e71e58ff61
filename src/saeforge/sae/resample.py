"""Resampling: re-initialise latents that do no work towards the inputs the SAE reconstructs worst.

Every `sae.resample_every` optimizer steps (default 50; 0 turns it off), `SAEModule` picks
  weak        latents with fewer fires since the previous resampling than `sae.resample_min_fires`
              × the median latent's; a fire is a kept activation above the training threshold
              (batchtopk; topk: every kept one), i.e. one that inference would keep — batch-TopK keeps
              almost every latent somewhere in each batch at a small value, so "kept at all" is no
              sign of life, and
  duplicates  live latents whose decoder row has cosine > `sae.resample_dup_cos` to a lower-numbered
              live latent's row (all but the first of each group),
and moves each of them to the unit residual e/‖e‖ of one of the batch's worst-reconstructed rows
(largest ‖e‖², e = x − x̂; one row per latent):
    W_dec[j] = e/‖e‖,   W_enc[:, j] = W_dec[j] · (mean encoder norm of the untouched latents),   b_enc[j] = 0,
and zeroes their Adam moments, so the next steps start them fresh (as in Anthropic's "Towards
monosemanticity" resampling, with the worst rows instead of a ‖e‖²-weighted draw).

`init_decoder_from_rows_` (`sae.decoder_init=rows`) points every latent at a data row at the start.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from saeforge.sae.model import SparseAutoencoder


@torch.no_grad()
def count_fires_(fires: Tensor, latent_indices: Tensor, latent_acts: Tensor, threshold: Tensor | None) -> None:
    """fires[j] += number of kept activations of latent j above `threshold` (above 0 when None: a top-k
    of a row with fewer than k positive pre-activations also keeps zeros, at arbitrary latents)."""
    cols = latent_indices[latent_acts.detach() > (0.0 if threshold is None else threshold)]
    fires.index_add_(0, cols, torch.ones_like(cols, dtype=fires.dtype))


@torch.no_grad()
def pick_latents(fires: Tensor, W_dec: Tensor, min_fires: float, dup_cos: float) -> Tensor:
    """Indices of the latents to resample: weak (fewer fires than min_fires × the median, or none) or
    near-duplicates (see the module docstring)."""
    dead = (fires == 0) | (fires.double() < min_fires * fires.double().median())
    if dup_cos < 1.0:
        live = (~dead).nonzero().squeeze(1)
        W = torch.nn.functional.normalize(W_dec[live].float(), dim=1)
        sim = (W @ W.t()).triu(diagonal=1)  # sim[a, b], a < b: b repeats an earlier latent
        dead[live[(sim > dup_cos).any(dim=0)]] = True
    return dead.nonzero().squeeze(1)


@torch.no_grad()
def resample_(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer | None, latents: Tensor, x: Tensor, x_hat: Tensor) -> int:
    """Move `latents` to the unit residuals of the worst-reconstructed rows of (x, x̂); returns how many moved.

    Under DDP the worst rows are those of the global batch (every rank's local worst, gathered), so
    the SAE stays identical across ranks and equal to single-process training on the same batches."""
    distributed = dist.is_available() and dist.is_initialized()
    n = torch.tensor(min(latents.numel(), x.shape[0]), device=x.device)
    if distributed:
        dist.all_reduce(n, op=dist.ReduceOp.MIN)
    n = int(n)
    if n == 0:
        return 0
    latents = latents[:n]
    err = (x - x_hat).float()
    sq, worst = err.pow(2).sum(1).topk(n)
    err, row = err[worst], worst
    if distributed:  # the global batch's worst rows, numbered as in the global batch (ranks hold consecutive slices)
        world = dist.get_world_size()
        sizes = [torch.empty(1, dtype=torch.long, device=x.device) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        row = row + int(sum(int(t) for t in sizes[:dist.get_rank()]))
        gathered = [[torch.empty_like(t) for _ in range(world)] for t in (sq, err, row)]
        for out, t in zip(gathered, (sq, err, row)):
            dist.all_gather(out, t)
        sq, err, row = (torch.cat(g) for g in gathered)
        top = sq.topk(n).indices
        err, row = err[top], row[top]
    err = err[row.argsort()]  # latents take the rows in batch order: no dependence on near-equal errors' ranks
    directions = torch.nn.functional.normalize(err, dim=1).to(sae.W_dec.dtype)
    point_latents_(sae, latents, directions)
    if optimizer is not None:
        reset_adam_state_(optimizer, sae, latents)
    return n


@torch.no_grad()
def point_latents_(sae: SparseAutoencoder, latents: Tensor, directions: Tensor) -> None:
    """W_dec[j] = unit direction, W_enc[:, j] = W_dec[j]·(mean encoder norm of the other latents, 1 if none), b_enc[j] = 0."""
    others = torch.ones(sae.cfg.d_sae, dtype=torch.bool, device=latents.device)
    others[latents] = False
    enc_norm = sae.W_enc[:, others].norm(dim=0).mean() if bool(others.any()) else sae.W_enc.new_ones(())
    sae.W_dec[latents] = directions
    sae.W_enc[:, latents] = directions.t() * enc_norm
    sae.b_enc[latents] = 0


@torch.no_grad()
def init_decoder_from_rows_(sae: SparseAutoencoder, sample: Tensor) -> None:
    """`sae.decoder_init=rows`: every latent starts at a distinct random row of the (normalised) sample minus
    b_dec, as a unit vector (rows drawn with replacement when the sample is smaller than d_sae; global RNG)."""
    n = sample.shape[0]
    pick = torch.randperm(n)[:sae.cfg.d_sae] if n >= sae.cfg.d_sae else torch.randint(0, n, (sae.cfg.d_sae,))
    directions = torch.nn.functional.normalize((sample[pick] - sae.b_dec).to(sae.W_dec.dtype), dim=1)
    all_latents = torch.arange(sae.cfg.d_sae, device=sae.W_dec.device)
    point_latents_(sae, all_latents, directions)


def reset_adam_state_(optimizer: torch.optim.Optimizer, sae: SparseAutoencoder, latents: Tensor) -> None:
    """Zero every per-element optimizer state (Adam's moments) of the given latents' W_enc columns,
    W_dec rows and b_enc entries."""
    slices = {sae.W_enc: (slice(None), latents), sae.W_dec: (latents,), sae.b_enc: (latents,)}
    for param, index in slices.items():
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value[index] = 0
