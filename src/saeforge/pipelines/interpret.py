"""`python interpret.py ckpt=...`: maxact → logit_lens → steering → explain → score → dashboard.

Outputs live under `<run.dir>/interpret/<hookpoint>/` (docs/architecture.md), read and written only
through `saeforge.interpret.records`; stages pass `Records` between them. The stages file
(records.STAGES) remembers, per stage, a fingerprint of its settings, the features and the
fingerprints of the stages it reads; a rerun skips a stage whose fingerprint is unchanged and
whose output exists, and the per-feature stages (steering, explain) skip finished features on
their own. The LM is loaded once, lazily, and shared by every stage that needs it.

Completeness: after steering, explain and score, `CHECKS` lists the features that did not reach a
final state (steering: no effect/KL; explain: an `error` or missing explanation — `ok`,
`parse_error` and `skipped` are final, see records.FINAL_STATUSES; score: an LLM scorer's failed
requests). Such a stage is recorded `complete: false` with its failures, is not skipped by the
next run, and that run asks again only the failed and missing features (explain keeps the final
statuses; score rescores, the response cache answering what already succeeded). A stage that
reads an incomplete stage gets a different fingerprint, so it reruns once that stage completes.
The run goes on through the later stages, prints a summary of the failures grouped by reason, and
then raises `IncompleteStages` (`python interpret.py` exits with `EXIT_INCOMPLETE`) unless
`interpret.allow_partial=true`.

Drop-in outputs: the summary CSV (first columns `layer,feature,label,steering_effect`, then the
scores, `status`, the label-free `top_tokens` description and `steering_effect_dedup`) is rewritten
after every stage that feeds it (`SUMMARY_FEEDS`), so `stages=[maxact,steering,explain]` leaves one
too; and every run writes the run record (records.RUN_CONFIG: the resolved config with secrets
removed, the prompt file and where it came from, the effective prompts, package versions).
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from dataclasses import replace
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from saeforge.activations.extract import store_spec
from saeforge.activations.store import is_complete, read_tokens
from saeforge.interpret import records as records_io
from saeforge.activations.corpus import iter_texts, load_corpus
from saeforge.activations.windows import pack_windows
from saeforge.lm.hookpoints import LORA_HOOKPOINT, layer_label, resolve_hookpoint
from saeforge.lm.loading import LoadedLM, load_lm
from saeforge.paths import cache_root
from saeforge.config import (
    SCORERS,
    STAGES,
    ExplainConfig,
    ImportedSAEConfig,
    InterpretConfig,
    LogitLensConfig,
    MaxActConfig,
    ScoreConfig,
    SteeringConfig,
    from_config,
)
from saeforge.interpret.describe import is_generic_label, top_token_description
from saeforge.interpret.prompts import load_prompts, prompts_json, resolve_prompt_file
from saeforge.pipelines.run import make_wandb_logger, run_lock, strip_secrets
from saeforge.pipelines.validate import exclude_first_tokens, run_model, validate_interpret
from saeforge.sae.source import SAESource, resolve_sae

log = logging.getLogger(__name__)
UPSTREAM = {"steering": ["maxact"], "explain": ["maxact", "steering"], "score": ["explain"],
            "dashboard": ["maxact", "logit_lens", "steering", "explain", "score"]}
OUTPUT = {stage: records_io.stage_output(stage) for stage in STAGES}
SUMMARY_FEEDS = ("maxact", "logit_lens", "steering", "explain", "score")
"""Stages whose outputs the summary CSV shows: after each of them runs, the summary is rewritten."""
VERSIONED_PACKAGES = ("saeforge", "torch", "transformers", "lightning", "safetensors", "openai", "sentence-transformers",
                      "hydra-core", "omegaconf")
"""Packages whose versions the run record lists (those installed)."""
EXIT_INCOMPLETE = 3
"""Exit status of `python interpret.py` when a stage ended with failed features (outputs written)."""


class IncompleteStages(RuntimeError):
    """Some features of some stages failed (the message is the summary); a rerun retries them."""

    def __init__(self, message: str, out: Path, failures: dict[str, dict[str, list[int]]]):
        super().__init__(message)
        self.out, self.failures = out, failures


class NotApplicable(Exception):
    """A stage cannot run on this SAE (the message says why, in one line); it is skipped, not failed:
    the log says `stage X: not applicable: <why>`, the stages file records the reason under
    `NOT_APPLICABLE`, the stages that read its output are skipped too, and the dashboard shows it."""


NOT_APPLICABLE = records_io.NOT_APPLICABLE
NEEDS_SEP = ", which is not applicable: "


class Context:
    """What the stages share: config, SAE source, output dir, features, and the lazily loaded LM."""

    def __init__(self, cfg: DictConfig, source: SAESource, out: Path, lm: LoadedLM | None,
                 shared: dict[str, Any] | None = None, ckpt: str | None = None):
        self.cfg, self.source, self.out = cfg, source, out
        self._shared: dict[str, Any] = shared if shared is not None else {}
        """The LM and the explainer client, shared by the contexts of one run (several hookpoints)."""
        if lm is not None:
            self._shared.setdefault("lm", lm)
        self.ckpt = ckpt if ckpt is not None else str(cfg.ckpt)
        """The ckpt this SAE came from (its stages' fingerprints name it)."""
        run_cfg = source.run_cfg
        self.model_cfg = run_model(run_cfg, cfg, source.run_dir)
        self.corpus_cfg = run_cfg.corpus if run_cfg is not None else cfg.corpus
        self.data_cfg = run_cfg.data if run_cfg is not None else None
        imported = from_config(ImportedSAEConfig, cfg.get("imported"), "imported")
        self.exclude_first_tokens = exclude_first_tokens(run_cfg, imported.exclude_first_tokens)
        """The first positions left out of every statistic: the run's data.exclude_first_tokens (imports: imported.*)."""
        self.hookpoint = source.hookpoint
        self.layer = layer_label(self.hookpoint)
        self.features: list[int] = []
        """The selected features (maxact and logit_lens run on them)."""
        self.kept: list[int] | None = None
        """`features` less those with fewer than interpret.min_examples activating examples; None: not filtered."""
        prompts_cfg = cfg.get("prompts")
        self.prompt_file, self.prompt_origin = resolve_prompt_file(prompts_cfg.get("override") if prompts_cfg else None,
                                                                   source.run_dir)
        """The prompt override file in effect and where it came from (prompts.resolve_prompt_file)."""
        self.resuming = False
        """True while a stage reruns because its last run with the same fingerprint was incomplete."""
        self._windows: torch.Tensor | None = None

    @property
    def _lm(self) -> LoadedLM | None:
        return self._shared.get("lm")

    @property
    def lm(self) -> LoadedLM:
        """The LM, loaded on first use and shared by the SAEs of one run; for a `lora` SAE with the run's
        adapter attached (`lora_sites` set)."""
        if self._shared.get("lm") is None:
            self._shared["lm"] = load_lm(self.model_cfg)
        if self.hookpoint == LORA_HOOKPOINT and not self._shared["lm"].lora_sites:
            from saeforge.activations.lora import with_adapter

            lora = self.data_cfg.get("lora") if self.data_cfg is not None else None
            if not (lora and lora.get("adapter")):
                raise NotApplicable("a `lora` SAE needs its LoRA adapter: pass ckpt=<the training run> (its data.lora.adapter)")
            self._shared["lm"] = with_adapter(self._shared["lm"], lora.adapter, lora.get("types"))
            root = self.store_root()
            if root is not None:  # steering splits W_dec[f] by this layout: it must be the store's
                from saeforge.activations.lora import check_layout
                from saeforge.activations.store import read_manifest

                check_layout(list(self._shared["lm"].lora_sites), (read_manifest(root) or {}).get("lora_layout"), str(root))
        return self._shared["lm"]

    @property
    def eligible(self) -> list[int]:
        """The features of the stages after maxact and logit_lens (`kept` once filtered, else `features`)."""
        return self.kept if self.kept is not None else self.features

    def store_root(self) -> Path | None:
        """The training run's activation store, when it exists and holds this hookpoint."""
        if self.data_cfg is None or self.data_cfg.get("path"):
            return None
        root = cache_root(self.data_cfg and self.data_cfg.get("cache_dir")) / "activations" / store_spec(self.model_cfg, self.corpus_cfg, self.data_cfg).cache_key()
        return root if is_complete(root) else None

    def user_file(self) -> str | None:
        """data.path of a run trained on the user's own activation file, else None."""
        return str(self.data_cfg.path) if self.data_cfg is not None and self.data_cfg.get("path") else None

    def user_tokens(self) -> torch.Tensor | None:
        """The token windows of the user's file. Without them: None when the SAE's hookpoint is one of
        the LM's own (max-act then runs the LM over the corpus at that hookpoint), else NotApplicable
        saying exactly what to add."""
        from saeforge.activations.readers import missing_tokens_message, open_rows, read_user_tokens

        path = self.user_file()
        assert path is not None
        n_rows = open_rows(path, None, self.data_cfg.get("h5_key", "activations")).n_rows
        tokens = read_user_tokens(path, n_rows, len(self.lm.tokenizer))
        if tokens is None and not self.hookpoint_in_lm():
            raise NotApplicable(missing_tokens_message(path))
        return tokens

    def hookpoint_in_lm(self) -> bool:
        """True when the SAE's hookpoint is a residual hookpoint of the loaded LM (not `lora`, not a file stem)."""
        if self.hookpoint == LORA_HOOKPOINT:
            return False
        try:
            resolve_hookpoint(self.lm.model, self.hookpoint)
        except (KeyError, ValueError, IndexError):
            return False
        return True

    def windows(self) -> torch.Tensor:
        """Token windows for the max-act pass: the store's or the user file's (first n_tokens), or packed
        from the corpus (computed once)."""
        if self._windows is None:
            n_tokens = int(self.cfg.interpret.n_tokens)
            root = self.store_root()
            tokens = read_tokens(root) if root is not None else self.user_tokens() if self.user_file() else None
            if tokens is not None:
                self._windows = tokens[: max(1, -(-n_tokens // tokens.shape[1]))]
            else:
                ctx_len = int(self.cfg.interpret.ctx_len)
                corpus = load_corpus(self.corpus_cfg, cache_root(self.data_cfg and self.data_cfg.get("cache_dir")))
                self._windows = pack_windows(iter_texts(corpus, self.corpus_cfg.get("column", "text")), self.lm.tokenizer,
                                             ctx_len, n_tokens)
        return self._windows

    def client(self) -> Any:
        if self._shared.get("client") is None:
            from saeforge.explainers.factory import make_client

            lm = self.explainer_lm() if self.cfg.explainer.kind == "local" else None
            self._shared["client"] = make_client(self.cfg.explainer, lm=lm)
        return self._shared["client"]

    def explainer_lm(self) -> tuple[Any, Any]:
        """explainer.kind=local: (model, tokenizer) of `explainer.model` loaded as a separate LM (hub id,
        folder or .gguf file), or of the analysed LM when explainer.model is null or names it."""
        name = self.cfg.explainer.get("model")
        if not name or str(name) == str(self.model_cfg.get("name")):
            return self.lm.model, self.lm.tokenizer
        log.info("explainer: loading %s as a separate local explainer LM", name)
        explainer = load_lm({"name": str(name), "device": str(self.model_cfg.get("device", "auto"))})
        return explainer.model, explainer.tokenizer


def output_root(cfg: DictConfig, source: SAESource) -> Path:
    if cfg.run.get("dir"):
        return Path(str(cfg.run.dir))
    if source.run_dir is not None:
        return source.run_dir
    return Path("runs") / f"interpret-{datetime.now():%Y-%m-%d_%H-%M-%S}"


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_settings(cfg: DictConfig, stage: str, prompt_file: Path | None = None) -> Any:
    node = cfg.interpret.get(stage)
    settings = OmegaConf.to_container(node, resolve=True) if node is not None else None
    if stage == "explain":
        settings = {**settings, "source": explain_config(cfg).source}
    if stage in ("explain", "score"):
        explainer = OmegaConf.to_container(cfg.explainer, resolve=True)
        prompts = None if prompt_file is None else [str(prompt_file), hashlib.sha256(prompt_file.read_bytes()).hexdigest()]
        settings = {"stage": settings, "explainer": explainer, "prompts": prompts}
    return settings


def explain_config(cfg: DictConfig) -> ExplainConfig:
    """The explain settings with `source: auto` resolved for this run's stages."""
    conf = ExplainConfig.from_mapping(cfg.interpret.explain)
    return replace(conf, source=conf.source_for(list(cfg.interpret.stages)))


def select_features(ctx: Context, frequency: torch.Tensor | None) -> list[int]:
    """interpret.features, or max_latents chosen by interpret.select (dead features skipped, counted)."""
    icfg = ctx.cfg.interpret
    d_sae = ctx.source.sae.cfg.d_sae
    if icfg.get("features"):
        features = [int(f) for f in icfg.features]
        bad = [f for f in features if not 0 <= f < d_sae]
        if bad:
            raise ValueError(f"interpret.features {bad} outside the SAE's [0, {d_sae})")
        return features
    n = int(icfg.max_latents) if icfg.get("max_latents") is not None else d_sae  # null: every alive feature
    if frequency is None:
        return list(range(min(n, d_sae)))
    alive = (frequency > 0).nonzero().flatten()
    log.info("%d of %d features fired on the sample; %d dead features skipped", alive.numel(), d_sae, d_sae - alive.numel())
    if icfg.select == "alive_first":
        chosen = alive[:n]
    elif icfg.select == "frequency":
        chosen = alive[frequency[alive].argsort(descending=True)][:n]
    elif icfg.select == "random":
        gen = torch.Generator().manual_seed(int(ctx.cfg.seed))
        chosen = alive[torch.randperm(alive.numel(), generator=gen)][:n].sort().values
    else:
        raise ValueError(f"interpret.select={icfg.select!r} must be alive_first, frequency or random")
    return [int(f) for f in chosen]


@torch.no_grad()
def firing_frequency(ctx: Context, tokens: torch.Tensor) -> torch.Tensor:
    """Per-feature firing frequency on `tokens` (forward to the hookpoint + encode), for selection."""
    return firing_frequencies([ctx], tokens)[0]


@torch.no_grad()
def firing_frequencies(contexts: list[Context], tokens: torch.Tensor) -> list[torch.Tensor]:
    """`firing_frequency` of several SAEs on the same `tokens`: one forward per batch captures every hookpoint."""
    from saeforge.lm.capture import capture_residual, run_until_captured

    lm = next((ctx.lm for ctx in contexts if ctx.hookpoint == LORA_HOOKPOINT), contexts[0].lm)  # lora: the adapter attached
    saes = [ctx.source.sae.to(lm.device) for ctx in contexts]
    hookpoints = list(dict.fromkeys(ctx.hookpoint for ctx in contexts))
    residual = [h for h in hookpoints if h != LORA_HOOKPOINT]
    counts = [torch.zeros(sae.cfg.d_sae) for sae in saes]
    rows = [0] * len(contexts)
    for b in range(0, tokens.shape[0], 8):
        ids = tokens[b : b + 8].long().to(lm.device)
        acts: dict[str, torch.Tensor] = {}
        if residual:
            with capture_residual(lm.model, residual) as cap:
                run_until_captured(lm.model, input_ids=ids)
            acts.update(cap)
        if LORA_HOOKPOINT in hookpoints:
            from saeforge.activations.lora import lora_activations

            acts[LORA_HOOKPOINT] = lora_activations(lm.model, list(lm.lora_sites), ids)
        for i, (ctx, sae) in enumerate(zip(contexts, saes)):
            skip = ctx.exclude_first_tokens  # attention sinks, as maxact and training
            x = acts[ctx.hookpoint][:, skip:].reshape(-1, sae.cfg.d_in).float()
            counts[i] += (sae.encode_inference(x) > 0).sum(0).float().cpu()
            rows[i] += x.shape[0]
    return [c / max(r, 1) for c, r in zip(counts, rows)]


def not_applicable(ctx: Context) -> str | None:
    """Why max-act cannot run on this SAE (no LoRA adapter, a user file without tokens), or None."""
    try:
        ctx.lm
        ctx.windows()
    except NotApplicable as reason:
        return str(reason)
    return None


def same_windows(contexts: list[Context]) -> list[list[Context]]:
    """The contexts grouped by identical max-act windows (one joint pass per group)."""
    groups: list[list[Context]] = []
    for ctx in contexts:
        for group in groups:
            w, v = group[0].windows(), ctx.windows()
            if w.shape == v.shape and torch.equal(w, v):
                group.append(ctx)
                break
        else:
            groups.append([ctx])
    return groups


def sae_frequency(source: SAESource) -> torch.Tensor | None:
    """Firing frequency recorded at export (`sparsity.safetensors`, log10), when present."""
    if source.run_dir is None:
        return None
    path = source.run_dir / "sae" / source.hookpoint / "sparsity.safetensors"
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    log10_freq = load_file(str(path))["sparsity"].double()
    return torch.where(log10_freq > -9.9, torch.pow(10.0, log10_freq), 0.0).float()  # -10 marks a dead latent


# ---- stages ----------------------------------------------------------------------------------
def run_maxact(ctx: Context) -> None:
    run_maxact_together([ctx])



def run_maxact_together(contexts: list[Context]) -> None:
    """The max-act stage of several SAEs: one pass per group of contexts with the same windows, the LM
    running once per batch for all their hookpoints (stored activations are read instead where present)."""
    from saeforge.activations.readers import open_rows
    from saeforge.interpret.maxact import MaxActTarget, collect_maxact_many

    for group in same_windows(contexts):
        targets = []
        for ctx in group:
            root = ctx.store_root()
            stored = open_rows(root, ctx.hookpoint) if root is not None and ctx.hookpoint in ctx.data_cfg.hookpoints else None
            if ctx.user_file() and ctx.user_tokens() is not None:  # the user's own rows, linked to text by its `tokens`
                root, stored = ctx.user_file(), open_rows(ctx.user_file(), None, ctx.data_cfg.get("h5_key", "activations"))
            if stored is not None:
                log.info("maxact %s: reading stored activations from %s (no LM forward)", ctx.hookpoint, root)
            targets.append(MaxActTarget(ctx.source.sae, ctx.hookpoint, ctx.features, stored, ctx.exclude_first_tokens))
        conf = MaxActConfig.from_mapping(group[0].cfg.interpret.maxact)
        lms = [ctx.lm for ctx in group if ctx.hookpoint == LORA_HOOKPOINT] or [group[0].lm]  # lora: the adapter attached
        results = collect_maxact_many(lms[0], targets, group[0].windows(), conf)
        for ctx, result in zip(group, results):
            records_io.write_maxact(ctx.out, result.to_records())


def run_logit_lens(ctx: Context) -> None:
    from saeforge.interpret.logit_lens import lens_records

    lcfg = from_config(LogitLensConfig, ctx.cfg.interpret.logit_lens, "interpret.logit_lens")
    records = records_io.Records(hookpoint=ctx.hookpoint, layer=ctx.layer)
    for f in ctx.features:
        records.get(f)
    lens_records(ctx.lm, ctx.source.sae, records, lcfg, ctx.hookpoint)
    records_io.write_logit_lens(ctx.out, records)


def read_maxact(ctx: Context) -> records_io.Records:
    """The records of the max-act file (FileNotFoundError, naming the stage to run, when it is missing)."""
    return records_io.read_maxact(ctx.out)


def run_steering_stage(ctx: Context) -> None:
    from saeforge.interpret.steering import resolve_prompts, steer_records

    records = read_maxact(ctx)
    a_max = records.a_max()
    features = [f for f in ctx.eligible if a_max.get(f, 0) > 0]
    scfg = SteeringConfig.from_mapping(ctx.cfg.interpret.steering)
    corpus = None if scfg.prompts_file else load_corpus(ctx.corpus_cfg, cache_root(ctx.data_cfg and ctx.data_cfg.get("cache_dir")))
    prompts = resolve_prompts(scfg, corpus, ctx.corpus_cfg.get("column", "text"))
    steer_records(ctx.lm, ctx.source.sae, ctx.hookpoint, features, records, prompts, scfg, ctx.out)


def run_explain_stage(ctx: Context) -> None:
    from saeforge.interpret.explain import explain_records
    from saeforge.explainers.factory import make_chat_params

    records = records_io.read_steering(ctx.out, read_maxact(ctx))
    explainable = set(records.with_maxact())
    features = [f for f in ctx.eligible if f in explainable]
    explain_records(ctx.client(), records, features,
                    load_prompts(ctx.prompt_file), make_chat_params(ctx.cfg.explainer), ctx.out,
                    ctx.hookpoint, ctx.layer, explain_config(ctx.cfg),
                    keep=records_io.FINAL_STATUSES if ctx.resuming else (records_io.SUCCESS,))


def run_score_stage(ctx: Context) -> None:
    from saeforge.interpret.score import load_embedder, score_records
    from saeforge.explainers.factory import make_chat_params

    scfg = ScoreConfig.from_mapping(ctx.cfg.interpret.score)
    scorers = list(scfg.scorers)
    needs_llm = any(s != "embedding" for s in scorers)
    embedder = load_embedder(scfg.embedding_model) if "embedding" in scorers else None
    records = records_io.read_steering(ctx.out, read_maxact(ctx), texts=False)
    labelled = any(s not in records_io.LABEL_FREE for s in scorers)  # intruder alone needs no explanations
    records_io.read_explanations(ctx.out, ctx.layer, records, required=labelled)
    score_records(ctx.client() if needs_llm else None, embedder, records,
                  ctx.eligible, load_prompts(ctx.prompt_file), make_chat_params(ctx.cfg.explainer), ctx.out,
                  ctx.hookpoint, ctx.layer, scfg)


def run_dashboard(ctx: Context) -> None:
    from saeforge.report.dashboard import write_dashboard

    path = write_dashboard(ctx.out, title=f"saeforge · {ctx.hookpoint} · {ctx.source.description}")
    print(f"dashboard: {path}")


RUNNERS: dict[str, Callable[[Context], None]] = {
    "maxact": run_maxact, "logit_lens": run_logit_lens, "steering": run_steering_stage,
    "explain": run_explain_stage, "score": run_score_stage, "dashboard": run_dashboard,
}


# ---- completeness ----------------------------------------------------------------------------
def check_steering(ctx: Context) -> tuple[int, dict[int, str]]:
    from saeforge.interpret.steering import unfinished

    records = records_io.read_steering(ctx.out, read_maxact(ctx), texts=False)
    a_max = records.a_max()
    features = [f for f in ctx.eligible if a_max.get(f, 0) > 0]
    return len(features), unfinished(records, features)


def check_explain(ctx: Context) -> tuple[int, dict[int, str]]:
    from saeforge.interpret.explain import unfinished

    records = read_maxact(ctx)
    records_io.read_explanations(ctx.out, ctx.layer, records)
    explainable = set(records.with_maxact())
    features = [f for f in ctx.eligible if f in explainable]
    return len(features), unfinished(records, features, explain_config(ctx.cfg).source)


def check_score(ctx: Context) -> tuple[int, dict[int, str]]:
    from saeforge.interpret.score import unfinished

    scorers = [str(s) for s in ctx.cfg.interpret.score.scorers]
    records = read_maxact(ctx)
    records_io.read_explanations(ctx.out, ctx.layer, records)
    records_io.read_scores(ctx.out, scorers, records)
    scored = [f for f in ctx.eligible if f in records.features and records[f].label]
    return len(scored), unfinished(records, scored, scorers)


CHECKS: dict[str, Callable[[Context], tuple[int, dict[int, str]]]] = {
    "steering": check_steering, "explain": check_explain, "score": check_score,
}
"""Per-feature stages: (features the stage handled, {feature: why it has no final result})."""


def group_failures(failures: dict[int, str]) -> dict[str, list[int]]:
    """`{reason: [features]}`, most frequent reason first."""
    groups: dict[str, list[int]] = {}
    for feature, reason in sorted(failures.items()):
        groups.setdefault(reason, []).append(feature)
    return dict(sorted(groups.items(), key=lambda item: -len(item[1])))


def failure_line(stage: str, n_total: int, groups: dict[str, list[int]]) -> str:
    """`explain: 6/6 failed: <reason>` (several reasons: each with its count and features)."""
    n_failed = sum(len(v) for v in groups.values())
    if len(groups) == 1:
        return f"{stage}: {n_failed}/{n_total} failed: {next(iter(groups))}"
    parts = [f"{len(fs)} × {reason} (features {', '.join(map(str, fs[:10]))}{', …' if len(fs) > 10 else ''})"
             for reason, fs in groups.items()]
    return f"{stage}: {n_failed}/{n_total} failed: " + "; ".join(parts)


def stage_prints(cfg: DictConfig, features: list[int], record: dict[str, dict[str, Any]], ckpt: str | None = None,
                 eligible: list[int] | None = None, prompt_file: Path | None = None) -> dict[str, str]:
    """The fingerprint of every stage: its settings (with the prompt file in effect), the features
    (`eligible` after maxact and logit_lens, when given), the SAE's ckpt and its upstream stages'
    fingerprints — an upstream stage recorded incomplete under its current fingerprint counts as
    different ("+partial"), so a stage that read partial outputs reruns once they are complete."""
    prints: dict[str, str] = {}
    for stage in STAGES:
        upstream = []
        for u in UPSTREAM.get(stage, []):
            fp = prints[u]
            if record.get(u, {}).get("fingerprint") == fp and record[u].get("complete", True) is False:
                fp += "+partial"
            upstream.append(fp)
        feats = features if stage in ("maxact", "logit_lens") or eligible is None else eligible
        prints[stage] = fingerprint(stage, stage_settings(cfg, stage, prompt_file), feats,
                                    str(cfg.ckpt) if ckpt is None else ckpt, upstream)
    return prints


def resolve_sources(settings: Any) -> list[tuple[str, SAESource]]:
    """(ckpt, SAE) pairs of `ckpt` (one or a list) and `hookpoint` / `interpret.hookpoints`
    (a run dir with several hookpoints, or one hookpoint per ckpt); each hookpoint at most once."""
    from saeforge.lm.hookpoints import canonical_name
    from saeforge.pipelines.validate import interpret_ckpts

    ckpts = interpret_ckpts(settings)
    wanted = settings.interpret.hookpoints
    if wanted is None:
        pairs = [(c, settings.hookpoint) for c in ckpts]
    elif len(ckpts) == 1:
        pairs = [(ckpts[0], h) for h in wanted]
    else:
        pairs = list(zip(ckpts, wanted))
    out: list[tuple[str, SAESource]] = []
    for ckpt, hookpoint in pairs:
        source = resolve_sae(ckpt, hookpoint)
        if wanted is not None and source.hookpoint != canonical_name(str(hookpoint)):
            raise ValueError(f"ckpt={ckpt!r} has no SAE at hookpoint {hookpoint} (found {source.hookpoint})")
        out.append((ckpt, source))
    seen = [s.hookpoint for _, s in out]
    if len(set(seen)) != len(seen):
        raise ValueError(f"several SAEs at the same hookpoint {seen}: their outputs would share interpret/<hookpoint>/")
    return out


def apply_min_examples(ctx: Context, record: dict[str, dict[str, Any]]) -> None:
    """Set `ctx.kept`: the selected features with at least interpret.min_examples activating examples
    (windows where they fire, from the max-act file); log and record the skipped ones in the stages file."""
    minimum = int(ctx.cfg.interpret.get("min_examples", 0) or 0)
    if minimum <= 0 or not (ctx.out / OUTPUT["maxact"]).exists():
        ctx.kept = None
        return
    records = read_maxact(ctx)
    counts = {f: (r.n_windows if r.n_windows is not None else len(r.top)) for f, r in records.features.items()}
    skipped = [f for f in ctx.features if counts.get(f, 0) < minimum]
    ctx.kept = [f for f in ctx.features if f not in skipped]
    log.info("min_examples=%d: %d of %d features skipped at %s (too few activating examples)%s", minimum, len(skipped),
             len(ctx.features), ctx.hookpoint, f": {skipped[:20]}" if skipped else "")
    record.setdefault("maxact", {})["min_examples"] = {"min_examples": minimum, "n_skipped": len(skipped), "skipped": skipped}
    records_io.write_stages(ctx.out, record)


def interpret(cfg: DictConfig, lm: LoadedLM | None = None) -> Path:
    """Run the configured stages; returns the interpret output directory (with several SAEs: the
    `interpret/` folder holding one directory per hookpoint).

    Several SAEs (`interpret.hookpoints`, or a list of `ckpt`s) share the LM and the explainer; the
    max-act pass runs once for all of them, the other stages run per SAE.

    Raises `IncompleteStages` after the last stage when a stage left features without a final
    result, unless `interpret.allow_partial` (then the failures are only reported).
    """
    settings = validate_interpret(cfg)  # first: bad settings fail here, before any load
    sources = resolve_sources(settings)
    out_root = output_root(cfg, sources[0][1])
    with run_lock(out_root, "interpreting", settings.run.wait):  # one process per run directory
        return interpret_sources(cfg, settings, sources, out_root, lm)


def interpret_sources(cfg: DictConfig, settings: InterpretConfig, sources: list[tuple[str, SAESource]], out_root: Path,
                      lm: LoadedLM | None = None) -> Path:
    """`interpret` of the resolved SAEs, once this process holds `out_root` (their run directory)."""
    stages = list(settings.interpret.stages)
    root = out_root / "interpret"
    prompt_file, prompt_origin = resolve_prompt_file(cfg.prompts.get("override"), root.parent)
    prompts = load_prompts(prompt_file)  # a bad prompt file fails here, before the LM loads
    shared: dict[str, Any] = {}
    contexts = [Context(cfg, source, root / source.hookpoint, lm, shared, ckpt) for ckpt, source in sources]
    for ctx in contexts:
        ctx.prompt_file, ctx.prompt_origin = prompt_file, prompt_origin
    models = {json.dumps(OmegaConf.to_container(c.model_cfg, resolve=True), sort_keys=True, default=str) for c in contexts}
    if len(models) > 1:
        raise ValueError(f"the SAEs of {[c.ckpt for c in contexts]} come from different models; interpret them one at a time")
    for ctx in contexts:
        ctx.out.mkdir(parents=True, exist_ok=True)
        d_in = ctx.source.sae.cfg.d_in
        if ctx.hookpoint != LORA_HOOKPOINT and ctx.lm.d_model != d_in:
            raise ValueError(f"the SAE has d_in={d_in} but {ctx.lm.name} has d_model={ctx.lm.d_model}")
    explicit = bool(cfg.interpret.get("features"))
    frequency = {id(c): None if explicit else sae_frequency(c.source) for c in contexts}
    measurable = []
    for ctx in contexts:
        if frequency[id(ctx)] is None and not explicit:
            reason = not_applicable(ctx)
            if reason is None:
                measurable.append(ctx)
            else:
                log.info("no firing frequency to select features by (%s): taking the first interpret.max_latents", reason)
    for group in same_windows(measurable):
        for ctx, freq in zip(group, firing_frequencies(group, group[0].windows()[:64])):
            frequency[id(ctx)] = freq
    for ctx in contexts:
        ctx.features = select_features(ctx, frequency[id(ctx)])
        log.info("interpreting %d features of %s at %s → %s", len(ctx.features), ctx.source.description, ctx.hookpoint, ctx.out)
        write_run_record(ctx, prompts)

    records = {id(c): records_io.read_stages(c.out) for c in contexts}
    failed: dict[str, dict[str, list[int]]] = {}
    lines: list[str] = []
    several = len(contexts) > 1
    for stage in stages:
        todo = []
        for ctx in contexts:
            record = records[id(ctx)]
            if stage not in ("maxact", "logit_lens") and ctx.kept is None:
                apply_min_examples(ctx, record)
            prints = stage_prints(cfg, ctx.features, record, ctx.ckpt, ctx.eligible, ctx.prompt_file)  # again per stage: upstream completeness may change
            previous = record.get(stage, {})
            same = previous.get("fingerprint") == prints[stage] and (ctx.out / OUTPUT[stage]).exists()
            complete = previous.get("complete", True) is not False
            where = f" ({ctx.hookpoint})" if several else ""
            if same and complete and stage != "dashboard":
                log.info("stage %s%s: up to date, skipped", stage, where)
                continue
            ctx.resuming = same and not complete
            entry: dict[str, Any] = {"fingerprint": prints[stage], "started": now()}
            skipped = [u for u in UPSTREAM.get(stage, []) if stage != "dashboard" and u in stages and record.get(u, {}).get(NOT_APPLICABLE)]
            reason = None
            if skipped:
                root_reason = str(record[skipped[0]][NOT_APPLICABLE]).split(NEEDS_SEP, 1)[-1]
                reason = f"needs {skipped[0]}{NEEDS_SEP}{root_reason}"
            elif stage == "maxact":
                reason = not_applicable(ctx)
            if reason is not None:
                log.info("stage %s%s: not applicable: %s", stage, where, reason)
                record[stage] = {**entry, "finished": now(), NOT_APPLICABLE: reason}
                records_io.write_stages(ctx.out, record)
                continue
            log.info("stage %s%s: %s", stage, where, "retrying the failed features" if ctx.resuming else "running")
            todo.append((ctx, entry))
        if stage == "maxact" and todo:
            run_maxact_together([ctx for ctx, _ in todo])  # one LM forward per batch for every hookpoint
        for ctx, entry in todo:
            record = records[id(ctx)]
            if stage != "maxact":
                entry["started"] = now()  # the contexts of one stage run one after another
                try:
                    RUNNERS[stage](ctx)
                except NotApplicable as reason:
                    log.info("stage %s: not applicable: %s", stage, reason)
                    record[stage] = {**entry, "finished": now(), NOT_APPLICABLE: str(reason)}
                    records_io.write_stages(ctx.out, record)
                    continue
            if stage in CHECKS:
                n_total, failures = CHECKS[stage](ctx)
                if failures:
                    groups = group_failures(failures)
                    entry.update(complete=False, failures=groups)
                    name = f"{ctx.hookpoint}:{stage}" if several else stage
                    failed[name] = groups
                    lines.append(failure_line(name, n_total, groups))
                    log.warning("%s", lines[-1])
            record[stage] = {**entry, "finished": now()}  # after the runner and its checks
            records_io.write_stages(ctx.out, record)
            if stage == "maxact":
                apply_min_examples(ctx, record)  # before the summary, which lists the kept features only
            if stage in SUMMARY_FEEDS:
                write_run_summary(ctx)
            ctx.resuming = False
    for ctx in contexts:
        if any(s in SUMMARY_FEEDS for s in stages) and not (ctx.out / records_io.SUMMARY).is_file():
            write_run_summary(ctx)  # every feeding stage was up to date, but the summary is gone
        if ctx.kept is None and "maxact" in stages:
            apply_min_examples(ctx, records[id(ctx)])  # recorded even when only maxact ran
        log_to_wandb(cfg, ctx.out, ctx.source.run_dir)
    if several and records_io.write_combined_summary(root, [ctx.out for ctx in contexts]) is not None:
        log.info("summary of every hookpoint: %s", root / records_io.SUMMARY)
    out = root if several else contexts[0].out
    if failed:
        allow = settings.interpret.allow_partial
        message = "\n".join(["interpret finished with failures (a rerun retries only the failed features):", *lines,
                              "interpret.allow_partial=true: exiting 0 with these failures" if allow
                              else "pass interpret.allow_partial=true to accept partial results"])
        print(message)
        if not allow:
            raise IncompleteStages(message, out, failed)
    return out


def now() -> str:
    """The local time as ISO 8601 with milliseconds (stages.json's `started` / `finished`)."""
    return datetime.now().isoformat(timespec="milliseconds")


def write_run_summary(ctx: Context) -> None:
    """Rewrite the summary rows of the run's features from every output present (labels, steering
    effects, scores of every scorer file, explanation status, top-token descriptions)."""
    records = records_io.load_records(ctx.out)
    if records.layer is None:
        records.layer = ctx.layer
    scorers = list(dict.fromkeys([str(s) for s in ctx.cfg.interpret.score.scorers]
                                 + sorted({s for r in records.features.values() for s in r.scores})))
    descriptions = {f: top_token_description(records.get(f)) for f in ctx.eligible}
    records_io.write_summary(ctx.out, records, ctx.eligible, scorers, top_tokens=descriptions)


def package_versions() -> dict[str, str]:
    """Python and the installed `VERSIONED_PACKAGES` with their versions."""
    versions = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def write_run_record(ctx: Context, prompts: dict[str, Any] | None = None) -> Path:
    """The run record (records.RUN_CONFIG): resolved config (secrets removed; `model`: the LM analysed), SAE, features, the
    prompt file and its origin, the effective prompts, package versions."""
    doc = {
        "written": datetime.now().isoformat(timespec="seconds"),
        "ckpt": str(ctx.cfg.ckpt), "sae": ctx.source.description, "hookpoint": ctx.hookpoint, "layer": ctx.layer,
        "stages": list(ctx.cfg.interpret.stages), "features": ctx.features,
        "explain_source": explain_config(ctx.cfg).source,
        "config": {**strip_secrets(ctx.cfg), "model": strip_secrets(ctx.model_cfg)},  # the LM analysed: the run's
        "prompt_file": None if ctx.prompt_file is None else str(ctx.prompt_file), "prompt_file_origin": ctx.prompt_origin,
        "prompts": prompts_json(prompts if prompts is not None else load_prompts(ctx.prompt_file)),
        "versions": package_versions(),
    }
    return records_io.write_run_config(ctx.out, doc)


def interpret_summary(out: Path) -> dict[str, float]:
    """The run-level interpret/* numbers: the mean of each scorer and of its baseline, the mean
    steering effect, and the numbers of labelled, failed and generic features."""
    records = records_io.load_records(out, strict=False)
    explanations = [r.explanation for r in records.features.values() if r.explanation is not None]
    labels = [e.label.strip() for e in explanations if e.ok]
    summary: dict[str, float] = {"interpret/n_features": len(records.features), "interpret/n_labelled": len(labels),
                                 "interpret/n_failed": sum(1 for e in explanations if e.status in ("error", "parse_error")),
                                 "interpret/n_generic": sum(1 for e in explanations if e.status == "generic")
                                 + sum(1 for label in labels if is_generic_label(label))}
    rows = records_io.read_summary(out, strict=False)
    for col in (*SCORERS, "steering_effect"):
        for key in (col, f"{col}_baseline"):
            values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
            if values:
                summary[f"interpret/{key}_mean"] = sum(values) / len(values)
    return summary


def log_to_wandb(cfg: DictConfig, out: Path, run_dir: Path | None = None) -> None:
    """interpret/* summary numbers, labels and scores as a table, score histograms, and the dashboard
    as an HTML artifact; into the training run's W&B run when `run_dir` recorded one."""
    logger = make_wandb_logger(cfg, out, "interpret", attach=run_dir)
    if logger is None:
        return
    import wandb

    run = logger.experiment
    run.summary.update(interpret_summary(out))
    rows = records_io.read_summary(out)
    if rows:
        columns = list(rows[0].keys())
        run.log({"interpret/summary": wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})
        for col in (*SCORERS, "steering_effect"):
            values = [float(r[col]) for r in rows if r.get(col) not in (None, "")]
            if values:
                run.log({f"interpret/{col}_hist": wandb.Histogram(values)})
    dashboard = out / records_io.DASHBOARD
    if dashboard.is_file():
        artifact = wandb.Artifact(f"dashboard-{out.name.replace('.', '_')}", type="dashboard")
        artifact.add_file(str(dashboard))
        run.log_artifact(artifact)
    run.finish()
