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
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig, OmegaConf

from saeforge.activations.extract import store_spec
from saeforge.activations.store import is_complete, read_tokens
from saeforge.interpret import records as records_io
from saeforge.activations.corpus import iter_texts, load_corpus
from saeforge.activations.windows import pack_windows
from saeforge.lm.hookpoints import LORA_HOOKPOINT, layer_label
from saeforge.lm.loading import LoadedLM, load_lm
from saeforge.paths import cache_root
from saeforge.config import (
    STAGES,
    ExplainConfig,
    ImportedSAEConfig,
    LogitLensConfig,
    MaxActConfig,
    ScoreConfig,
    SteeringConfig,
    from_config,
)
from saeforge.pipelines.run import make_wandb_logger
from saeforge.pipelines.validate import exclude_first_tokens, validate_interpret
from saeforge.sae.source import SAESource, resolve_sae

log = logging.getLogger(__name__)
UPSTREAM = {"steering": ["maxact"], "explain": ["maxact", "steering"], "score": ["explain"],
            "dashboard": ["maxact", "logit_lens", "steering", "explain", "score"]}
OUTPUT = {stage: records_io.stage_output(stage) for stage in STAGES}
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


class Context:
    """What the stages share: config, SAE source, output dir, features, and the lazily loaded LM."""

    def __init__(self, cfg: DictConfig, source: SAESource, out: Path, lm: LoadedLM | None):
        self.cfg, self.source, self.out, self._lm = cfg, source, out, lm
        run_cfg = source.run_cfg
        self.model_cfg = run_cfg.model if run_cfg is not None else cfg.model
        self.corpus_cfg = run_cfg.corpus if run_cfg is not None else cfg.corpus
        self.data_cfg = run_cfg.data if run_cfg is not None else None
        imported = from_config(ImportedSAEConfig, cfg.get("imported"), "imported")
        self.exclude_first_tokens = exclude_first_tokens(run_cfg, imported.exclude_first_tokens)
        """The first positions left out of every statistic: the run's data.exclude_first_tokens (imports: imported.*)."""
        self.hookpoint = source.hookpoint
        self.layer = layer_label(self.hookpoint)
        self.features: list[int] = []
        self.resuming = False
        """True while a stage reruns because its last run with the same fingerprint was incomplete."""
        self._client: Any = None

    @property
    def lm(self) -> LoadedLM:
        """The LM, loaded on first use; for a `lora` SAE with the run's adapter attached (`lora_sites` set)."""
        if self._lm is None:
            self._lm = load_lm(self.model_cfg)
        if self.hookpoint == LORA_HOOKPOINT and not self._lm.lora_sites:
            from saeforge.activations.lora import with_adapter

            lora = self.data_cfg.get("lora") if self.data_cfg is not None else None
            if not (lora and lora.get("adapter")):
                raise NotApplicable("a `lora` SAE needs its LoRA adapter: pass ckpt=<the training run> (its data.lora.adapter)")
            self._lm = with_adapter(self._lm, lora.adapter, lora.get("types"))
        return self._lm

    def store_root(self) -> Path | None:
        """The training run's activation store, when it exists and holds this hookpoint."""
        if self.data_cfg is None or self.data_cfg.get("path"):
            return None
        root = cache_root(self.data_cfg and self.data_cfg.get("cache_dir")) / "activations" / store_spec(self.model_cfg, self.corpus_cfg, self.data_cfg).cache_key()
        return root if is_complete(root) else None

    def user_file(self) -> str | None:
        """data.path of a run trained on the user's own activation file, else None."""
        return str(self.data_cfg.path) if self.data_cfg is not None and self.data_cfg.get("path") else None

    def user_tokens(self) -> torch.Tensor:
        """The token windows of the user's file (NotApplicable, saying exactly what to add, when it has none)."""
        from saeforge.activations.readers import missing_tokens_message, open_rows, read_user_tokens

        path = self.user_file()
        assert path is not None
        n_rows = open_rows(path, None, self.data_cfg.get("h5_key", "activations")).n_rows
        tokens = read_user_tokens(path, n_rows, len(self.lm.tokenizer))
        if tokens is None:
            raise NotApplicable(missing_tokens_message(path))
        return tokens

    def windows(self) -> torch.Tensor:
        """Token windows for the max-act pass: the store's or the user file's (first n_tokens), or packed
        from the corpus."""
        n_tokens = int(self.cfg.interpret.n_tokens)
        root = self.store_root()
        if root is not None or self.user_file():
            tokens = read_tokens(root) if root is not None else self.user_tokens()
            return tokens[: max(1, -(-n_tokens // tokens.shape[1]))]
        ctx_len = int(self.cfg.interpret.ctx_len)
        corpus = load_corpus(self.corpus_cfg, cache_root(self.data_cfg and self.data_cfg.get("cache_dir")))
        return pack_windows(iter_texts(corpus, self.corpus_cfg.get("column", "text")), self.lm.tokenizer, ctx_len, n_tokens)

    def client(self) -> Any:
        if self._client is None:
            from saeforge.explainers.factory import make_client

            lm = (self.lm.model, self.lm.tokenizer) if self.cfg.explainer.kind == "local" else None
            self._client = make_client(self.cfg.explainer, lm=lm)
        return self._client


def output_root(cfg: DictConfig, source: SAESource) -> Path:
    if cfg.run.get("dir"):
        return Path(str(cfg.run.dir))
    if source.run_dir is not None:
        return source.run_dir
    return Path("runs") / f"interpret-{datetime.now():%Y-%m-%d_%H-%M-%S}"


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_settings(cfg: DictConfig, stage: str) -> Any:
    node = cfg.interpret.get(stage)
    settings = OmegaConf.to_container(node, resolve=True) if node is not None else None
    if stage in ("explain", "score"):
        explainer = OmegaConf.to_container(cfg.explainer, resolve=True)
        settings = {"stage": settings, "explainer": explainer, "prompts": cfg.prompts.get("override")}
    return settings


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
    n = int(icfg.max_latents)
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
    from saeforge.lm.capture import capture_residual, run_until_captured

    sae = ctx.source.sae.to(ctx.lm.device)
    counts = torch.zeros(sae.cfg.d_sae)
    rows = 0
    skip = ctx.exclude_first_tokens  # attention sinks, as maxact and training
    for b in range(0, tokens.shape[0], 8):
        ids = tokens[b : b + 8].long().to(ctx.lm.device)
        if ctx.hookpoint == LORA_HOOKPOINT:
            from saeforge.activations.lora import lora_activations

            acts = lora_activations(ctx.lm.model, list(ctx.lm.lora_sites), ids)
        else:
            with capture_residual(ctx.lm.model, [ctx.hookpoint]) as cap:
                run_until_captured(ctx.lm.model, input_ids=ids)
            acts = cap[ctx.hookpoint]
        x = acts[:, skip:].reshape(-1, sae.cfg.d_in).float()
        counts += (sae.encode_inference(x) > 0).sum(0).float().cpu()
        rows += x.shape[0]
    return counts / rows


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
    from saeforge.activations.readers import open_rows
    from saeforge.interpret.maxact import collect_maxact

    root = ctx.store_root()
    stored = open_rows(root, ctx.hookpoint) if root is not None and ctx.hookpoint in ctx.data_cfg.hookpoints else None
    if ctx.user_file():  # the user's own file: its rows, linked to text by its `tokens`
        root, stored = ctx.user_file(), open_rows(ctx.user_file(), None, ctx.data_cfg.get("h5_key", "activations"))
    if stored is not None:
        log.info("maxact: reading stored activations from %s (no LM forward)", root)
    conf = MaxActConfig.from_mapping(ctx.cfg.interpret.maxact)
    result = collect_maxact(ctx.lm, ctx.source.sae, ctx.hookpoint, ctx.windows(), conf, ctx.features, stored,
                            exclude_first_tokens=ctx.exclude_first_tokens)
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
    features = [f for f in ctx.features if a_max.get(f, 0) > 0]
    scfg = SteeringConfig.from_mapping(ctx.cfg.interpret.steering)
    corpus = None if scfg.prompts_file else load_corpus(ctx.corpus_cfg, cache_root(ctx.data_cfg and ctx.data_cfg.get("cache_dir")))
    prompts = resolve_prompts(scfg, corpus, ctx.corpus_cfg.get("column", "text"))
    steer_records(ctx.lm, ctx.source.sae, ctx.hookpoint, features, records, prompts, scfg, ctx.out)


def run_explain_stage(ctx: Context) -> None:
    from saeforge.interpret.explain import explain_records
    from saeforge.interpret.prompts import load_prompts
    from saeforge.explainers.factory import make_chat_params

    records = records_io.read_steering(ctx.out, read_maxact(ctx))
    explainable = set(records.with_maxact())
    features = [f for f in ctx.features if f in explainable]
    explain_records(ctx.client(), records, features,
                    load_prompts(ctx.cfg.prompts.get("override")), make_chat_params(ctx.cfg.explainer), ctx.out,
                    ctx.hookpoint, ctx.layer, ExplainConfig.from_mapping(ctx.cfg.interpret.explain),
                    keep=records_io.FINAL_STATUSES if ctx.resuming else ("ok",))


def run_score_stage(ctx: Context) -> None:
    from saeforge.interpret.prompts import load_prompts
    from saeforge.interpret.score import load_embedder, score_records
    from saeforge.explainers.factory import make_chat_params

    scfg = ScoreConfig.from_mapping(ctx.cfg.interpret.score)
    scorers = list(scfg.scorers)
    needs_llm = any(s != "embedding" for s in scorers)
    embedder = load_embedder(scfg.embedding_model) if "embedding" in scorers else None
    records = records_io.read_steering(ctx.out, read_maxact(ctx), texts=False)
    records_io.read_explanations(ctx.out, ctx.layer, records, required=True)
    score_records(ctx.client() if needs_llm else None, embedder, records,
                  ctx.features, load_prompts(ctx.cfg.prompts.get("override")), make_chat_params(ctx.cfg.explainer), ctx.out,
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
    features = [f for f in ctx.features if a_max.get(f, 0) > 0]
    return len(features), unfinished(records, features)


def check_explain(ctx: Context) -> tuple[int, dict[int, str]]:
    from saeforge.interpret.explain import unfinished

    records = read_maxact(ctx)
    records_io.read_explanations(ctx.out, ctx.layer, records)
    explainable = set(records.with_maxact())
    features = [f for f in ctx.features if f in explainable]
    return len(features), unfinished(records, features, str(ctx.cfg.interpret.explain.get("source", "maxact")))


def check_score(ctx: Context) -> tuple[int, dict[int, str]]:
    from saeforge.interpret.score import unfinished

    scorers = [str(s) for s in ctx.cfg.interpret.score.scorers]
    records = read_maxact(ctx)
    records_io.read_explanations(ctx.out, ctx.layer, records)
    records_io.read_scores(ctx.out, scorers, records)
    scored = [f for f in ctx.features if f in records.features and records[f].label]
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


def stage_prints(cfg: DictConfig, features: list[int], record: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The fingerprint of every stage: its settings, the features, the SAE and its upstream stages'
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
        prints[stage] = fingerprint(stage, stage_settings(cfg, stage), features, str(cfg.ckpt), upstream)
    return prints


def interpret(cfg: DictConfig, lm: LoadedLM | None = None) -> Path:
    """Run the configured stages; returns the interpret output directory.

    Raises `IncompleteStages` after the last stage when a stage left features without a final
    result, unless `interpret.allow_partial` (then the failures are only reported).
    """
    settings = validate_interpret(cfg)  # first: bad settings fail here, before any load
    stages = list(settings.interpret.stages)
    source = resolve_sae(settings.ckpt, settings.hookpoint)
    out = output_root(cfg, source) / "interpret" / source.hookpoint
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, source, out, lm)
    if ctx.lm.d_model != source.sae.cfg.d_in and source.hookpoint != "lora":
        raise ValueError(f"the SAE has d_in={source.sae.cfg.d_in} but {ctx.lm.name} has d_model={ctx.lm.d_model}")
    frequency = None if cfg.interpret.get("features") else sae_frequency(source)
    if frequency is None and not cfg.interpret.get("features"):
        try:
            frequency = firing_frequency(ctx, ctx.windows()[:64])
        except NotApplicable as reason:
            log.info("no firing frequency to select features by (%s): taking the first interpret.max_latents", reason)
    ctx.features = select_features(ctx, frequency)
    log.info("interpreting %d features of %s at %s → %s", len(ctx.features), source.description, source.hookpoint, out)

    record = records_io.read_stages(out)
    failed: dict[str, dict[str, list[int]]] = {}
    lines: list[str] = []
    for stage in stages:
        prints = stage_prints(cfg, ctx.features, record)  # again per stage: upstream completeness may change
        previous = record.get(stage, {})
        same = previous.get("fingerprint") == prints[stage] and (out / OUTPUT[stage]).exists()
        complete = previous.get("complete", True) is not False
        if same and complete and stage != "dashboard":
            log.info("stage %s: up to date, skipped", stage)
            continue
        ctx.resuming = same and not complete
        entry: dict[str, Any] = {"fingerprint": prints[stage], "finished": datetime.now().isoformat(timespec="seconds")}
        skipped = [u for u in UPSTREAM.get(stage, []) if stage != "dashboard" and u in stages and record.get(u, {}).get(NOT_APPLICABLE)]
        try:
            if skipped:
                raise NotApplicable(f"needs {skipped[0]} ({record[skipped[0]][NOT_APPLICABLE]})")
            log.info("stage %s: %s", stage, "retrying the failed features" if ctx.resuming else "running")
            RUNNERS[stage](ctx)
        except NotApplicable as reason:
            log.info("stage %s: not applicable: %s", stage, reason)
            record[stage] = {**entry, NOT_APPLICABLE: str(reason)}
            records_io.write_stages(out, record)
            continue
        if stage in CHECKS:
            n_total, failures = CHECKS[stage](ctx)
            if failures:
                groups = group_failures(failures)
                entry.update(complete=False, failures=groups)
                failed[stage] = groups
                lines.append(failure_line(stage, n_total, groups))
                log.warning("%s", lines[-1])
        record[stage] = entry
        records_io.write_stages(out, record)
    ctx.resuming = False
    log_to_wandb(cfg, out, source.run_dir)
    if failed:
        allow = settings.interpret.allow_partial
        message = "\n".join(["interpret finished with failures (a rerun retries only the failed features):", *lines,
                              "interpret.allow_partial=true: exiting 0 with these failures" if allow
                              else "pass interpret.allow_partial=true to accept partial results"])
        print(message)
        if not allow:
            raise IncompleteStages(message, out, failed)
    return out


GENERIC_WORDS = frozenset({"the", "a", "an", "this", "that", "feature", "features", "label", "latent", "neuron", "concept",
                           "pattern", "unknown", "none", "na", "n", "various", "misc", "miscellaneous", "text", "token",
                           "tokens", "word", "words", "is", "of", "it", "and", "or"})
"""Words that say nothing about what a feature detects (see `is_generic_label`)."""


def is_generic_label(label: str) -> bool:
    """A label that names no concept. The rule: lower-case the label and keep only letters, digits and
    spaces; it is generic when every word is in `GENERIC_WORDS` ("The feature", "The LABEL", "a
    pattern"), when it holds "feature" twice ("The feature is a feature of ..."), or when it is a
    template placeholder left unfilled (`<label>`, `[LABEL]`, `{label}`)."""
    text = label.strip()
    if re.search(r"[<\[{]\s*label\s*[>\]}]", text, re.IGNORECASE):
        return True
    words = re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()
    return not words or all(w in GENERIC_WORDS for w in words) or words.count("feature") + words.count("features") >= 2


def interpret_summary(out: Path) -> dict[str, float]:
    """The run-level interpret/* numbers: the mean of each scorer and of its baseline, the mean
    steering effect, and the numbers of labelled, failed and generic features."""
    records = records_io.load_records(out, strict=False)
    explanations = [r.explanation for r in records.features.values() if r.explanation is not None]
    labels = [e.label.strip() for e in explanations if e.ok]
    summary: dict[str, float] = {"interpret/n_features": len(records.features), "interpret/n_labelled": len(labels),
                                 "interpret/n_failed": sum(1 for e in explanations if e.status in ("error", "parse_error")),
                                 "interpret/n_generic": sum(1 for label in labels if is_generic_label(label))}
    rows = records_io.read_summary(out, strict=False)
    for col in ("detection", "fuzz", "embedding", "steering_effect"):
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
        for col in ("detection", "fuzz", "embedding", "steering_effect"):
            values = [float(r[col]) for r in rows if r.get(col) not in (None, "")]
            if values:
                run.log({f"interpret/{col}_hist": wandb.Histogram(values)})
    dashboard = out / records_io.DASHBOARD
    if dashboard.is_file():
        artifact = wandb.Artifact(f"dashboard-{out.name.replace('.', '_')}", type="dashboard")
        artifact.add_file(str(dashboard))
        run.log_artifact(artifact)
    run.finish()
