"""Feature steering: generate with `strength × A_max × W_dec[f]` added to the residual stream.

For a feature f of an SAE trained at hookpoint `layers.L`, the intervention adds

    v(s) = s · A_max(f) · d_f          d_f = W_dec[f] (the decoder row as stored; SAEs here work on
                                       raw activations, so no de-normalisation is needed)

to the output of block L at every position (prompt and generated tokens alike), through
`saeforge.lm.capture.add_to_residual`. For a `lora` SAE the same v(s) lives in LoRA space: it is
added to the lora_A outputs (before lora_B and its scaling), split by the store's `lora_layout`
into each adapter's rank-r slice (`add_steering`, `activations.lora.add_to_lora`); texts, effect
and KL are computed exactly as for the residual stream, under the layer label "lora". All strengths × prompts of a feature run in one batched,
left-padded `generate` call (chunked to `max_batch` rows); the unsteered "original" rows ride in
the same batch with a zero vector, so original and steered texts share the sampling settings.

Two per-feature measures come out of a run:
- `steering_effect`: text-only, 0.6 × token diversity + 0.4 × text uniqueness (see its docstring);
- `steering_kl`: model-based, mean KL(steered ‖ unsteered) of the next-token distribution over
  the generated tokens (see its docstring).

Outputs (docs/architecture.md, "Formats on disk"), written through `saeforge.interpret.records`:
one steered-texts file per (feature, prompt) (`records.steering_text_path`, seed-shaped
`{"<L>": {"<F>": {"<prompt>": {"original": ..., "-2.0": ..., "1.0": ...}}}}`) and the effects file
(records.EFFECTS) `{"<F>": {"steering_effect": ..., "steering_kl": ...}}`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import random
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saeforge.config import SteeringConfig, parse_strengths
from saeforge.interpret import records as records_io
from saeforge.interpret.records import Records, Steering
from saeforge.lm.capture import add_to_residual
from saeforge.activations.lora import add_to_lora
from saeforge.lm.hookpoints import LORA_HOOKPOINT, canonical_name, layer_label, resolve_hookpoint

log = logging.getLogger(__name__)

ORIGINAL = "original"
EFFECT_MAX_WORDS = 50  # steering_effect looks at the first 50 whitespace tokens of each text


# ---- prompts ---------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"[.!?;:][\"')\]]*\s")


def _prefix(text: str, min_chars: int, max_chars: int) -> str | None:
    """A sentence-ish prefix of the first paragraph with at least `min_chars` characters."""
    for paragraph in text.splitlines() or [text]:
        paragraph = " ".join(paragraph.split())
        if len(paragraph) < min_chars:
            continue
        if len(paragraph) <= max_chars:
            return paragraph
        window = paragraph[: max_chars + 1]
        ends = [m.end() for m in _SENTENCE_END.finditer(window) if min_chars <= m.end() - 1 <= max_chars]
        if ends:
            return window[: ends[-1]].strip()
        cut = window.rfind(" ", min_chars, max_chars + 1)
        return window[: cut if cut > 0 else max_chars].strip()
    return None


def sample_prompts(
    corpus_ds: Any, column: str, n: int, seed: int, min_chars: int = 40, max_chars: int = 200
) -> list[str]:
    """n prompts stratified across the corpus documents, seeded.

    The documents are cut into n equal consecutive strata; one document is drawn at random from
    each (walking on within the stratum past documents without a paragraph of `min_chars`), and
    its first paragraph of at least `min_chars` characters is cut to a sentence boundary (or a
    word boundary) at most `max_chars` long. Duplicates are dropped, so fewer than n may return.
    """
    if n <= 0:
        raise ValueError(f"interpret.steering.n_prompts must be positive, got {n}")
    if min_chars <= 0 or max_chars < min_chars:
        raise ValueError(f"need 0 < min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}")
    n_docs = len(corpus_ds)
    if n_docs == 0:
        raise ValueError("corpus is empty: no documents to sample steering prompts from")
    if column not in corpus_ds.column_names:
        raise ValueError(f"corpus.column={column!r} not in the corpus columns {corpus_ds.column_names}")
    rng = random.Random(seed)
    bounds = [round(i * n_docs / n) for i in range(n + 1)]
    prompts: list[str] = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi <= lo:
            continue
        start = rng.randrange(lo, hi)
        for offset in range(hi - lo):
            text = corpus_ds[lo + (start - lo + offset) % (hi - lo)][column]
            prompt = _prefix(str(text or ""), min_chars, max_chars)
            if prompt is not None:
                if prompt not in prompts:
                    prompts.append(prompt)
                break
    if not prompts:
        raise ValueError(f"no corpus document has a paragraph of at least min_chars={min_chars} characters")
    if len(prompts) < n:
        log.warning("sampled %d steering prompts of the %d asked (corpus has %d documents)", len(prompts), n, n_docs)
    return prompts


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a .json list of strings or a text file (one per line, blank lines skipped)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"interpret.steering.prompts_file={str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise ValueError(f"interpret.steering.prompts_file={str(path)!r}: expected a JSON list of strings")
        prompts = [p for p in data if p.strip()]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"interpret.steering.prompts_file={str(path)!r} contains no prompts")
    return prompts


def resolve_prompts(cfg: SteeringConfig, corpus_ds: Any = None, column: str = "text") -> list[str]:
    """The run's prompts: `prompts_file` when set, else `n_prompts` sampled from the corpus."""
    if cfg.prompts_file:
        return load_prompts(cfg.prompts_file)
    if corpus_ds is None:
        raise ValueError("steering needs prompts: set steering.prompts_file or give a corpus to sample from")
    return sample_prompts(corpus_ds, column, cfg.n_prompts, cfg.seed)


# ---- validation ------------------------------------------------------------------------------


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts is empty: give at least one prompt (a list of strings)")
    out: list[str] = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompts: {p!r} is not a non-empty string")
        if p not in out:
            out.append(p)
    return out


def _check_feature(sae: Any, feature: Any) -> int:
    d_sae = int(sae.W_dec.shape[0])
    if isinstance(feature, Tensor) and feature.numel() == 1:
        feature = feature.item()
    if isinstance(feature, bool) or not isinstance(feature, numbers.Integral):
        raise ValueError(f"feature must be an integer index, got {feature!r}")
    feature = int(feature)
    if not 0 <= feature < d_sae:
        raise ValueError(f"feature={feature} is outside [0, d_sae={d_sae})")
    return feature


def _check_a_max(a_max: Any, feature: int) -> float:
    if isinstance(a_max, bool) or not isinstance(a_max, numbers.Real) or not math.isfinite(float(a_max)):
        raise ValueError(f"a_max of feature {feature} must be a finite number, got {a_max!r}")
    return float(a_max)


def _check_sae_fits(lm: Any, sae: Any, hookpoint: str) -> str:
    d_in = int(sae.W_dec.shape[1])
    if canonical_name(hookpoint) == LORA_HOOKPOINT:
        if not lm.lora_sites:
            raise ValueError("steering at the `lora` hookpoint needs the LM with its adapter attached (activations.lora.with_adapter)")
        width = sum(site.rank for site in lm.lora_sites)
        if d_in != width:
            raise ValueError(f"SAE d_in={d_in} does not match the adapter's LoRA width {width} (layers × types × rank)")
        return LORA_HOOKPOINT
    name = resolve_hookpoint(lm.model, hookpoint).name
    if d_in != lm.d_model:
        raise ValueError(
            f"SAE d_in={d_in} does not match the residual width d_model={lm.d_model} of {lm.name} at {name}"
        )
    return name


# ---- generation ------------------------------------------------------------------------------


class SteeredGeneration(NamedTuple):
    """What `generate_steered` returns; rows are prompt-major: (prompt, "original"), (prompt, s1), ..."""

    texts: dict[str, dict[str, str]]
    """{prompt: {"original": text, "<float(s)>": text, ...}} — continuations only."""
    row_prompts: list[str]
    """Prompt of each row."""
    row_keys: list[str]
    """"original" or str(float(s)) of each row."""
    continuations: list[Tensor]
    """Generated token ids of each row (long, 1-D), cut after the first EOS (kept)."""
    vectors: Tensor
    """Offset of each row [R, d_in] at the hookpoint (zero for "original")."""
    seconds: float
    """Wall time of the generate calls."""


def steering_vector(sae: Any, feature: int, a_max: float) -> Tensor:
    """A_max × d_f with d_f = W_dec[f] as stored (detached, on the SAE's device)."""
    return float(a_max) * sae.W_dec[feature].detach()


def add_steering(lm: Any, hookpoint: str, vectors: Tensor) -> Any:
    """The context manager that adds `vectors` ([d_in] or [B, d_in]) at every position: to the residual
    output of block L for `layers.L`; for `lora`, to the lora_A outputs, each adapter getting its
    rank-r slice in the column order of the manifest's `lora_layout` (`activations.lora.add_to_lora`)."""
    if hookpoint == LORA_HOOKPOINT:
        return add_to_lora(list(lm.lora_sites), vectors)
    return add_to_residual(lm.model, hookpoint, vectors)


@contextmanager
def _left_padding(tokenizer: Any) -> Iterator[None]:
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


@contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch.manual_seed(seed) inside, the caller's RNG state restored after."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _generation_config(model: Any, gen: SteeringConfig, pad_id: int) -> Any:
    config = model.generation_config.__class__.from_dict(model.generation_config.to_dict())
    config.max_new_tokens = gen.max_new_tokens
    config.max_length = None
    config.min_new_tokens = None
    config.do_sample = gen.do_sample
    config.num_beams = 1
    config.pad_token_id = pad_id
    if gen.do_sample:
        config.temperature, config.top_p, config.top_k = gen.temperature, gen.top_p, 0
    else:
        config.temperature = config.top_p = config.top_k = None
    return config


def _trim(ids: Tensor, eos_ids: set[int]) -> Tensor:
    """Continuation ids up to and including the first EOS (the rest is padding)."""
    for i, tok in enumerate(ids.tolist()):
        if tok in eos_ids:
            return ids[: i + 1]
    return ids


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    return eos


def generate_steered(
    lm: Any,
    sae: Any,
    hookpoint: str,
    feature: int,
    a_max: float,
    prompts: Sequence[str],
    strengths: Any,
    gen_cfg: SteeringConfig | None = None,
) -> SteeredGeneration:
    """Batched steered generation for one feature: the continuations `texts` ({prompt: {"original": ...,
    str(float(s)): ...}}) with the token ids.

    Adds `s × a_max × W_dec[feature]` to the residual output of the SAE's hookpoint at every
    position. All prompts × (original + strengths) rows go through one batched, left-padded
    `generate` call per `max_batch` rows; the "original" rows carry a zero vector. Greedy unless
    `do_sample`; sampling uses `temperature`, `top_p` (no top-k) and `torch.manual_seed(seed)`
    before each chunk's generate, so sampled outputs are reproducible for the same batch
    composition (same prompts, strengths and max_batch) — not across different batchings.
    Only the continuation is kept, decoded with special tokens skipped. `gen_cfg` None: the defaults.

    Raises ValueError for a feature outside [0, d_sae), an SAE whose d_in is not the model's
    d_model, empty prompts, or non-numeric strengths.
    """
    gen = gen_cfg if gen_cfg is not None else SteeringConfig()
    prompts = _check_prompts(prompts)
    strengths = parse_strengths(strengths)
    feature = _check_feature(sae, feature)
    a_max = _check_a_max(a_max, feature)
    hookpoint = _check_sae_fits(lm, sae, hookpoint)
    model, tok = lm.model, lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    direction = steering_vector(sae, feature, a_max).to(device=lm.device, dtype=torch.float32)
    keys = [ORIGINAL] + [str(s) for s in strengths]
    scales = [0.0] + strengths
    row_prompts = [p for p in prompts for _ in keys]
    row_keys = [k for _ in prompts for k in keys]
    vectors = torch.stack([s * direction for _ in prompts for s in scales])
    config = _generation_config(model, gen, pad_id)
    eos_ids = _eos_ids(model, tok)
    continuations: list[Tensor] = []
    start = time.perf_counter()
    for lo in range(0, len(row_prompts), gen.max_batch):
        chunk = row_prompts[lo : lo + gen.max_batch]
        with _left_padding(tok):
            enc = tok(chunk, return_tensors="pt", padding=True).to(lm.device)
        steer = add_steering(lm, hookpoint, vectors[lo : lo + len(chunk)])
        with torch.inference_mode(), steer, _seeded(gen.seed, lm.device):
            out = model.generate(**enc, generation_config=config)
        new = out[:, enc["input_ids"].shape[1] :].cpu()
        continuations += [_trim(row, eos_ids) for row in new]
    seconds = time.perf_counter() - start
    texts: dict[str, dict[str, str]] = {p: {} for p in prompts}
    decoded = tok.batch_decode([c.tolist() for c in continuations], skip_special_tokens=True)
    for prompt, key, text in zip(row_prompts, row_keys, decoded):
        texts[prompt][key] = text
    return SteeredGeneration(texts, row_prompts, row_keys, continuations, vectors.cpu(), seconds)


# ---- measures --------------------------------------------------------------------------------


def _flatten_texts(texts: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for value in texts.values():
        if isinstance(value, Mapping):
            out += _flatten_texts(value)
        elif isinstance(value, str) and value:
            out.append(value)
    return out


def steering_effect(texts: Mapping[str, Any]) -> float:
    """Text-only steering effect in [0, 1]: 0.6 × token diversity + 0.4 × text uniqueness.

    The definition of tatsath/autointerp (`autointerp_steer`, `calculate_steering_effect_score`,
    after Kuznetsov et al., Findings of ACL 2025). Over the list T of non-empty texts — the
    original and every steered text; `texts` is one prompt's {key: text} or a feature's
    {prompt: {key: text}}:

        tokens     = concatenation over t ∈ T of t.split()[:50]     (whitespace, case kept)
        diversity  = |set(tokens)| / |tokens|
        uniqueness = |set(T)| / |T|
        effect     = clip(0.6 · diversity + 0.4 · uniqueness, 0, 1);   0 when |T| < 2 or no tokens

    (The reference iterates a fixed key list in which -2.0, -1.0, 1.0 and 2.0 appear twice, so it
    counts those texts twice; here every text counts once.) Note uniqueness is 1/|T|, not 0, when
    all texts are identical, so the score's floor is above 0.
    """
    all_texts = _flatten_texts(texts)
    if len(all_texts) < 2:
        return 0.0
    tokens = [w for t in all_texts for w in t.split()[:EFFECT_MAX_WORDS]]
    if not tokens:
        return 0.0
    diversity = len(set(tokens)) / len(tokens)
    uniqueness = len(set(all_texts)) / len(all_texts)
    return min(1.0, max(0.0, 0.6 * diversity + 0.4 * uniqueness))


def steering_kl(
    lm: Any,
    hookpoint: str,
    prompts: Sequence[str],
    generated: Sequence[Tensor],
    vectors: Tensor,
    max_batch: int = 64,
) -> float:
    """Mean KL(steered ‖ unsteered) of the next-token distribution over the generated tokens.

    Row r is prompt `prompts[r]` followed by its generated ids `generated[r]` (what steered
    generation produced) and carries the residual offset `vectors[r]`. Each (left-padded) batch
    of rows is run teacher-forced twice — with the offset added at `hookpoint` (the steered model
    P) and without (the plain model Q) — and at every position whose next token is a generated
    one, KL(P‖Q) = Σ_v P(v)·(log P(v) − log Q(v)) is taken. The result is the mean over all
    generated tokens of all rows (token-weighted), in nats; 0 for a zero vector. For greedy
    generation P is exactly the distribution the steered text was decoded from.
    """
    if len(prompts) != len(generated) or len(prompts) != vectors.shape[0]:
        raise ValueError(
            f"steering_kl: prompts ({len(prompts)}), generated ({len(generated)}) and vectors "
            f"({vectors.shape[0]}) differ in length"
        )
    model, tok = lm.model, lm.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total, count = 0.0, 0
    for lo in range(0, len(prompts), max_batch):
        rows, n_prompt = [], []
        for prompt, gen in zip(prompts[lo : lo + max_batch], generated[lo : lo + max_batch]):
            ids = tok(prompt).input_ids
            rows.append(list(ids) + gen.tolist())
            n_prompt.append(len(ids))
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        target = torch.zeros((len(rows), width), dtype=torch.bool)  # position predicts a generated token
        for i, (row, n_p) in enumerate(zip(rows, n_prompt)):
            pad = width - len(row)
            input_ids[i, pad:] = torch.tensor(row)
            mask[i, pad:] = 1
            target[i, pad + n_p - 1 : width - 1] = True
        if not bool(target.any()):
            continue
        inputs = {"input_ids": input_ids.to(lm.device), "attention_mask": mask.to(lm.device)}
        vec = vectors[lo : lo + len(rows)].to(lm.device)
        with torch.inference_mode():
            with add_steering(lm, hookpoint, vec):
                steered = model(**inputs, use_cache=False).logits
            plain = model(**inputs, use_cache=False).logits
        target = target.to(lm.device)
        log_p = torch.log_softmax(steered[target].float(), dim=-1)
        log_q = torch.log_softmax(plain[target].float(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0)
        total += float(kl.sum())
        count += int(kl.numel())
    return total / count if count else 0.0


# ---- the stage -------------------------------------------------------------------------------


def steering_file(out_dir: Path, layer: int, feature: int, prompt_index: int) -> Path:
    """Path of one (feature, prompt) output file (`records.steering_text_path`)."""
    return records_io.steering_text_path(out_dir, layer, feature, prompt_index)


def _a_max_of(a_max: Mapping[int, float], feature: int) -> float:
    if feature in a_max:
        return _check_a_max(a_max[feature], feature)
    raise ValueError(f"a_max has no entry for feature {feature} (run the max-activation pass for it first)")


def steer_records(
    lm: Any,
    sae: Any,
    hookpoint: str,
    features: Sequence[int],
    records: Records,
    prompts: Sequence[str] | None,
    cfg: SteeringConfig,
    out_dir: str | Path,
) -> Records:
    """The stage: fill `steering` (texts, effect, KL) of `features`, write their files, and return the records.

    A_max of each feature comes from its record (the max-act pass). `prompts` None →
    `cfg.prompts_file`. A feature whose text files all exist and whose KL is in the effects file
    is skipped (resume): its effect is recomputed from the files and its KL read back. A generated
    feature's effect and KL are written (the effects file, rewritten after every feature) before
    its texts, so complete texts have their KL; a feature with texts but no KL (from older
    versions) or KL but incomplete texts (a run killed between the two) is generated again, so
    texts, effect and KL always come from one generation.
    """
    if prompts is None:
        if not cfg.prompts_file:
            raise ValueError("steering needs prompts: pass them or set steering.prompts_file")
        prompts = load_prompts(cfg.prompts_file)
    prompts = _check_prompts(prompts)
    hookpoint = _check_sae_fits(lm, sae, hookpoint)
    layer = layer_label(hookpoint)
    features = [_check_feature(sae, f) for f in features]
    a_max = records.a_max()
    amax = {f: _a_max_of(a_max, f) for f in features}
    out_dir = Path(out_dir)
    if records.layer is None:
        records.layer = layer
    records_io.read_steering(out_dir, records, texts=False)  # earlier effects: KL of resumed features
    n_tokens, seconds = 0, 0.0
    bar = tqdm(features, desc=f"steering {hookpoint}", unit="feature")
    for feature in bar:
        rec = records.get(feature)
        previous = rec.steering if rec.steering is not None and rec.steering.measured else None
        measured = previous is not None and previous.kl is not None  # texts without KL: generate again
        if measured and records_io.steering_texts_complete(out_dir, layer, feature, len(prompts)):
            texts = records_io.read_steering_texts(out_dir, layer, feature)
            rec.steering = Steering(texts, True, steering_effect(texts), previous.kl)
        else:
            run = generate_steered(lm, sae, hookpoint, feature, amax[feature], prompts, cfg.strengths, cfg)
            steered = [i for i, key in enumerate(run.row_keys) if key != ORIGINAL and float(key) != 0.0]
            kl = steering_kl(
                lm, hookpoint, [run.row_prompts[i] for i in steered], [run.continuations[i] for i in steered],
                run.vectors[steered], max_batch=cfg.max_batch,
            ) if steered else 0.0
            rec.steering = Steering(dict(run.texts), True, steering_effect(run.texts), kl)
            # effect and KL first, then the texts: complete texts on disk always have their KL
            records_io.write_effects(out_dir, records)
            for index, prompt in enumerate(prompts):
                records_io.write_steering_texts(out_dir, layer, feature, index, prompt, run.texts[prompt])
            n_tokens += sum(len(c) for c in run.continuations)
            seconds += run.seconds
            bar.set_postfix(tok_s=f"{n_tokens / max(seconds, 1e-9):.0f}")
            continue
        records_io.write_effects(out_dir, records)
    if seconds:
        log.info("steering %s: %d features, %d generated tokens in %.1f s (%.0f tokens/s)",
                 hookpoint, len(features), n_tokens, seconds, n_tokens / seconds)
    return records


def unfinished(records: Records, features: Sequence[int]) -> dict[int, str]:
    """`{feature: reason}` for each of `features` without a measured steering effect and KL."""
    out: dict[int, str] = {}
    for f in features:
        rec = records.features.get(int(f))
        steer = rec.steering if rec is not None else None
        if steer is None or not steer.measured or steer.effect is None or steer.kl is None:
            out[int(f)] = "no steering effect/KL recorded"
    return out
