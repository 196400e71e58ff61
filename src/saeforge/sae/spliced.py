"""Evaluate an SAE inside its LM: reconstruction on the hookpoint and next-token loss with it spliced in.

For each batch of held-out windows:
- clean: the unmodified forward → CE_clean and the hookpoint activations x;
- spliced: the hookpoint output replaced by the SAE reconstruction x̂ → CE_sae, KL(clean ‖ spliced);
- zero-ablated: replaced by 0 → CE_zero; mean-ablated: replaced by the eval set's mean activation → CE_mean.
CE recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean) (1 = as good as clean, 0 = as bad as
zero-ablation); also reported against mean-ablation. The first `exclude_first` positions of each
window (BOS and the first token: attention sinks with outlier norms in most LMs) are never
replaced and are left out of the reconstruction metrics, as in training.
CE is the mean next-token cross-entropy over all predicted positions; KL is the mean over positions
of Σ p_clean (log p_clean − log p_spliced).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from saeforge.sae.metrics import ReconstructionTotals
from saeforge.lm.capture import capture_residual, patch_residual, run_until_captured
from saeforge.lm.loading import LoadedLM
from saeforge.sae.model import SparseAutoencoder


def _keep_first(original: torch.Tensor, replaced: torch.Tensor, exclude_first: int) -> torch.Tensor:
    if exclude_first:
        replaced = replaced.clone()
        replaced[:, :exclude_first] = original[:, :exclude_first]
    return replaced


def next_token_ce(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting ids[:, 1:] from logits[:, :-1]."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


def recovered(clean: float, spliced: float, ablated: float) -> float | None:
    """(CE_ablated − CE_sae) / (CE_ablated − CE_clean); None when ablation does not hurt (undefined)."""
    gap = ablated - clean
    return (ablated - spliced) / gap if gap > 1e-4 else None


@torch.no_grad()
def mean_activation(lm: LoadedLM, hookpoint: str, tokens: torch.Tensor, batch_size: int, exclude_first: int) -> torch.Tensor:
    """Mean hookpoint activation over the windows (forward stops at the hookpoint)."""
    total, count = torch.zeros(lm.d_model, dtype=torch.float64), 0
    for b in range(0, tokens.shape[0], batch_size):
        ids = tokens[b : b + batch_size].long().to(lm.device)
        with capture_residual(lm.model, [hookpoint]) as cap:
            run_until_captured(lm.model, input_ids=ids)
        x = cap[hookpoint][:, exclude_first:]
        total += x.reshape(-1, lm.d_model).double().sum(0).cpu()
        count += x.shape[0] * x.shape[1]
    return (total / count).float()


@torch.no_grad()
def evaluate_spliced(
    lm: LoadedLM, sae: SparseAutoencoder, hookpoint: str, tokens: torch.Tensor, batch_size: int = 8, exclude_first: int = 2
) -> dict[str, Any]:
    """All metrics of the module docstring on `tokens` [n_seq, ctx_len]; a progress bar over batches."""
    if sae.cfg.d_in != lm.d_model:
        raise ValueError(f"the SAE has d_in={sae.cfg.d_in} but {hookpoint} of {lm.name} has d_model={lm.d_model}")
    device = lm.device
    sae = sae.to(device)
    mean = mean_activation(lm, hookpoint, tokens, batch_size, exclude_first).to(device)
    totals = ReconstructionTotals(sae.cfg.d_sae)
    ce = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mean": 0.0}
    kl_sum, n_batches = 0.0, 0
    for b in tqdm(range(0, tokens.shape[0], batch_size), desc="evaluate", unit="batch"):
        ids = tokens[b : b + batch_size].long().to(device)
        with capture_residual(lm.model, [hookpoint], stop_after=False) as cap:
            clean_logits = lm.model(input_ids=ids, use_cache=False).logits
        x = cap[hookpoint]
        acts = sae.encode_inference(x.reshape(-1, x.shape[-1]).float())
        x_hat = sae.decode(acts).reshape(x.shape).to(x.dtype)
        rows = slice(exclude_first, None)
        totals.update(x[:, rows].reshape(-1, x.shape[-1]).float(), x_hat[:, rows].reshape(-1, x.shape[-1]).float(),
                      acts.reshape(x.shape[0], x.shape[1], -1)[:, rows].reshape(-1, acts.shape[-1]))
        variants = {
            "sae": lambda h: _keep_first(h, x_hat, exclude_first),
            "zero": lambda h: _keep_first(h, torch.zeros_like(h), exclude_first),
            "mean": lambda h: _keep_first(h, mean.to(h.dtype).expand_as(h), exclude_first),
        }
        ce["clean"] += float(next_token_ce(clean_logits, ids))
        for name, fn in variants.items():
            with patch_residual(lm.model, hookpoint, fn):
                logits = lm.model(input_ids=ids, use_cache=False).logits
            ce[name] += float(next_token_ce(logits, ids))
            if name == "sae":
                log_p = F.log_softmax(clean_logits.float(), -1)
                log_q = F.log_softmax(logits.float(), -1)
                kl_sum += float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        n_batches += 1
    ce = {k: v / n_batches for k, v in ce.items()}
    out = totals.summary()
    out.update({
        "ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero_ablated": ce["zero"], "ce_mean_ablated": ce["mean"],
        "ce_loss_recovered": recovered(ce["clean"], ce["sae"], ce["zero"]),
        "ce_loss_recovered_vs_mean": recovered(ce["clean"], ce["sae"], ce["mean"]),
        "kl_div": kl_sum / n_batches,
        "n_tokens": int(tokens.numel()),
    })
    return out
