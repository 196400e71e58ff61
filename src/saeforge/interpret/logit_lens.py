"""Logit lens of SAE decoder directions, and nearest features by decoder cosine.

    logits_f = (W_dec[f] ⊙ γ) · W_Uᵀ

γ is the final norm's elementwise weight only (RMSNorm / LayerNorm scale; Gemma's RMSNorm
multiplies by 1 + weight, which is used for Gemma models). The normalisation by the RMS/std of
the residual, LayerNorm's mean subtraction and bias, Gemma-2's final logit soft-capping (monotone)
and any unembedding bias are left out: the lens shows which tokens the direction promotes or
suppresses, not calibrated logits. W_U = `model.get_output_embeddings().weight` [vocab, d_model].

LoRA features (`lora_lens`). W_dec[f] lives in the space of the lora_A outputs; its rank-r slice
s_(l,t) of adapter (layer l, type t) maps through that adapter's up-projection to the module's
output, u_(l,t) = scaling · B_(l,t) · s_(l,t). Only o_proj and down_proj write their output into
the residual stream directly, so only they get a lens: per type, the sum over layers
r_t = Σ_l u_(l,t), then logits_t = (r_t ⊙ γ) · W_Uᵀ; the feature's top/bottom tokens are those of
r_o + r_down (its whole direct write to the residual stream). q, k, v, gate and up outputs feed
attention scores, values and the MLP nonlinearity: for them the entry says "not defined" and
gives only ‖u_t‖ = sqrt(Σ_l ‖u_(l,t)‖²). Each LoRA feature also gets its layout: the L2 norm of
every slice s_(l,t) (a layer × type grid) and each type's share Σ_l ‖s_(l,t)‖² / ‖W_dec[f]‖².
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from saeforge.config import LogitLensConfig
from saeforge.interpret.maxact import TokenDecoder
from saeforge.interpret.records import LogitLens, Records
from saeforge.lm.hookpoints import LORA_HOOKPOINT

_FINAL_NORM_PATHS = (
    "model.norm",                      # Llama, Mistral, Qwen, SmolLM, Gemma 1-2
    "model.language_model.norm",       # Gemma 3 multimodal, Llava-style wrappers
    "language_model.model.norm",
    "transformer.ln_f",                # GPT-2, GPT-J, Bloom
    "gpt_neox.final_layer_norm",       # Pythia / GPT-NeoX
    "model.final_layernorm",           # Phi
    "model.decoder.final_layer_norm",  # OPT
)


def find_final_norm(model: nn.Module) -> nn.Module | None:
    """The norm applied before the unembedding: known attribute paths first, else the last
    module named like a norm outside the decoder blocks. None if the model has none."""
    for path in _FINAL_NORM_PATHS:
        module: Any = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.Module):
            return module
    found = None
    for name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower() or name.rsplit(".", 1)[-1].startswith(("ln_f", "norm"))
        inside_block = any(p.isdigit() for p in name.split("."))
        if is_norm and not inside_block and getattr(module, "weight", None) is not None:
            found = module
    return found


def final_norm_scale(model: nn.Module, d_model: int) -> Tensor:
    """γ [d_model] of the final norm (1 + weight for Gemma's RMSNorm); ones when there is none."""
    norm = find_final_norm(model)
    weight = getattr(norm, "weight", None) if norm is not None else None
    if weight is None:
        return torch.ones(d_model)
    gamma = weight.detach().float().cpu()
    if "gemma" in type(norm).__name__.lower():
        gamma = 1.0 + gamma
    return gamma


def logit_lens(
    lm: Any,
    sae: Any,
    features: Sequence[int] | None,
    top_n: int = 10,
    n_neighbours: int = 5,
    chunk_elements: int = 1 << 24,
) -> dict[str, Any]:
    """{"features": {"f": {"top": [[token, logit]...], "bottom": [...], "neighbours": [[id, cos]...]}}}.

    `features=None` means all. Logits and cosines are computed for chunks of features so that one
    chunk holds at most `chunk_elements` floats (vocab or d_sae wide); neighbours exclude the
    feature itself.
    """
    W_dec = sae.W_dec.detach().float().cpu()
    d_sae, d_in = W_dec.shape
    feats = list(range(d_sae)) if features is None else list(dict.fromkeys(int(f) for f in features))
    bad = [f for f in feats if not 0 <= f < d_sae]
    if bad:
        raise ValueError(f"features must be ids in [0, {d_sae}), got {bad[:10]}")
    W_U = lm.model.get_output_embeddings().weight.detach().float().cpu()  # [vocab, d_model]
    if W_U.shape[1] != d_in:
        raise ValueError(f"SAE d_in={d_in} does not match the unembedding width {W_U.shape[1]}")
    gamma = final_norm_scale(lm.model, d_in)
    W_U_t = W_U.t()  # a view: (W_dec[f] ⊙ γ) · W_Uᵀ without copying the (possibly 262k-row) unembedding
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    decode = TokenDecoder(lm.tokenizer)
    n_top = min(top_n, W_U.shape[0])
    n_nb = min(n_neighbours, d_sae - 1)
    out: dict[str, Any] = {}
    idx = torch.tensor(feats, dtype=torch.long)
    chunk = max(1, chunk_elements // max(W_U.shape[0], d_sae))
    with torch.inference_mode():
        for s in range(0, len(feats), chunk):
            f = idx[s : s + chunk]
            logits = (W_dec[f] * gamma) @ W_U_t
            top_v, top_i = logits.topk(n_top, dim=1)
            bot_v, bot_i = logits.topk(n_top, dim=1, largest=False)
            cos = unit[f] @ unit.t()
            cos[torch.arange(len(f)), f] = -torch.inf
            nb_v, nb_i = cos.topk(n_nb, dim=1) if n_nb > 0 else (cos[:, :0], f[:, None][:, :0])
            for r, fid in enumerate(f.tolist()):
                out[str(fid)] = {
                    "top": [[t, round(v, 5)] for t, v in zip(decode(top_i[r].tolist()), top_v[r].tolist())],
                    "bottom": [[t, round(v, 5)] for t, v in zip(decode(bot_i[r].tolist()), bot_v[r].tolist())],
                    "neighbours": [[i, round(v, 5)] for i, v in zip(nb_i[r].tolist(), nb_v[r].tolist())],
                }
    return {"features": out}


RESIDUAL_TYPES = ("o", "down")
"""LoRA types whose module output is added to the residual stream directly (they get a logit lens)."""


def _neighbours(W_dec: Tensor, feats: list[int], n_neighbours: int) -> dict[int, list[list[Any]]]:
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n_nb = min(n_neighbours, W_dec.shape[0] - 1)
    out: dict[int, list[list[Any]]] = {}
    for f in feats:
        cos = unit[f] @ unit.t()
        cos[f] = -torch.inf
        v, i = cos.topk(n_nb) if n_nb > 0 else (cos[:0], cos[:0].long())
        out[f] = [[a, round(b, 5)] for a, b in zip(i.tolist(), v.tolist())]
    return out


def lora_lens(lm: Any, sae: Any, features: Sequence[int], top_n: int = 10, n_neighbours: int = 5) -> dict[str, Any]:
    """The lens of `lora` SAE features (module docstring): {"features": {"f": {top, bottom, neighbours,
    by_type, layout}}}. `lm.lora_sites` (the adapter attached) gives each slice's B and scaling."""
    sites = list(lm.lora_sites)
    if not sites:
        raise ValueError("the logit lens of a `lora` SAE needs the LM with its adapter attached (activations.lora.with_adapter)")
    W_dec = sae.W_dec.detach().float().cpu()
    width = sum(site.rank for site in sites)
    if W_dec.shape[1] != width:
        raise ValueError(f"SAE d_in={W_dec.shape[1]} does not match the adapter's LoRA width {width}")
    types = list(dict.fromkeys(site.kind for site in sites))
    layers = sorted({site.layer for site in sites})
    W_U_t = lm.model.get_output_embeddings().weight.detach().float().cpu().t()
    gamma = final_norm_scale(lm.model, W_U_t.shape[0])
    decode = TokenDecoder(lm.tokenizer)
    n_top = min(top_n, W_U_t.shape[1])
    feats = list(dict.fromkeys(int(f) for f in features))
    neighbours = _neighbours(W_dec, feats, n_neighbours)

    def tokens(direction: Tensor) -> tuple[list[list[Any]], list[list[Any]]]:
        logits = (direction * gamma) @ W_U_t
        top_v, top_i = logits.topk(n_top)
        bot_v, bot_i = logits.topk(n_top, largest=False)
        return ([[t, round(v, 5)] for t, v in zip(decode(top_i.tolist()), top_v.tolist())],
                [[t, round(v, 5)] for t, v in zip(decode(bot_i.tolist()), bot_v.tolist())])

    out: dict[str, Any] = {}
    with torch.inference_mode():
        for f in feats:
            w = W_dec[f]
            norms = [[0.0] * len(types) for _ in layers]
            mapped_sq = dict.fromkeys(types, 0.0)
            residual: dict[str, Tensor] = {}
            start = 0
            for site in sites:
                part = w[start : start + site.rank]
                start += site.rank
                norms[layers.index(site.layer)][types.index(site.kind)] = float(part.norm())
                if site.up is None:
                    continue
                mapped = site.scaling * (site.up.weight.detach().float().cpu() @ part)
                mapped_sq[site.kind] += float(mapped.square().sum())
                if site.kind in RESIDUAL_TYPES:
                    residual[site.kind] = residual.get(site.kind, 0) + mapped
            total = float(w.square().sum()) or 1.0
            share = {t: round(sum(row[i] ** 2 for row in norms) / total, 5) for i, t in enumerate(types)}
            by_type: dict[str, Any] = {}
            for t in types:
                entry: dict[str, Any] = {"defined": t in residual, "norm": round(mapped_sq[t] ** 0.5, 5)}
                if t in residual:
                    entry["top"], entry["bottom"] = tokens(residual[t])
                else:
                    entry["note"] = f"not defined: the {t}_proj output does not enter the residual stream directly"
                by_type[t] = entry
            top, bottom = tokens(sum(residual.values())) if residual else ([], [])
            out[str(f)] = {"top": top, "bottom": bottom, "neighbours": neighbours[f], "by_type": by_type,
                           "layout": {"layers": layers, "types": types,
                                      "norms": [[round(v, 5) for v in row] for row in norms], "share": share}}
    return {"features": out}


def lens_records(lm: Any, sae: Any, records: Records, cfg: LogitLensConfig | None = None,
                 hookpoint: str | None = None) -> Records:
    """The stage: fill `logit_lens` of every record (all of `records`' features, in their order) and
    return them (`cfg` None: the defaults; `hookpoint` "lora": `lora_lens`)."""
    cfg = cfg if cfg is not None else LogitLensConfig()
    lens = lora_lens if hookpoint == LORA_HOOKPOINT else logit_lens
    result = lens(lm, sae, list(records.features), int(cfg.top_n), int(cfg.n_neighbours))
    for f, entry in result["features"].items():
        records.get(int(f)).logit_lens = LogitLens.from_json(entry)
    return records
