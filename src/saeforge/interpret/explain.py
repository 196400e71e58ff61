"""Label every feature with an explainer LLM, from its max-activating examples and/or steering outputs.

- **maxact**: the explainer sees the *shown* part of the feature's examples (`split_examples`: a
  seeded subset of top + quantile examples), each rendered delphi-style — the tokens at ≥
  `highlight_threshold` × the example's max activation marked `<<like this>>`, then their
  activations on a 0–10 scale (relative to the feature's A_max). It answers `LABEL:` (< 20 words)
  and `DESCRIPTION:`. `strategy` picks the prompt: `default` (prompt `explain_maxact`);
  `contrastive` (`explain_contrastive`: also `n_contrastive` non-activating windows, drawn under
  the seed and recorded in the split, so the scorer never uses them); `single_token`
  (`explain_single_token`: first the tokens the examples peak on, counted, then the examples — for
  features whose activations concentrate on a few tokens).
- **steering**: the explainer sees, for up to `n_steering_prompts` prompts, the unsteered text and
  the text at each strength (each truncated to `max_chars` characters), and answers `SUMMARY:` and
  `DETAILED ANALYSIS:`; the summary is the label.

Prompts may carry a `prefill` (e.g. `LABEL:`): for clients that continue a final assistant message
(`client.supports_prefill`) it is sent as the start of the reply, and the parser reads
`prefill + reply` (what is stored as `raw`). Small models keep to the format far better that way.

The entry's `interpretation` is the whole reply (prefill included), `label` the label parsed from
it and `description` the rest. A label that names no concept or echoes the prompt's instructions
(`describe.is_generic_label`: "The Feature", "The LABEL") is `status: generic` — kept, not scored.
A reply that cannot be parsed gets one repair turn (the reply, then a message asking for the
format); if that fails too the entry is `status: parse_error` (raw reply kept, no label). A failed
request is `status: error` with the client's reason; a feature with nothing to show (no activating
examples, no max-act entry, no steered texts) is `status: skipped`. Only `status: success` entries
are scored. `success`, `generic`, `parse_error` and `skipped` are final
(`records.FINAL_STATUSES`); `error` and `missing` are retried by the next run (`unfinished` lists
them; the pipeline counts the stage complete only when there are none). Requests go through the client in one `chat_many` per round (first round: all
features; second round: all repairs) — concurrency and retries are the client's job.

The train/test split of the examples is defined here only (`split_examples`) and recorded in each
entry (`split.shown`: the (seq, start) windows shown), so the scorer holds out exactly those.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from saeforge.config import ExplainConfig
from saeforge.interpret import records as records_io
from saeforge.interpret.describe import is_generic_label, peak_tokens
from saeforge.interpret.records import SUCCESS, Explanation, FeatureRecord, Records
from saeforge.interpret.prompts import PromptTemplate
from saeforge.explainers.base import ChatParams, ChatRequest, ChatResult, ExplainerClient, Message, assistant_prefill

log = logging.getLogger(__name__)

MAX_LABEL_WORDS = 19
"""Longest label accepted (the prompt asks for fewer than 20 words); a longer one is a parse error."""


# ------------------------------------------------------------------------------ config
# ------------------------------------------------------------------------------ the split
Key = tuple[int, int]


def example_key(example: Mapping[str, Any]) -> Key:
    """The identity of a window: (seq, start)."""
    return int(example["seq"]), int(example["start"])


@dataclass
class ExampleSplit:
    """The examples of one feature: shown to the explainer vs held out for scoring."""

    shown: list[dict[str, Any]]
    """Activating windows the explainer sees (train)."""
    test: list[dict[str, Any]]
    """Activating windows never shown (top + quantile examples not in `shown`), deduplicated."""
    non_activating: list[dict[str, Any]]
    """Windows where the feature never fires that were not shown (scoring negatives)."""
    shown_keys: list[Key] = field(default_factory=list)
    """Every window shown: the activating ones and `shown_non_activating`."""
    shown_non_activating: list[dict[str, Any]] = field(default_factory=list)
    """Non-activating windows shown to the explainer (contrastive explanations); never scored."""

    def record(self, seed: int) -> dict[str, Any]:
        """What explanations.json stores so the scorer can rebuild this split."""
        return {"seed": seed, "shown": [list(k) for k in self.shown_keys]}


def _activating_pool(entry: Mapping[str, Any]) -> tuple[dict[int, list[dict]], dict[int, list[dict]]]:
    """Top and quantile examples grouped by sequence, deduplicated by (seq, start).

    Grouping by sequence keeps every window of one sequence on the same side of the split, so
    overlapping windows of a sequence cannot leak between shown and scored examples.
    """
    seen: set[Key] = set()
    top: dict[int, list[dict]] = {}
    quant: dict[int, list[dict]] = {}
    for kind, examples in (("top", entry.get("top") or []), ("quantile", entry.get("quantile_examples") or [])):
        for ex in examples:
            key = example_key(ex)
            if key in seen:
                continue
            seen.add(key)
            target = top if kind == "top" or key[0] in top else quant
            target.setdefault(key[0], []).append({**ex, "kind": kind})
    # a sequence present in both lists belongs to the top group only
    for seq in list(quant):
        if seq in top:
            top[seq].extend(quant.pop(seq))
    return top, quant


def split_examples(
    entry: Mapping[str, Any],
    feature: int,
    n_shown: int = 20,
    seed: int = 0,
    shown_top_fraction: float = 0.5,
    shown: Iterable[Sequence[int]] | None = None,
    n_shown_non_activating: int = 0,
) -> ExampleSplit:
    """Split one feature's maxact entry into shown (train) and scoring (test) examples.

    With `shown` (the recorded `split.shown` of an explanation) the shown windows are exactly
    those; otherwise `n_shown` sequences are drawn under `seed` (per feature), a
    `shown_top_fraction` of them from the top examples and the rest from the quantile examples
    (topping up from the other group when one runs short). Everything activating that is not
    shown is test; `non_activating` windows are the negatives (they come from sequences where the
    feature never fires, so they share no window with either side), less `n_shown_non_activating`
    of them drawn under `seed` to be shown (contrastive). With `shown`, the recorded non-activating
    windows are the shown ones.
    """
    top, quant = _activating_pool(entry)
    groups = {**quant, **top}
    non_all = [dict(ex) for ex in entry.get("non_activating") or []]
    if shown is not None:
        shown_keys = {(int(s), int(t)) for s, t in shown}
        shown_seqs = {seq for seq, ex in groups.items() if any(example_key(e) in shown_keys for e in ex)}
        non_shown = [ex for ex in non_all if example_key(ex) in shown_keys]
    else:
        rng_non = random.Random(f"contrast:{seed}:{feature}")
        non_shown = rng_non.sample(non_all, min(max(n_shown_non_activating, 0), len(non_all)))
        rng = random.Random(f"split:{seed}:{feature}")
        top_seqs, quant_seqs = sorted(top), sorted(quant)
        rng.shuffle(top_seqs)
        rng.shuffle(quant_seqs)
        n_top = min(len(top_seqs), round(n_shown * shown_top_fraction))
        n_quant = min(len(quant_seqs), n_shown - n_top)
        n_top = min(len(top_seqs), n_shown - n_quant)  # top up from top when quantiles run short
        shown_seqs = set(top_seqs[:n_top]) | set(quant_seqs[:n_quant])
    shown_ex = [ex for seq in sorted(shown_seqs) for ex in groups[seq]]
    test_ex = [ex for seq in sorted(groups) if seq not in shown_seqs for ex in groups[seq]]
    non_keys = {example_key(e) for e in non_shown}
    non = [ex for ex in non_all if example_key(ex) not in non_keys]
    shown_ex.sort(key=lambda e: -float(e.get("activation", 0.0)))
    return ExampleSplit(shown=shown_ex, test=test_ex, non_activating=non,
                        shown_keys=sorted([example_key(e) for e in shown_ex] + list(non_keys)),
                        shown_non_activating=non_shown)


# ------------------------------------------------------------------------------ rendering
def _tok(token: str) -> str:
    """A token for one-line display (newlines and tabs escaped)."""
    return token.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def highlight(tokens: Sequence[str], marked: Sequence[bool]) -> str:
    """The tokens joined, each run of marked tokens wrapped in << >>."""
    out: list[str] = []
    inside = False
    for token, m in zip(tokens, marked):
        if m and not inside:
            out.append("<<")
        elif not m and inside:
            out.append(">>")
        inside = bool(m)
        out.append(_tok(token))
    if inside:
        out.append(">>")
    return "".join(out)


def marked_positions(acts: Sequence[float], threshold: float) -> list[bool]:
    """Tokens at ≥ threshold × the example's max activation (and > 0)."""
    peak = max(acts, default=0.0)
    return [a > 0 and a >= threshold * peak for a in acts] if peak > 0 else [False] * len(acts)


def plain_text(example: Mapping[str, Any]) -> str:
    """The window as one line of text, without marks."""
    return "".join(_tok(t) for t in example["tokens"])


def format_maxact_examples(examples: Sequence[Mapping[str, Any]], a_max: float, threshold: float) -> str:
    """delphi-style: `Example i: text with <<marks>>` then `Activations: ("tok", 0-10), …`."""
    lines = []
    scale = a_max if a_max > 0 else max((max(e["acts"], default=0.0) for e in examples), default=1.0) or 1.0
    for i, ex in enumerate(examples, 1):
        acts = [float(a) for a in ex["acts"]]
        marks = marked_positions(acts, threshold)
        lines.append(f"Example {i}: {highlight(ex['tokens'], marks)}")
        listed = [
            f'("{_tok(t)}", {max(0, min(10, round(10 * a / scale)))})'
            for t, a, m in zip(ex["tokens"], acts, marks) if m
        ]
        lines.append("Activations: " + ", ".join(listed))
    return "\n".join(lines)


def format_contrastive_examples(shown: Sequence[Mapping[str, Any]], non_activating: Sequence[Mapping[str, Any]],
                                a_max: float, threshold: float) -> str:
    """The activating examples (`format_maxact_examples`), then the non-activating ones as plain text."""
    lines = ["Activating examples:", format_maxact_examples(shown, a_max, threshold)]
    if non_activating:
        lines += ["", "Non-activating examples (the feature does not fire anywhere in them):"]
        lines += [f"Example {i}: {plain_text(ex)}" for i, ex in enumerate(non_activating, 1)]
    return "\n".join(lines)


def format_single_token_examples(shown: Sequence[Mapping[str, Any]], a_max: float, threshold: float) -> str:
    """The tokens the examples peak on (`describe.peak_tokens`: count, mean activation on the 0–10
    scale), then the examples (`format_maxact_examples`)."""
    scale = a_max if a_max > 0 else 1.0
    ranked = peak_tokens(shown)
    lines = ["Tokens where the examples peak (token: number of examples, mean activation 0-10):"]
    lines += [f'"{tok}": {count}, {max(0, min(10, round(10 * mean / scale)))}' for tok, count, mean in ranked[:10]]
    lines += ["", "Examples:", format_maxact_examples(shown, a_max, threshold)]
    return "\n".join(lines)


STRATEGY_PROMPTS = {"default": "explain_maxact", "contrastive": "explain_contrastive", "single_token": "explain_single_token"}
"""The prompt of each `interpret.explain.strategy` (all answer LABEL/DESCRIPTION; one repair prompt)."""


def _cut(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1].rstrip() + "…"


def _strength_order(key: str) -> tuple[int, float]:
    if key == "original":
        return (0, 0.0)
    try:
        return (1, float(key))
    except ValueError:
        return (2, 0.0)


def format_steering(texts: Mapping[str, Mapping[str, str]], n_prompts: int, max_chars: int) -> str:
    """Each prompt, then the original and each strength's continuation (strengths in order)."""
    blocks = []
    for p, (prompt, by_strength) in enumerate(list(texts.items())[:n_prompts], 1):
        lines = [f'Prompt {p}: "{_cut(prompt, max_chars)}"']
        for key in sorted(by_strength, key=_strength_order):
            name = "original (unsteered)" if key == "original" else f"strength {key}"
            lines.append(f"  {name}: {_cut(by_strength[key], max_chars)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


# ------------------------------------------------------------------------------ parsing
_FIELD_END = r"(?=^\s*[*#_ ]*(?:LABEL|DESCRIPTION|SUMMARY|DETAILED ANALYSIS|EXPLANATION)\b|\Z)"
_PLACEHOLDERS = {"", "...", "…", "<label>", "[label]", "label", "<summary>", "n/a", "none", "todo", "tbd",
                 "<a short label, fewer than 20 words>"}


def _field(text: str, name: str) -> str | None:
    """The text after `NAME:` (markdown decorations allowed) up to the next field or the end."""
    pattern = rf"^\s*[*#_ \[]*{name}[\]*_ ]*\s*[:\-–]\s*[*_ ]*(.*?){_FIELD_END}"
    m = re.search(pattern, text, flags=re.IGNORECASE | re.MULTILINE | re.DOTALL)
    if not m:
        return None
    value = " ".join(m.group(1).replace("**", "").split()).strip(" \"'*_")
    return None if value.lower() in _PLACEHOLDERS else value


def _clean(text: str) -> str:
    return " ".join(text.replace("**", "").split()).strip(" \"'*_").rstrip(",;:")


def _label_line(text: str, name: str) -> str | None:
    """The first non-empty line after `NAME:` (a label is one line), or None."""
    pattern = rf"^\s*[*#_ \[]*{name}[\]*_ ]*\s*[:\-–]\s*[*_ ]*(.*?){_FIELD_END}"
    m = re.search(pattern, text, flags=re.IGNORECASE | re.MULTILINE | re.DOTALL)
    if not m:
        return None
    line = next((ln for ln in m.group(1).splitlines() if _clean(ln)), "")
    value = _clean(line)
    if value.lower() in _PLACEHOLDERS or len(value.split()) > MAX_LABEL_WORDS:
        return None
    return value


def parse_reply(text: str, source: str) -> dict[str, str] | None:
    """`{"label", "description"}` from a reply, or None when it has no usable label.

    maxact: `LABEL:` (falling back to delphi's `[EXPLANATION]:`) and `DESCRIPTION:` (falling back
    to the label). steering: `SUMMARY:` and `DETAILED ANALYSIS:` (description = the analysis, or
    the summary when absent). The label is the first line after its field name; a label that is
    empty, a placeholder or longer than `MAX_LABEL_WORDS` words makes the reply unusable (never
    cut down: a rambling line is not a label).
    """
    if not text or not text.strip():
        return None
    if source == "steering":
        label = _label_line(text, "SUMMARY")
        detail = _field(text, "DETAILED ANALYSIS")
    else:
        label = _label_line(text, "LABEL") or _label_line(text, "EXPLANATION")
        detail = _field(text, "DESCRIPTION")
    if not label:
        return None
    return {"label": label, "description": detail or label}


# ------------------------------------------------------------------------------ the stage
@dataclass
class _Job:
    feature: int
    source: str  # maxact | steering
    messages: list[Message]
    extra: dict[str, Any]
    instructions: str = ""
    """The prompt's own text (templates, without the examples): a label found in it is an echo."""


def _run_chat(client: ExplainerClient, requests: list[ChatRequest]) -> list[ChatResult]:
    if not requests:
        return []
    return asyncio.run(client.chat_many(requests))


def _build_job(
    feature: int, source: str, rec: FeatureRecord, layer: int | None, prompts: Mapping[str, PromptTemplate],
    conf: ExplainConfig, prefill: bool,
) -> _Job | dict[str, Any]:
    """The request of one feature, or a finished (not ok) entry when there is nothing to show."""
    if source == "maxact":
        if not rec.has_maxact:
            return {"status": "skipped", "error": f"feature {feature} has no max-act record"}
        entry = rec.maxact_entry()
        n_non = conf.n_contrastive if conf.strategy == "contrastive" else 0
        split = split_examples(entry, feature, conf.n_shown, conf.seed, conf.shown_top_fraction, n_shown_non_activating=n_non)
        if not split.shown:
            return {"status": "skipped", "error": "feature has no activating examples", "split": split.record(conf.seed)}
        shown, a_max = split.shown[: conf.max_examples_in_prompt], float(entry.get("a_max") or 0.0)
        if conf.strategy == "contrastive":
            text = format_contrastive_examples(shown, split.shown_non_activating, a_max, conf.highlight_threshold)
        elif conf.strategy == "single_token":
            text = format_single_token_examples(shown, a_max, conf.highlight_threshold)
        else:
            text = format_maxact_examples(shown, a_max, conf.highlight_threshold)
        template = prompts[STRATEGY_PROMPTS[conf.strategy]]
        extra = {"split": split.record(conf.seed), "n_examples_in_prompt": len(shown), "strategy": conf.strategy}
        return _Job(feature, source, template.messages(text, prefill=prefill), extra, template.system + template.user)
    texts = rec.steering.texts if rec.steering is not None else {}
    if not texts:
        return {"status": "skipped", "error": f"no steering outputs for layer {layer} feature {feature}"}
    text = format_steering(texts, conf.n_steering_prompts, conf.max_chars)
    template = prompts["explain_steering"]
    return _Job(feature, source, template.messages(text, prefill=prefill), {}, template.system + template.user)


def _answered(job: _Job, reply: str, parsed: dict[str, str]) -> dict[str, Any]:
    """A parsed reply's entry: `success`, or `generic` for a label that says nothing (or echoes the prompt)."""
    status = "generic" if is_generic_label(parsed["label"], job.instructions) else SUCCESS
    return {"status": status, "label": parsed["label"], "description": parsed["description"], "interpretation": reply, **job.extra}


def explain_records(
    client: ExplainerClient,
    records: Records,
    features: Sequence[int] | None,
    prompts: Mapping[str, PromptTemplate],
    params: ChatParams,
    out_dir: str | Path,
    hookpoint: str,
    layer: int | None,
    cfg: ExplainConfig | None = None,
    keep: Sequence[str] = (SUCCESS,),
) -> Records:
    """The stage: fill `explanation` of `features` (None: every feature with max-act examples),
    write the explanations file and label txt files, and return the records (`cfg` None: the
    defaults). For `source: steering` the records carry the steered texts (`records.read_steering`).

    Resumable: features whose earlier explanation (in `out_dir`) for the same source has a status
    in `keep` are not asked again — `success` by default (settings changed: everything else is asked
    anew); `records.FINAL_STATUSES` when resuming an unfinished run with the same settings, so
    only failed (`error`) and missing features are asked.
    """
    conf = cfg if cfg is not None else ExplainConfig()
    out_dir = Path(out_dir)
    feats = [int(f) for f in (features if features is not None else records.with_maxact())]
    source = conf.source_for(["maxact"])  # auto without a run's stages: maxact
    sources = ["maxact", "steering"] if source == "both" else [source]
    records_io.read_explanations(out_dir, layer, records)
    prefill = bool(getattr(client, "supports_prefill", False))

    def done(feature: int, source: str) -> bool:
        old = records.get(feature).explanation
        if old is None:
            return False
        if source == sources[0]:
            return old.status in keep and old.source == source
        return Explanation.from_json(old.extra.get("steering") or {}).status in keep

    finished: dict[tuple[int, str], dict[str, Any]] = {}
    jobs: list[_Job] = []
    for feature in feats:
        for source in sources:
            if done(feature, source):
                continue
            job = _build_job(feature, source, records.get(feature), layer, prompts, conf, prefill)
            if isinstance(job, _Job):
                jobs.append(job)
            else:
                finished[(feature, source)] = job
    log.info("explaining %d requests (%d features, %d already done)", len(jobs), len(feats),
             sum(done(f, s) for f in feats for s in sources))

    results = _run_chat(client, [(job.messages, params) for job in jobs])
    repairs: list[tuple[_Job, list[Message]]] = []
    first_text: dict[tuple[int, str], str] = {}
    for job, result in zip(jobs, results):
        if not result.ok:
            finished[(job.feature, job.source)] = {"status": "error", "error": result.error or "request failed", **job.extra}
            continue
        reply = assistant_prefill(job.messages) + result.text
        first_text[(job.feature, job.source)] = reply
        parsed = parse_reply(reply, job.source)
        if parsed is not None:
            finished[(job.feature, job.source)] = _answered(job, reply, parsed)
        elif conf.repair:
            follow = prompts[f"explain_{job.source}_repair"].messages(reply, prefill=prefill)
            asked = job.messages[:-1] if assistant_prefill(job.messages) else job.messages
            msgs = asked + [{"role": "assistant", "content": reply}] + [m for m in follow if m["role"] != "system"]
            repairs.append((job, msgs))
        else:
            finished[(job.feature, job.source)] = {"status": "parse_error", "error": "reply not in the asked format",
                                                   "interpretation": reply, **job.extra}
    repaired = _run_chat(client, [(msgs, params) for _, msgs in repairs])
    for (job, msgs), result in zip(repairs, repaired):
        key = (job.feature, job.source)
        if not result.ok:
            finished[key] = {"status": "error", "error": f"repair request failed: {result.error}",
                             "interpretation": first_text[key], **job.extra}
            continue
        reply = assistant_prefill(msgs) + result.text
        parsed = parse_reply(reply, job.source)
        if parsed is not None:
            finished[key] = {**_answered(job, reply, parsed), "repaired": True}
        else:
            finished[key] = {"status": "parse_error", "error": "reply not in the asked format after one repair",
                             "interpretation": first_text[key], "repair_reply": reply, **job.extra}

    for (feature, source), result in finished.items():
        status = result.pop("status")
        explanation = Explanation(label=result.pop("label", ""), interpretation=result.pop("interpretation", ""),
                                  status=status, source=source, layer=layer, extra=result)
        rec = records.get(feature)
        if source == sources[0]:
            keep = rec.explanation.extra.get("steering") if rec.explanation is not None else None
            if keep is not None:
                explanation.extra["steering"] = keep
            rec.explanation = explanation
        else:
            if rec.explanation is None:
                rec.explanation = Explanation(status="missing", source=sources[0], layer=layer)
            rec.explanation.extra["steering"] = explanation.to_json(feature)
    path = records_io.write_explanations(out_dir, records, layer, hookpoint, feats)
    n_ok = sum(records.get(f).explanation is not None and records.get(f).explanation.ok for f in feats)
    log.info("explanations: %d/%d success → %s", n_ok, len(feats), path)
    return records


def unfinished(records: Records, features: Iterable[int], source: str = "maxact") -> dict[int, str]:
    """`{feature: reason}` for each of `features` whose explanation is not final (an `error`, or
    missing); with `source: both` the steering explanation must be final too."""
    out: dict[int, str] = {}
    for f in features:
        rec = records.features.get(int(f))
        expl = rec.explanation if rec is not None else None
        if expl is None or not expl.final:
            out[int(f)] = str((expl.extra.get("error") if expl is not None else None) or "not explained")
        elif source == "both":
            steer = expl.extra.get("steering") or {}
            if not Explanation.from_json(steer).final:
                out[int(f)] = f"steering explanation: {steer.get('error') or 'not explained'}"
    return out


__all__ = [
    "STRATEGY_PROMPTS", "ExampleSplit", "example_key", "explain_records", "format_contrastive_examples", "format_maxact_examples",
    "format_single_token_examples", "format_steering", "highlight",
    "marked_positions", "parse_reply", "plain_text", "split_examples", "unfinished",
]
