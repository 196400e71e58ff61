"""Max-activating examples, activation statistics and non-activating windows, in one streaming pass.

The pass walks the token windows in batches: forward to the hookpoint (or read the stored rows),
`sae.encode_inference`, then merges every batch into fixed-size per-feature state, all in torch:

- **top** [F, N]: the N largest activations (value, flat token index, the feature's acts over the
  display context). Merged per batch with a top-k over [state ‖ batch candidates], only for the
  features whose best candidate beats their current N-th value. With `one_per_window` (default,
  delphi-style) a window contributes at most one candidate per feature: its max token.
- **quantile reservoirs** [F, G, k]: a uniform sample (without replacement) of the activating
  windows of each activation bucket, drawn as *bottom-k random keys*: every (feature, window) gets
  a seeded uniform key and each bucket keeps its k smallest keys. Bottom-k samples merge exactly
  (the bottom-k of a union lies in the union of the bottom-ks), which gives one pass without
  knowing A_max in advance: buckets live on [0, S_f] with S_f = 2^⌈log2 running max⌉, and when
  S_f doubles d times fine bucket g folds into g >> d. There are G = n_quantiles·bucket_resolution
  fine buckets; at the end fine bucket g goes to output bucket ⌊n_quantiles·mid_g / A_max⌋ and
  each output bucket keeps the bottom-k keys of its fine buckets. So output bucket i is
  [i, i+1)·A_max/n_quantiles up to ±S_f/(2G) ≤ A_max/G at its edges, and within it the sample is
  exactly uniform. A window's activation is its max over positions (as in delphi).
- **histogram** [F, H] of nonzero per-token activations on the same doubling grid
  (H = hist_bins·hist_resolution internal bins), re-binned at the end into `hist_bins` bins of
  (nearly) equal width over [0, top of the last occupied bin]; `quantiles` are interpolated from it.
- **non-activating** [F, M]: bottom-M random keys over the windows where the feature is zero at
  every (non-excluded) position; a seeded random slice of the display length is reported.

Per-token context acts are stored when an example enters the state (top: float32, quantile
reservoirs: float16), so no second pass over the windows is needed; that state is
O(F·(N + G·k)·(context_left + context_right + 1)). Nothing in the state grows with n_tokens.

The first `exclude_first_tokens` positions of every window (BOS and the first token: attention
sinks whose norm is ~100× the rest, excluded from training the same way) and, with `exclude_bos`,
any other BOS position are zeroed before everything: they count in no maximum, frequency or
histogram, and `n_tokens` counts only the other positions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saeforge.activations.readers import RowSource, read_chunk
from saeforge.config import ConfigError, MaxActConfig
from saeforge.interpret.records import Records
from saeforge.lm.capture import capture_residual, run_until_captured
from saeforge.lm.hookpoints import LORA_HOOKPOINT, canonical_name, layer_label

log = logging.getLogger(__name__)

_UNSET_EXP = -(2**20)  # exponent of S_f for a feature that has not fired yet


@dataclass
class MaxActResult:
    """What `collect_maxact` returns; `to_records()` gives the feature records (records.MAXACT holds them)."""

    hookpoint: str
    layer: int | None
    d_sae: int
    n_tokens: int
    """Tokens counted in the statistics (excluded positions not counted)."""
    ctx_len: int
    features: dict[int, dict[str, Any]]
    """Per feature: frequency, a_max, n_fired, quantiles, histogram, top, quantile_examples, non_activating."""
    quantile_levels: list[float] = field(default_factory=list)

    def to_records(self) -> Records:
        """The feature records, each with its max-act part filled."""
        recs = Records(hookpoint=self.hookpoint, layer=self.layer, d_sae=self.d_sae, n_tokens=self.n_tokens,
                       ctx_len=self.ctx_len, quantile_levels=list(self.quantile_levels))
        for f, entry in self.features.items():
            recs.get(f).set_maxact(entry)
        return recs

    def to_json(self) -> dict[str, Any]:
        """The max-act document (without format_version)."""
        return self.to_records().maxact_entry()


class TokenDecoder:
    """Per-token display strings (`convert_ids_to_tokens` → `convert_tokens_to_string` of each token),
    so byte-level markers become text (`Ġ` → space, `Ċ` → newline); cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: Sequence[int]) -> list[str]:
        missing = sorted({i for i in ids if i not in self.cache})
        if missing:
            for i, tok in zip(missing, self.tokenizer.convert_ids_to_tokens(missing)):
                self.cache[i] = self.tokenizer.convert_tokens_to_string([tok]) if tok is not None else ""
        return [self.cache[i] for i in ids]


# ------------------------------------------------------------------------------ streaming state
class _State:
    """Fixed-size per-feature state of the pass (see the module docstring)."""

    def __init__(self, n_feat: int, cfg: MaxActConfig, ctx_len: int, device: torch.device) -> None:
        F, N, L = n_feat, cfg.n_examples, cfg.context_len
        self.cfg, self.T, self.L = cfg, ctx_len, L
        self.G, self.K = cfg.n_quantiles * cfg.bucket_resolution, cfg.examples_per_quantile
        self.H, self.M = cfg.hist_bins * cfg.hist_resolution, cfg.n_non_activating
        self.offsets = torch.arange(L, device=device) - cfg.context_left
        self.a_max = torch.zeros(F, device=device)
        self.exp = torch.full((F,), _UNSET_EXP, dtype=torch.int64, device=device)
        self.hist = torch.zeros(F, self.H, dtype=torch.int64, device=device)
        self.top_val = torch.full((F, N), -torch.inf, device=device)
        self.top_loc = torch.full((F, N), -1, dtype=torch.int64, device=device)
        self.top_ctx = torch.zeros(F, N, L, device=device)
        self.top_min = torch.full((F,), -torch.inf, device=device)
        self.res_key = torch.full((F * self.G, self.K), torch.inf, device=device)
        self.res_kmax = torch.full((F * self.G,), torch.inf, device=device)  # largest key (inf: a free slot)
        self.res_val = torch.zeros(F * self.G, self.K, device=device)
        self.res_loc = torch.full((F * self.G, self.K), -1, dtype=torch.int64, device=device)
        self.res_ctx = torch.zeros(F * self.G, self.K, L, dtype=torch.float16, device=device)
        self.na_key = torch.full((F, self.M), torch.inf, device=device)
        self.na_seq = torch.full((F, self.M), -1, dtype=torch.int64, device=device)
        self.n_tokens = 0
        self.rng = torch.Generator().manual_seed(cfg.seed)

    def scale(self, f: Tensor | None = None) -> Tensor:
        """S_f = 2^exp (float), the top of the doubling grid."""
        exp = self.exp if f is None else self.exp[f]
        return torch.ldexp(torch.ones_like(exp, dtype=torch.float32), exp.clamp_min(-126).to(torch.int32))

    def contexts(self, acts3: Tensor, b: Tensor, pos: Tensor, f: Tensor) -> Tensor:
        """The feature's acts over the display context of (window b, position pos) → [n, L], 0 off the window."""
        p = pos[:, None] + self.offsets
        valid = (p >= 0) & (p < self.T)
        F = acts3.shape[2]
        flat = ((b[:, None] * self.T + p.clamp(0, self.T - 1)) * F + f[:, None]).flatten()
        return acts3.reshape(-1).take(flat).view_as(p) * valid

    # ---- one batch ---------------------------------------------------------------------------
    def update(self, acts: Tensor, seq0: int, counted: int) -> None:
        """Merge acts [B·T, F] of windows seq0 … seq0+B−1 (already zeroed at excluded positions)."""
        T = self.T
        B = acts.shape[0] // T
        acts3 = acts.view(B, T, -1)
        self.n_tokens += counted
        win_max, win_arg = acts3.max(1)  # [B, F]
        batch_max = win_max.max(0).values
        self.a_max = torch.maximum(self.a_max, batch_max)
        new_exp = torch.where(batch_max > 0, torch.frexp(batch_max).exponent.to(torch.int64), _UNSET_EXP)
        grow = (new_exp > self.exp).nonzero().squeeze(1)
        if grow.numel():
            self._rescale(grow, new_exp[grow])
        self._histogram(acts)
        self._top(acts3, win_max, win_arg, seq0)
        keys = torch.rand(2, B, acts.shape[1], generator=self.rng).to(acts.device)
        self._quantile_reservoir(acts3, win_max, win_arg, seq0, keys[0])
        self._non_activating(win_max, seq0, keys[1])

    def _rescale(self, f: Tensor, new_exp: Tensor) -> None:
        """S_f doubles d times: fine bin/bucket g folds into g >> d (exact for counts and bottom-k)."""
        d = (new_exp - self.exp[f]).clamp_max(62)
        self.exp[f] = new_exp
        bins = torch.arange(self.H, device=f.device)[None, :] >> d[:, None]
        self.hist[f] = torch.zeros_like(self.hist[f]).scatter_add_(1, bins, self.hist[f])
        seg = (f[:, None] * self.G + torch.arange(self.G, device=f.device)).flatten()  # [n·G], ascending
        slot = self.res_key[seg].isfinite().nonzero(as_tuple=True)
        if slot[0].numel() == 0:
            return
        old_seg, old_slot = seg[slot[0]], slot[1]
        key, val = self.res_key[old_seg, old_slot], self.res_val[old_seg, old_slot]
        loc, ctx = self.res_loc[old_seg, old_slot], self.res_ctx[old_seg, old_slot]
        self.res_key[seg], self.res_kmax[seg] = torch.inf, torch.inf
        fi = old_seg // self.G
        shift = d[torch.searchsorted(f, fi)]  # d of each entry's feature (f is ascending)
        new_seg = fi * self.G + ((old_seg % self.G) >> shift)
        j, ts, tk = self._admit(new_seg, key)
        self.res_val[ts, tk], self.res_loc[ts, tk], self.res_ctx[ts, tk] = val[j], loc[j], ctx[j]

    def _histogram(self, acts: Tensor) -> None:
        flat = acts.reshape(-1)
        idx = (flat > 0).nonzero().squeeze(1)
        f = idx % acts.shape[1]
        bins = (flat[idx] * (self.H / self.scale())[f]).long().clamp_max(self.H - 1)
        self.hist.view(-1).index_add_(0, f * self.H + bins, torch.ones_like(bins))

    def _top(self, acts3: Tensor, win_max: Tensor, win_arg: Tensor, seq0: int) -> None:
        """Slots are unordered: each entering candidate takes the slot of an evicted entry."""
        B, T, F = acts3.shape
        N = self.cfg.n_examples
        if self.cfg.one_per_window:
            cand = win_max.t()  # [F, B]
            loc = (seq0 + torch.arange(B, device=acts3.device))[None, :] * T + win_arg.t()
        else:
            cand = acts3.reshape(B * T, F).t()
            loc = (seq0 * T + torch.arange(B * T, device=acts3.device)).expand(F, -1)
        if cand.shape[1] > N:
            cand, idx = cand.topk(N, dim=1)
            loc = loc.gather(1, idx)
        cand = torch.where(cand > 0, cand, -torch.inf)
        rows = (cand.max(1).values > self.top_min).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        cand, loc = cand[rows], loc[rows]
        all_val = torch.cat([self.top_val[rows], cand], 1)
        keep = torch.zeros_like(all_val, dtype=torch.bool).scatter_(1, all_val.topk(N, dim=1).indices, True)
        er, es = (~keep[:, :N]).nonzero(as_tuple=True)  # evicted slots, row-major
        cr, cc = keep[:, N:].nonzero(as_tuple=True)     # entering candidates, row-major: same count per row
        r = rows[er]
        new_loc = loc[cr, cc]
        self.top_val[r, es] = cand[cr, cc]
        self.top_loc[r, es] = new_loc
        self.top_ctx[r, es] = self.contexts(acts3, new_loc // T - seq0, new_loc % T, r)
        self.top_min[rows] = self.top_val[rows].min(1).values

    def _quantile_reservoir(self, acts3: Tensor, win_max: Tensor, win_arg: Tensor, seq0: int, keys: Tensor) -> None:
        T = acts3.shape[1]
        b, f = (win_max > 0).nonzero(as_tuple=True)
        v = win_max[b, f]
        seg = f * self.G + (v / self.scale(f) * self.G).long().clamp_max(self.G - 1)
        key = keys[b, f]
        ok = (key < self.res_kmax[seg]).nonzero().squeeze(1)
        if ok.numel() == 0:
            return
        j, ts, tk = self._admit(seg[ok], key[ok])
        j = ok[j]
        b, f, pos = b[j], f[j], win_arg[b[j], f[j]]
        self.res_val[ts, tk] = v[j]
        self.res_loc[ts, tk] = (seq0 + b) * T + pos
        self.res_ctx[ts, tk] = self.contexts(acts3, b, pos, f).to(self.res_ctx.dtype)

    def _admit(self, seg: Tensor, key: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Bottom-K keys per segment over (current slots ∪ new (seg, key) entries).

        Writes the keys; returns (index of each entering entry, its segment, its slot) so that the
        caller writes the payload. Entering entries take the slots of evicted ones (or empty slots).
        """
        K = self.K
        useg, inv = seg.unique(return_inverse=True)
        U = useg.numel()
        all_key = torch.cat([self.res_key[useg].flatten(), key])
        all_seg = torch.cat([torch.arange(U, device=seg.device).repeat_interleave(K), inv])
        order = (all_seg.double() * 2 + all_key.double().clamp_max(1.5)).sort().indices  # keys ∈ [0, 1)
        s_sorted = all_seg[order]
        rank = torch.arange(order.numel(), device=seg.device) - torch.searchsorted(s_sorted, s_sorted)
        kept = torch.zeros(order.numel(), dtype=torch.bool, device=seg.device)
        kept[order[rank < K]] = True
        eu, eslot = (~kept[: U * K].view(U, K)).nonzero(as_tuple=True)  # evicted, ordered by segment
        j = kept[U * K :].nonzero().squeeze(1)
        j = j[inv[j].sort(stable=True).indices]  # entering, ordered by segment: pairs with evicted
        ts = useg[eu]
        self.res_key[ts, eslot] = key[j]
        self.res_kmax[useg] = self.res_key[useg].max(1).values
        return j, ts, eslot

    def _non_activating(self, win_max: Tensor, seq0: int, keys: Tensor) -> None:
        if self.M == 0:
            return
        B = win_max.shape[0]
        cand = torch.where(win_max == 0, keys, torch.inf).t()  # [F, B]
        seqs = (seq0 + torch.arange(B, device=win_max.device)).expand(cand.shape[0], -1)
        all_key = torch.cat([self.na_key, cand], 1)
        k = min(self.M, all_key.shape[1])
        self.na_key, sel = all_key.topk(k, dim=1, largest=False)
        self.na_seq = torch.cat([self.na_seq, seqs], 1).gather(1, sel)


# ------------------------------------------------------------------------------ the pass
def _stored_batches(source: RowSource, rows_per_batch: int, n_rows: int) -> Iterator[Tensor]:
    """Consecutive blocks of `rows_per_batch` rows (the last may be shorter), reading chunk by chunk."""
    buf: list[Tensor] = []
    have = done = 0
    for chunk in source.chunks:
        if done + have >= n_rows:
            break
        rows = read_chunk(chunk)
        buf.append(rows)
        have += rows.shape[0]
        while have >= rows_per_batch and done < n_rows:
            block = torch.cat(buf)
            take = min(rows_per_batch, n_rows - done)
            yield block[:take]
            buf, have, done = [block[take:]], have - take, done + take
    if done < n_rows and have:
        yield torch.cat(buf)[: n_rows - done]


def collect_maxact(
    lm: Any,
    sae: Any,
    hookpoint: str,
    tokens: Tensor,
    cfg: MaxActConfig | None = None,
    features: Sequence[int] | None = None,
    activations: RowSource | None = None,
    exclude_first_tokens: int = 2,
) -> MaxActResult:
    """One streaming pass over `tokens` [n_seq, ctx_len]: top examples, quantile examples,
    non-activating windows, frequency, histogram and quantiles per feature (module docstring).

    `lm` is a `LoadedLM` (its tokenizer decodes the contexts; its model runs unless `activations`,
    a RowSource of the stored rows of this hookpoint in token order, is given). `sae` takes raw
    activations (`encode_inference`). `features=None` means all features. The first
    `exclude_first_tokens` positions of every window (the training run's `data.exclude_first_tokens`)
    count in no statistic. `cfg` None: the defaults.
    """
    conf = cfg if cfg is not None else MaxActConfig()
    if exclude_first_tokens < 0:
        raise ConfigError(f"data.exclude_first_tokens must be >= 0, got {exclude_first_tokens}")
    tokens = torch.as_tensor(tokens)
    if tokens.dim() != 2 or tokens.shape[0] == 0:
        raise ValueError(f"tokens must be [n_seq, ctx_len] with n_seq > 0, got shape {tuple(tokens.shape)}")
    n_seq, T = tokens.shape
    d_sae = int(sae.cfg.d_sae)
    if features is None:
        cols = None
        feat_ids = list(range(d_sae))
    else:
        feat_ids = list(dict.fromkeys(int(f) for f in features))
        bad = [f for f in feat_ids if not 0 <= f < d_sae]
        if bad or not feat_ids:
            raise ValueError(f"features must be non-empty ids in [0, {d_sae}), got bad ids {bad[:10]}")
        cols = torch.tensor(feat_ids)
    if activations is not None:
        if activations.n_rows < n_seq * T:
            raise ValueError(f"{activations.description}: {activations.n_rows} rows < {n_seq}×{T} tokens")
        if activations.d_in != sae.cfg.d_in:
            raise ValueError(f"{activations.description}: width {activations.d_in} != SAE d_in {sae.cfg.d_in}")
    device = next(sae.parameters()).device
    cols = cols.to(device) if cols is not None else None
    state = _State(len(feat_ids), conf, T, device)
    bos = lm.tokenizer.bos_token_id if conf.exclude_bos else None
    hookpoint = canonical_name(hookpoint)
    B = conf.batch_size

    def encode(x: Tensor, seq0: int) -> None:
        toks = tokens[seq0 : seq0 + x.shape[0] // T].to(device)
        with torch.inference_mode():
            acts = sae.encode_inference(x.to(device=device, dtype=sae.W_enc.dtype))
            if cols is not None:
                acts = acts.index_select(1, cols)
            excluded = torch.zeros(toks.shape, dtype=torch.bool, device=device)
            excluded[:, :exclude_first_tokens] = True
            if bos is not None:
                excluded |= toks == bos
            excluded = excluded.flatten()
            acts[excluded] = 0
            state.update(acts.float(), seq0, x.shape[0] - int(excluded.sum()))

    bar = tqdm(total=n_seq * T, unit="tok", unit_scale=True, desc=f"maxact {hookpoint}", disable=not conf.progress)
    start = time.perf_counter()
    try:
        if activations is not None:
            for i, x in enumerate(_stored_batches(activations, B * T, n_seq * T)):
                encode(x, i * B)
                bar.update(x.shape[0])
        elif hookpoint == LORA_HOOKPOINT:
            from saeforge.activations.lora import lora_activations

            if not lm.lora_sites:
                raise ValueError("maxact at the `lora` hookpoint needs the LM with its adapter attached (activations.lora.with_adapter)")
            for seq0 in range(0, n_seq, B):
                ids = tokens[seq0 : seq0 + B].to(device=lm.device, dtype=torch.long)
                x = lora_activations(lm.model, list(lm.lora_sites), ids)
                encode(x.reshape(-1, x.shape[-1]), seq0)
                bar.update(ids.numel())
        else:
            model = lm.model
            with capture_residual(model, [hookpoint], stop_after=True) as captured:
                for seq0 in range(0, n_seq, B):
                    ids = tokens[seq0 : seq0 + B].to(device=lm.device, dtype=torch.long)
                    run_until_captured(model, input_ids=ids)
                    x = captured.pop(hookpoint)
                    encode(x.reshape(-1, x.shape[-1]), seq0)
                    bar.update(ids.numel())
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    log.info("maxact %s: %d tokens in %.1f s (%.0f tokens/s)", hookpoint, n_seq * T, elapsed,
             n_seq * T / max(elapsed, 1e-9))
    return MaxActResult(
        hookpoint=hookpoint, layer=layer_label(hookpoint), d_sae=d_sae, n_tokens=state.n_tokens,
        ctx_len=T, features=_assemble(state, conf, feat_ids, tokens, TokenDecoder(lm.tokenizer)),
        quantile_levels=list(conf.quantile_levels),
    )


# ------------------------------------------------------------------------------ output
def _r(x: float, nd: int = 5) -> float:
    return round(float(x), nd)


def _histogram_out(counts: Tensor, scale: float, hist_bins: int) -> dict[str, list]:
    """Re-bin the occupied internal bins into ≤ hist_bins bins of (nearly) equal width."""
    nz = counts.nonzero()
    if nz.numel() == 0:
        return {"edges": [], "counts": []}
    used = int(nz[-1]) + 1
    n_out = min(hist_bins, used)
    idx = torch.linspace(0, used, n_out + 1).round().long()
    cum = torch.cat([counts.new_zeros(1), counts[:used].cumsum(0)])
    width = scale / counts.numel()
    return {"edges": [_r(i * width, 6) for i in idx.tolist()], "counts": (cum[idx[1:]] - cum[idx[:-1]]).tolist()}


def _quantiles(hist: Tensor, scale: Tensor, a_max: Tensor, levels: Sequence[float]) -> Tensor:
    """Quantiles [F, len(levels)] of the nonzero acts, linearly interpolated inside histogram bins."""
    F, H = hist.shape
    if not levels:
        return torch.zeros(F, 0)
    total = hist.sum(1, keepdim=True).clamp_min(1).double()
    cdf = hist.cumsum(1).double() / total
    q = torch.tensor(levels, dtype=torch.float64).expand(F, -1).contiguous()
    b = torch.searchsorted(cdf, q).clamp_max(H - 1)
    c1 = cdf.gather(1, b)
    c0 = torch.where(b > 0, cdf.gather(1, (b - 1).clamp_min(0)), 0.0)
    frac = ((q - c0) / (c1 - c0).clamp_min(1e-12)).clamp(0, 1)
    vals = (b + frac) * (scale.double()[:, None] / H)
    return torch.minimum(vals, a_max.double()[:, None]).float()


def _quantile_picks(state: _State, conf: MaxActConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Map fine buckets to the n_quantiles output buckets; bottom-k keys per output bucket.
    Returns (feature, bucket, reservoir slot index into the flattened [F·G·K] state)."""
    G, K, Q = state.G, state.K, conf.n_quantiles
    F = state.a_max.shape[0]
    keys = state.res_key.view(F, G * K)
    fi, j = keys.isfinite().nonzero(as_tuple=True)
    if fi.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty, empty
    g = j // K
    mid = (g.double() + 0.5) * state.scale(fi).double() / G
    bucket = (mid / state.a_max[fi].double() * Q).long().clamp(0, Q - 1)
    seg = fi * Q + bucket
    key = keys[fi, j]
    order = key.sort(stable=True).indices
    order = order[seg[order].sort(stable=True).indices]
    s_sorted = seg[order]
    rank = torch.arange(order.numel()) - torch.searchsorted(s_sorted, s_sorted)
    keep = order[rank < K]
    return fi[keep], bucket[keep], fi[keep] * G * K + j[keep]


def _assemble(state: _State, conf: MaxActConfig, feat_ids: list[int], tokens: Tensor,
              decode: TokenDecoder) -> dict[int, dict[str, Any]]:
    """JSON-ready per-feature entries from the final state (CPU)."""
    for name, value in vars(state).items():
        if isinstance(value, Tensor):
            setattr(state, name, value.cpu())
    T, L, left = state.T, state.L, conf.context_left
    tok_list = tokens.tolist()
    n_tok = max(state.n_tokens, 1)
    scale = state.scale()
    quant = _quantiles(state.hist, scale, state.a_max, conf.quantile_levels).tolist()

    def example(loc: int, value: float, ctx: list[float]) -> dict[str, Any]:
        seq, pos = divmod(loc, T)
        start, stop = max(0, pos - left), min(T, pos + conf.context_right + 1)
        ids = tok_list[seq][start:stop]
        acts = ctx[start - (pos - left) : stop - (pos - left)]
        return {"activation": _r(value), "tokens": decode(ids), "token_ids": ids, "acts": [_r(a, 4) for a in acts],
                "max_pos": pos - start, "seq": seq, "start": start}

    qf, qb, qslot = _quantile_picks(state, conf)
    flat_val = state.res_val.flatten()
    flat_loc = state.res_loc.flatten()
    flat_ctx = state.res_ctx.float().flatten(0, 1)
    q_by_feature: dict[int, list[tuple[int, float, int, int]]] = {}
    for fi, b, s, v, loc in zip(qf.tolist(), qb.tolist(), qslot.tolist(), flat_val[qslot].tolist(), flat_loc[qslot].tolist()):
        q_by_feature.setdefault(fi, []).append((b, v, s, loc))

    gen = torch.Generator().manual_seed(conf.seed + 1)
    lo = 1 if T > L else 0  # skip window position 0 (BOS in packed windows) when there is room
    na_starts = torch.randint(lo, max(lo, T - L) + 1, tuple(state.na_seq.shape), generator=gen).tolist()

    top_val, top_order = state.top_val.sort(dim=1, descending=True)
    top_loc = state.top_loc.gather(1, top_order).tolist()
    top_val, top_order = top_val.tolist(), top_order.tolist()
    n_fired_all = state.hist.sum(1).tolist()
    na_key, na_seq = state.na_key.isfinite().tolist(), state.na_seq.tolist()
    out: dict[int, dict[str, Any]] = {}
    for i, f in enumerate(feat_ids):
        n_fired = int(n_fired_all[i])
        a_max = float(state.a_max[i])
        entry: dict[str, Any] = {
            "feature": f, "frequency": n_fired / n_tok, "a_max": _r(a_max), "n_fired": n_fired,
            "quantiles": [_r(q) for q in quant[i]] if n_fired else [],
            "histogram": _histogram_out(state.hist[i], float(scale[i]), conf.hist_bins),
        }
        top = []
        for n, v, loc in zip(top_order[i], top_val[i], top_loc[i]):
            if loc < 0 or not v > 0:
                break
            top.append(example(loc, v, state.top_ctx[i, n].tolist()))
        entry["top"] = top
        qex = []
        for b, v, s, loc in sorted(q_by_feature.get(i, []), key=lambda e: (e[0], -e[1])):
            qex.append({"bucket": b, **example(loc, v, flat_ctx[s].tolist())})
        entry["quantile_examples"] = qex
        non = []
        for ok, seq, start in zip(na_key[i], na_seq[i], na_starts[i]):
            if ok:
                start = min(start, max(0, T - L))
                ids = tok_list[seq][start : start + L]
                non.append({"tokens": decode(ids), "token_ids": ids, "seq": seq, "start": start})
        entry["non_activating"] = non
        out[f] = entry
    return out
