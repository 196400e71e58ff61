"""Interpretation records: one typed `FeatureRecord` per feature, and the only reader/writer of
every interpretation output file.

Stages take records and return them (maxact creates them; logit lens, steering, explain and score
fill their part); the dashboard, the W&B logging and the checkpoint callback read them here. File
names and nestings are written down in this module only — other modules name a file through the
constants below (e.g. `records.MAXACT`).

Files under one hookpoint's interpret directory (README.md, "Interpretation outputs"):

- `MAXACT` `{format_version, hookpoint, layer, d_sae, n_tokens, ctx_len, quantile_levels,
  features: {"<F>": {feature, frequency, a_max, n_fired, quantiles, histogram, top,
  quantile_examples, non_activating}}}`
- `LOGIT_LENS` `{format_version, features: {"<F>": {top, bottom, neighbours}}}`
- `steering/generated_texts_layer_{L}_feature_{F}[_{SUFFIX}]_prompt_{P}.json` (`steering_text_path`;
  the optional suffix is `interpret.steering.file_suffix`, readers take every suffix), kept exactly
  in the seed shape `{"<L>": {"<F>": {prompt: {"original": ..., "-2.0": ...}}}}` — no
  format_version, so readers that index `[layer][feature][prompt]` keep working.
- `EFFECTS` `{format_version, "<F>": {steering_effect, steering_effect_dedup, steering_kl}}`
- `EXPLANATIONS` `{format_version, "<L>": {"<F>": {feature_number, layer, interpretation (the whole
  reply), label (parsed from it), status, source, description, …}}}` and `explanations/<hookpoint>_latent_<F>.txt` (the label, JSON-quoted)
- `scores/<scorer>.json` `{format_version, "<F>": {metrics…, baseline}}` and
  `scores/<scorer>/<hookpoint>_latent_<F>.txt` (the per-example results)
- `SUMMARY` (CSV): `SUMMARY_COLUMNS` + `EXTRA_COLUMNS` + `DESCRIPTION_COLUMNS` + `score_columns` of any
  other scorer run (`<scorer>`, `<scorer>_baseline` or a label-free scorer's `<scorer>_chance`), one
  row per (layer, feature); rows and columns of other runs are kept. The first four columns are the
  steering workflow's `layer,feature,label,steering_effect`.
- `RUN_CONFIG` `{format_version, config, prompts, prompt_file, versions, …}`: the effective run
  (secrets removed by the caller).
- `STAGES` `{format_version, "<stage>": {fingerprint, started, finished, complete, failures}}` (`started`
  and `finished`: local ISO 8601 times, milliseconds, when the stage began and when it and its
  checks ended; older files have `finished` only, stamped as the stage began; `complete`
  false, with `failures` `{reason: [features]}`, when some features of the stage failed; files
  without `complete` count as complete; `not_applicable`, a one-line reason, when the stage could not
  run on this SAE and was skipped)
- `layer` everywhere (JSON, summary.csv, steering file names) is `hookpoints.layer_label`: the block
  index of `layers.N`, the hookpoint name for others (`lora` for a LoRA SAE)

`format_version` is `FORMAT_VERSION`; files without it (older runs) read the same. All writes go
through `saeforge.atomic`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from saeforge.atomic import atomic_path, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Written as `format_version` at the top of every versioned JSON file."""
VERSION_KEY = "format_version"

MAXACT = "maxact.json"
LOGIT_LENS = "logit_lens.json"
STEERING_DIR = "steering"
EFFECTS = f"{STEERING_DIR}/effects.json"
EXPLANATIONS = "explanations.json"
EXPLANATIONS_DIR = "explanations"
SCORES_DIR = "scores"
SUMMARY = "summary.csv"
STAGES = "stages.json"
NOT_APPLICABLE = "not_applicable"
"""Key of a stages-file entry whose stage could not run on this SAE; its value is the one-line reason."""
DASHBOARD = "dashboard.html"
RUN_CONFIG = "run_config.json"

_STEERING_PREFIX = "generated_texts_layer_"
_STEERING_NAME = re.compile(
    rf"^{_STEERING_PREFIX}(?P<layer>[^_]+)_feature_(?P<feature>\d+)(?:_(?P<suffix>.+?))?_prompt_(?P<prompt>\d+)\.json$")

SUMMARY_COLUMNS = ["layer", "feature", "label", "steering_effect", "detection", "fuzz", "embedding"]
EXTRA_COLUMNS = ["steering_kl", "detection_baseline", "fuzz_baseline", "embedding_baseline"]
DESCRIPTION_COLUMNS = ["status", "top_tokens", "steering_effect_dedup"]
"""Explanation status, the label-free top-token description, and saeforge's de-duplicated steering effect."""

# ------------------------------------------------------------------------------ the records
_EXAMPLE_FIELDS = ("bucket", "activation", "tokens", "token_ids", "acts", "max_pos", "seq", "start")


@dataclass
class Example:
    """One window of the corpus: an activating example (context around its max token) or a
    non-activating window (no `activation`, `acts`, `max_pos`). Stored as a JSON object with the
    fields that are set, in the order below; unknown keys are kept in `extra`."""

    bucket: int | None = None
    """Quantile bucket (quantile examples only)."""
    activation: float | None = None
    """The example's max activation."""
    tokens: list[str] | None = None
    """Decoded display tokens of the window."""
    token_ids: list[int] | None = None
    acts: list[float] | None = None
    """The feature's activation at each token of the window."""
    max_pos: int | None = None
    """Index of the max token within the window."""
    seq: int | None = None
    """Sequence (token window) of the corpus sample."""
    start: int | None = None
    """First position of the window within the sequence."""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in _EXAMPLE_FIELDS if getattr(self, name) is not None}
        return {**out, **self.extra}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Example:
        return cls(**{k: doc[k] for k in _EXAMPLE_FIELDS if k in doc},
                   extra={k: v for k, v in doc.items() if k not in _EXAMPLE_FIELDS})


@dataclass
class LogitLens:
    """Top / bottom tokens of the decoder direction through the unembedding, and nearest features."""

    top: list[list[Any]] = field(default_factory=list)
    """`[token, logit]` pairs, largest first."""
    bottom: list[list[Any]] = field(default_factory=list)
    """`[token, logit]` pairs, smallest first."""
    neighbours: list[list[Any]] = field(default_factory=list)
    """`[feature, cosine]` pairs, nearest first."""
    by_type: dict[str, dict[str, Any]] = field(default_factory=dict)
    """LoRA features only: per adapter type `{defined, norm, top, bottom}` or `{defined: false, norm, note}`."""
    layout: dict[str, Any] | None = None
    """LoRA features only: `{layers, types, norms [layer][type], share {type: share}}` of |W_dec[f]|."""

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"top": self.top, "bottom": self.bottom, "neighbours": self.neighbours}
        if self.by_type:
            doc["by_type"] = self.by_type
        if self.layout is not None:
            doc["layout"] = self.layout
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LogitLens:
        by_type = doc.get("by_type")
        layout = doc.get("layout")
        return cls([list(p) for p in doc.get("top") or []], [list(p) for p in doc.get("bottom") or []],
                   [list(p) for p in doc.get("neighbours") or []],
                   dict(by_type) if isinstance(by_type, Mapping) else {},
                   dict(layout) if isinstance(layout, Mapping) else None)


@dataclass
class Steering:
    """Steered texts of a feature and its two measures."""

    texts: dict[str, dict[str, str]] = field(default_factory=dict)
    """`{prompt: {"original": text, "<strength>": text}}`."""
    measured: bool = False
    """True when the effects file has an entry for the feature (then `effect`/`kl` are its values)."""
    effect: float | None = None
    """`steering_effect` (text-only, the reference formula, see interpret.steering)."""
    kl: float | None = None
    """`steering_kl` (mean KL of steered vs. unsteered next-token distributions), None if unknown."""
    effect_dedup: float | None = None
    """`steering_effect_dedup` (every text once, see interpret.steering), None if unknown."""

    def effects_entry(self) -> dict[str, Any]:
        return {"steering_effect": self.effect, "steering_effect_dedup": self.effect_dedup, "steering_kl": self.kl}


SUCCESS = "success"
"""The status of a usable label (the steering workflow's word; files of older runs say "ok", read as this)."""
FINAL_STATUSES = (SUCCESS, "generic", "parse_error", "skipped")
"""Explanation statuses that a rerun with the same settings keeps: `success`; `generic` (a label that
names no concept or echoes the prompt, e.g. "The Feature": kept, never scored); `parse_error` (the reply,
after one repair turn, is not in the asked format — asking again gives the same answer); `skipped`
(nothing to show the explainer: no activating examples, no max-act entry or no steered texts)."""
RETRYABLE_STATUSES = ("error", "missing")
"""Explanation statuses a rerun asks again: `error` (the request failed: transport, HTTP, a
malformed reply — the error names the server) and `missing` (never asked)."""


@dataclass
class Explanation:
    """A feature's label: the explainer's answer, or why there is none."""

    label: str = ""
    interpretation: str = ""
    status: str = "missing"
    """success | generic | parse_error | error | skipped | missing; only `success` labels are scored. `FINAL_STATUSES`
    end a feature's explain stage; `RETRYABLE_STATUSES` leave it to be asked again."""
    source: str = "maxact"
    """What the explainer saw: maxact | steering."""
    layer: int | str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    """Everything else stored with it (raw reply, error, the example split, a steering explanation…)."""

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS and bool(self.label.strip())

    @property
    def final(self) -> bool:
        """True when the status is one a rerun keeps (`FINAL_STATUSES`)."""
        return self.status in FINAL_STATUSES

    def to_json(self, feature: int) -> dict[str, Any]:
        return {"feature_number": feature, "layer": self.layer, "interpretation": self.interpretation,
                "label": self.label, "status": self.status, "source": self.source, **self.extra}

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> Explanation:
        known = {"feature_number", "layer", "interpretation", "label", "status", "source"}
        status = str(doc.get("status") or "missing")
        return cls(label=str(doc.get("label") or ""), interpretation=str(doc.get("interpretation") or ""),
                   status=SUCCESS if status == "ok" else status, source=str(doc.get("source") or "maxact"),
                   layer=doc.get("layer"), extra={k: v for k, v in doc.items() if k not in known})


HEADLINES = {"embedding": "auc", "surprisal": "auc", "simulation": "correlation", "intruder": "accuracy"}
"""The headline field of each scorer's result (the summary column); any other scorer: balanced_accuracy."""
LABEL_FREE = {"intruder": "chance"}
"""Scorers that need no label, with the field reported beside the headline instead of a baseline
(summary column `<scorer>_<field>`)."""


def headline_field(scorer: str) -> str:
    """The field of a scorer's result that is its headline number (`HEADLINES`)."""
    return HEADLINES.get(scorer, "balanced_accuracy")


def headline(scorer: str, result: Mapping[str, Any] | None) -> Any:
    """The one number of a score result (`headline_field`)."""
    if not result:
        return None
    return result.get(headline_field(scorer))


def score_columns(scorer: str) -> list[str]:
    """The summary columns of a scorer: its headline, then its baseline (or its `LABEL_FREE` field)."""
    return [scorer, f"{scorer}_{LABEL_FREE.get(scorer, 'baseline')}"]


@dataclass
class FeatureRecord:
    """Everything the interpretation stages know about one feature (cf. delphi's LatentRecord)."""

    feature: int
    # -- maxact (None / empty until the max-act pass ran)
    frequency: float | None = None
    """Fraction of counted tokens where the feature fires."""
    a_max: float | None = None
    """The largest activation seen; None means the feature has no max-act entry."""
    n_fired: int | None = None
    n_windows: int | None = None
    """Windows where the feature fires (its activating examples, one per window; None: older files)."""
    quantiles: list[float] = field(default_factory=list)
    """Quantiles of the nonzero activations at the run's `quantile_levels`."""
    histogram: dict[str, Any] | None = None
    """`{"edges": [...], "counts": [...]}` of the nonzero activations."""
    top: list[Example] = field(default_factory=list)
    """Top examples, largest activation first."""
    quantile_examples: list[Example] = field(default_factory=list)
    """Examples sampled per activation bucket (`bucket` field)."""
    non_activating: list[Example] = field(default_factory=list)
    """Windows where the feature never fires."""
    # -- later stages
    logit_lens: LogitLens | None = None
    steering: Steering | None = None
    explanation: Explanation | None = None
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    """`{scorer: result}`; a result holds the metrics and `baseline` (same metrics, another feature's label)."""

    @property
    def has_maxact(self) -> bool:
        return self.a_max is not None

    @property
    def label(self) -> str:
        """The label when the explanation's status is success, else ""."""
        return self.explanation.label.strip() if self.explanation is not None and self.explanation.ok else ""

    def maxact_entry(self) -> dict[str, Any]:
        """This feature's entry of the max-act file (the dict explain and score sample from)."""
        return {"feature": self.feature, "frequency": self.frequency, "a_max": self.a_max, "n_fired": self.n_fired,
                **({"n_windows": self.n_windows} if self.n_windows is not None else {}),
                "quantiles": self.quantiles, "histogram": self.histogram, "top": [e.to_json() for e in self.top],
                "quantile_examples": [e.to_json() for e in self.quantile_examples],
                "non_activating": [e.to_json() for e in self.non_activating]}

    def set_maxact(self, entry: Mapping[str, Any]) -> None:
        self.frequency, self.a_max, self.n_fired = entry.get("frequency"), entry.get("a_max"), entry.get("n_fired")
        self.n_windows = entry.get("n_windows")
        self.quantiles = list(entry.get("quantiles") or [])
        self.histogram = entry.get("histogram")
        self.top = [Example.from_json(e) for e in entry.get("top") or []]
        self.quantile_examples = [Example.from_json(e) for e in entry.get("quantile_examples") or []]
        self.non_activating = [Example.from_json(e) for e in entry.get("non_activating") or []]


@dataclass
class Records:
    """The records of one hookpoint, with the run-level header of the max-act file."""

    hookpoint: str | None = None
    layer: int | str | None = None
    d_sae: int | None = None
    n_tokens: int | None = None
    """Tokens counted in the max-act statistics."""
    ctx_len: int | None = None
    quantile_levels: list[float] = field(default_factory=list)
    features: dict[int, FeatureRecord] = field(default_factory=dict)

    def __getitem__(self, feature: int) -> FeatureRecord:
        return self.features[int(feature)]

    def __contains__(self, feature: object) -> bool:
        return isinstance(feature, int) and feature in self.features

    def get(self, feature: int) -> FeatureRecord:
        """The record of `feature`, created empty if absent."""
        feature = int(feature)
        if feature not in self.features:
            self.features[feature] = FeatureRecord(feature)
        return self.features[feature]

    def ids(self) -> list[int]:
        return sorted(self.features)

    def with_maxact(self) -> list[int]:
        return [f for f in self.ids() if self.features[f].has_maxact]

    def a_max(self) -> dict[int, float]:
        return {f: r.a_max for f, r in self.features.items() if r.a_max is not None}

    def maxact_entry(self) -> dict[str, Any]:
        """The max-act document without `format_version` (what the max-act file holds)."""
        return {"hookpoint": self.hookpoint, "layer": self.layer, "d_sae": self.d_sae, "n_tokens": self.n_tokens,
                "ctx_len": self.ctx_len, "quantile_levels": self.quantile_levels,
                "features": {str(f): self.features[f].maxact_entry() for f in self.features if self.features[f].has_maxact}}

    @classmethod
    def from_maxact_json(cls, doc: Mapping[str, Any]) -> Records:
        recs = cls(hookpoint=doc.get("hookpoint"), layer=doc.get("layer"), d_sae=doc.get("d_sae"),
                   n_tokens=doc.get("n_tokens"), ctx_len=doc.get("ctx_len"),
                   quantile_levels=list(doc.get("quantile_levels") or []))
        for key, entry in _int_keyed(doc.get("features")).items():
            recs.get(key).set_maxact(entry)
        return recs


# ------------------------------------------------------------------------------ helpers
def _versioned(doc: Mapping[str, Any]) -> dict[str, Any]:
    return {VERSION_KEY: FORMAT_VERSION, **{k: v for k, v in doc.items() if k != VERSION_KEY}}


def _unversioned(doc: Any) -> dict[str, Any]:
    if not isinstance(doc, dict):
        return {}
    version = doc.get(VERSION_KEY, 0)
    if isinstance(version, int) and version > FORMAT_VERSION:
        log.warning("records: file format_version %s is newer than %s; reading it anyway", version, FORMAT_VERSION)
    return {k: v for k, v in doc.items() if k != VERSION_KEY}


def _int_keyed(mapping: Any) -> dict[int, Any]:
    """`{"12": v}` → `{12: v}`; non-integer keys (format_version) are dropped."""
    out: dict[int, Any] = {}
    for key, value in (mapping.items() if isinstance(mapping, Mapping) else ()):
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            continue
    return out


def _read_json(path: Path, strict: bool = True) -> dict[str, Any] | None:
    """The document without `format_version`, or None when missing (or unreadable, when not strict)."""
    if not path.is_file():
        return None
    try:
        return _unversioned(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as err:
        if strict:
            raise
        log.warning("records: skipping unreadable %s (%s)", path, err)
        return None


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _latent_name(hookpoint: str, feature: int) -> str:
    return f"{hookpoint.replace('/', '_')}_latent_{feature}.txt"


def _records(records: Records | None) -> Records:
    return records if records is not None else Records()


# ------------------------------------------------------------------------------ maxact
def write_maxact(out_dir: str | Path, records: Records) -> Path:
    """Write the max-act file from the records that have a max-act entry. Returns its path."""
    path = Path(out_dir) / MAXACT
    atomic_write_json(path, _versioned(records.maxact_entry()), indent=None, allow_nan=False)
    return path


def read_maxact(out_dir: str | Path, records: Records | None = None, strict: bool = True) -> Records:
    """Records from the max-act file (merged into `records` when given). Missing file: FileNotFoundError if strict."""
    path = Path(out_dir) / MAXACT
    doc = _read_json(path, strict)
    if doc is None:
        if strict:
            raise FileNotFoundError(f"{path} is missing: run the maxact stage first (interpret.stages=[maxact,...])")
        return _records(records)
    fresh = Records.from_maxact_json(doc)
    if records is None:
        return fresh
    for name in ("hookpoint", "layer", "d_sae", "n_tokens", "ctx_len", "quantile_levels"):
        setattr(records, name, getattr(fresh, name))
    for f, rec in fresh.features.items():
        records.get(f).set_maxact(rec.maxact_entry())
    return records


# ------------------------------------------------------------------------------ logit lens
def write_logit_lens(out_dir: str | Path, records: Records) -> Path:
    """Write the logit-lens file from every record that has a lens. Returns its path."""
    path = Path(out_dir) / LOGIT_LENS
    features = {str(f): r.logit_lens.to_json() for f, r in records.features.items() if r.logit_lens is not None}
    atomic_write_json(path, _versioned({"features": features}), indent=None, allow_nan=False)
    return path


def read_logit_lens(out_dir: str | Path, records: Records | None = None, strict: bool = True) -> Records:
    records = _records(records)
    doc = _read_json(Path(out_dir) / LOGIT_LENS, strict) or {}
    for f, entry in _int_keyed(doc.get("features")).items():
        if isinstance(entry, Mapping):
            records.get(f).logit_lens = LogitLens.from_json(entry)
    return records


# ------------------------------------------------------------------------------ steering
def steering_text_path(out_dir: str | Path, layer: int | str | None, feature: int, prompt_index: int,
                       suffix: str = "") -> Path:
    """Path of one (feature, prompt) steered-texts file; a non-empty `suffix` goes between the
    feature and the prompt (`..._feature_{F}_{suffix}_prompt_{P}.json`, the seed's slot)."""
    slot = f"_{suffix}" if suffix else ""
    return Path(out_dir) / STEERING_DIR / f"{_STEERING_PREFIX}{layer}_feature_{feature}{slot}_prompt_{prompt_index}.json"


def write_steering_texts(out_dir: str | Path, layer: int | str | None, feature: int, prompt_index: int,
                         prompt: str, texts: Mapping[str, str], suffix: str = "") -> Path:
    """One prompt's `{"original": ..., "<strength>": ...}` in the seed shape (no format_version)."""
    path = steering_text_path(out_dir, layer, feature, prompt_index, suffix)
    atomic_write_json(path, {str(layer): {str(feature): {prompt: dict(texts)}}})
    return path


def steering_texts_complete(out_dir: str | Path, layer: int | str | None, feature: int, n_prompts: int,
                            suffix: str = "") -> bool:
    """True when the files of all `n_prompts` prompts of the feature exist (resume)."""
    return all(steering_text_path(out_dir, layer, feature, p, suffix).is_file() for p in range(n_prompts))


def _steering_files(out_dir: Path, layer: int | str | None) -> dict[int, list[tuple[int, Path]]]:
    by_feature: dict[int, list[tuple[int, Path]]] = {}
    folder = out_dir / STEERING_DIR
    if not folder.is_dir():
        return by_feature
    for path in sorted(folder.glob(f"{_STEERING_PREFIX}{layer}_feature_*_prompt_*.json")):
        m = _STEERING_NAME.match(path.name)
        if m and m.group("layer") == str(layer):
            by_feature.setdefault(int(m.group("feature")), []).append((int(m.group("prompt")), path))
    return {f: sorted(files) for f, files in by_feature.items()}


def _read_text_file(path: Path, layer: int | str | None, feature: int, strict: bool) -> dict[str, dict[str, str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        prompts = data[str(layer)][str(feature)]
    except (OSError, ValueError, KeyError, TypeError) as err:
        if strict:
            raise
        log.warning("records: skipping unreadable %s (%s)", path, err)
        return {}
    return {str(p): {str(k): str(v) for k, v in by_key.items()} for p, by_key in prompts.items() if isinstance(by_key, Mapping)}


def read_steering_texts(out_dir: str | Path, layer: int | str | None, feature: int, strict: bool = True) -> dict[str, dict[str, str]]:
    """`{prompt: {"original": text, "<strength>": text}}` of a feature, in prompt order."""
    texts: dict[str, dict[str, str]] = {}
    for _, path in _steering_files(Path(out_dir), layer).get(int(feature), []):
        for prompt, by_key in _read_text_file(path, layer, feature, strict).items():
            texts.setdefault(prompt, {}).update(by_key)
    return texts


def write_effects(out_dir: str | Path, records: Records) -> Path:
    """Write the steering effects file from every record that was measured."""
    path = Path(out_dir) / EFFECTS
    doc = {str(f): r.steering.effects_entry() for f, r in sorted(records.features.items())
           if r.steering is not None and r.steering.measured}
    atomic_write_json(path, _versioned(doc))
    return path


def read_steering(out_dir: str | Path, records: Records | None = None, texts: bool = True, strict: bool = True) -> Records:
    """Fill `steering` from the effects file and (with `texts`) the steered-text files of `records.layer`."""
    records = _records(records)
    out_dir = Path(out_dir)
    for f, entry in _int_keyed(_read_json(out_dir / EFFECTS, strict)).items():
        if isinstance(entry, Mapping):
            rec = records.get(f)
            rec.steering = rec.steering or Steering()
            rec.steering.measured = True
            rec.steering.effect, rec.steering.kl = entry.get("steering_effect"), entry.get("steering_kl")
            rec.steering.effect_dedup = entry.get("steering_effect_dedup")
    if texts:
        for f, files in _steering_files(out_dir, records.layer).items():
            rec = records.get(f)
            rec.steering = rec.steering or Steering()
            for _, path in files:
                for prompt, by_key in _read_text_file(path, records.layer, f, strict).items():
                    rec.steering.texts.setdefault(prompt, {}).update(by_key)
    return records


# ------------------------------------------------------------------------------ explanations
def read_explanations(out_dir: str | Path, layer: int | str | None, records: Records | None = None, strict: bool = True,
                      required: bool = False) -> Records:
    """Fill `explanation` from the explanations file's entries of `layer` (FileNotFoundError when
    the file is missing and `required`)."""
    records = _records(records)
    path = Path(out_dir) / EXPLANATIONS
    if required and not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the explain stage first")
    doc = _read_json(path, strict) or {}
    return explanations_from_json(doc, layer, records)


def explanations_from_json(doc: Mapping[str, Any], layer: int | str | None, records: Records | None = None) -> Records:
    """Fill `explanation` from an explanations document `{layer: {feature: entry}}`."""
    records = _records(records)
    for f, entry in _int_keyed(_unversioned(dict(doc)).get(str(layer))).items():
        if isinstance(entry, Mapping):
            records.get(f).explanation = Explanation.from_json(entry)
    return records


def explanations_json(records: Records, layer: int | str | None) -> dict[str, Any]:
    """`{"<layer>": {"<feature>": entry}}` of the records that have an explanation."""
    return {str(layer): {str(f): r.explanation.to_json(f) for f, r in sorted(records.features.items())
                         if r.explanation is not None}}


def write_explanations(out_dir: str | Path, records: Records, layer: int | str | None, hookpoint: str,
                       features: Iterable[int]) -> Path:
    """Write this layer's explanations (other layers in the file are kept) and, for `features`,
    the label txt files (a success label written, any other status removes a stale file)."""
    out_dir = Path(out_dir)
    path = out_dir / EXPLANATIONS
    doc = _read_json(path) or {}
    doc.update(explanations_json(records, layer))
    atomic_write_json(path, _versioned(doc))
    for f in features:
        rec = records.features.get(int(f))
        txt = out_dir / EXPLANATIONS_DIR / _latent_name(hookpoint, int(f))
        if rec is not None and rec.explanation is not None and rec.explanation.ok:
            atomic_write_text(txt, json.dumps(rec.explanation.label, ensure_ascii=False))
        elif txt.exists():
            txt.unlink()  # a stale label of an earlier run must not survive a failed re-explanation
    return path


# ------------------------------------------------------------------------------ scores
def scores_path(out_dir: str | Path, scorer: str) -> Path:
    return Path(out_dir) / SCORES_DIR / f"{scorer}.json"


def read_scores(out_dir: str | Path, scorers: Sequence[str] | None = None, records: Records | None = None,
                strict: bool = True) -> Records:
    """Fill `scores[scorer]` from each scores file (`scorers` None: every file present)."""
    records = _records(records)
    folder = Path(out_dir) / SCORES_DIR
    names = list(scorers) if scorers is not None else sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []
    for scorer in names:
        for f, result in _int_keyed(_read_json(scores_path(out_dir, scorer), strict)).items():
            if isinstance(result, Mapping):
                records.get(f).scores[scorer] = dict(result)
    return records


def write_scores(out_dir: str | Path, scorer: str, hookpoint: str, features: Iterable[int],
                 results: Mapping[int, Mapping[str, Any]], records: Records | None = None) -> Path:
    """Merge one scorer's results into its file: each of `features` is replaced by its result in
    `results` (its `examples` go to the per-latent txt file) or removed when it has none; other
    features' results are kept. The records, when given, get the results too."""
    out_dir = Path(out_dir)
    path = scores_path(out_dir, scorer)
    merged = _read_json(path) or {}
    for f in features:
        merged.pop(str(f), None)
        txt = out_dir / SCORES_DIR / scorer / _latent_name(hookpoint, f)
        if f in results:
            result = {k: v for k, v in results[f].items() if k != "examples"}
            merged[str(f)] = result
            if records is not None:
                records.get(f).scores[scorer] = result
            atomic_write_text(txt, json.dumps(results[f].get("examples"), ensure_ascii=False))
        else:
            if records is not None:
                records.get(f).scores.pop(scorer, None)
            if txt.exists():
                txt.unlink()
    keys = sorted((k for k in merged if str(k).lstrip("-").isdigit()), key=int)
    atomic_write_json(path, _versioned({k: merged[k] for k in keys}))
    return path


# ------------------------------------------------------------------------------ summary
def write_summary(out_dir: str | Path, records: Records, features: Sequence[int], scorers: Sequence[str],
                  top_tokens: Mapping[int, str] | None = None) -> Path:
    """Merge rows (layer, feature) of `features` into the summary CSV; other rows and columns are kept.

    Per row: `label` (success labels only) and the explanation's `status`; `steering_effect`
    (rounded to 3 decimals, as the steering workflow writes it), `steering_effect_dedup` and
    `steering_kl` when the feature was measured; for each of `scorers` its headline number and
    baseline (blank without a success label; a `LABEL_FREE` scorer's number and its side field are
    written with or without one); `top_tokens` from `top_tokens` when given.
    """
    path = Path(out_dir) / SUMMARY
    rows: dict[tuple[str, str], dict[str, str]] = {}
    columns: list[str] = list(SUMMARY_COLUMNS)
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns += [c for c in reader.fieldnames or [] if c not in columns]
            for row in reader:
                rows[(row.get("layer", ""), row.get("feature", ""))] = dict(row)
    columns += [c for c in EXTRA_COLUMNS + DESCRIPTION_COLUMNS if c not in columns]
    columns += [c for scorer in scorers for c in score_columns(scorer) if c not in columns]
    for feature in features:
        rec = records.features.get(int(feature)) or FeatureRecord(int(feature))
        key = (_fmt(records.layer), str(feature))
        row = rows.setdefault(key, {"layer": key[0], "feature": key[1]})
        labelled = rec.has_maxact and rec.label != ""
        row["label"] = rec.label if labelled else ""
        row["status"] = rec.explanation.status if rec.explanation is not None else ""
        if rec.steering is not None and rec.steering.measured:
            row["steering_effect"] = _fmt(None if rec.steering.effect is None else round(float(rec.steering.effect), 3))
            row["steering_effect_dedup"] = _fmt(rec.steering.effect_dedup)
            row["steering_kl"] = _fmt(rec.steering.kl)
        if top_tokens is not None and int(feature) in top_tokens:
            row["top_tokens"] = top_tokens[int(feature)]
        for scorer in scorers:
            result = rec.scores.get(scorer) if labelled or scorer in LABEL_FREE else None
            main, side = score_columns(scorer)
            row[main] = _fmt(headline(scorer, result))
            row[side] = _fmt((result or {}).get(LABEL_FREE[scorer]) if scorer in LABEL_FREE
                             else headline(scorer, (result or {}).get("baseline")))
    ordered = sorted(rows.values(), key=lambda r: (r.get("layer", ""), int(r["feature"]) if str(r.get("feature", "")).isdigit() else 0))
    return _write_csv(path, columns, ordered)


def read_summary(out_dir: str | Path, strict: bool = True) -> list[dict[str, str]]:
    """The summary CSV's rows in file order (empty when missing)."""
    path = Path(out_dir) / SUMMARY
    if not path.is_file():
        return []
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            return [dict(row) for row in csv.DictReader(fh)]
    except (OSError, csv.Error) as err:
        if strict:
            raise
        log.warning("records: skipping unreadable %s (%s)", path, err)
        return []


def write_combined_summary(root: str | Path, out_dirs: Sequence[str | Path]) -> Path | None:
    """One summary CSV in `root` holding the rows of every hookpoint directory's summary (several SAEs
    interpreted together), their columns in first-seen order plus `hookpoint`; None when none has rows."""
    columns: list[str] = []
    rows: list[dict[str, str]] = []
    for out in out_dirs:
        for row in read_summary(out):
            columns += [c for c in row if c not in columns]
            rows.append({**row, "hookpoint": Path(out).name})
    if not rows:
        return None
    path = Path(root) / SUMMARY
    columns.append("hookpoint")
    return _write_csv(path, columns, rows)


def _write_csv(path: Path, columns: list[str], rows: Iterable[Mapping[str, str]]) -> Path:
    """Write `rows` under `columns` (blank where a row lacks one) atomically."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    return path


def summary_by_feature(rows: Iterable[Mapping[str, str]], layer: int | str | None) -> dict[int, dict[str, str]]:
    """Summary rows by feature; for a feature with rows of several layers, `layer`'s row wins."""
    out: dict[int, dict[str, str]] = {}
    for row in rows:
        try:
            feature = int(row.get("feature", ""))
        except ValueError:
            continue
        if feature in out and layer is not None and str(row.get("layer")) != str(layer):
            continue
        out[feature] = dict(row)
    return out


# ------------------------------------------------------------------------------ run record
def write_run_config(out_dir: str | Path, doc: Mapping[str, Any]) -> Path:
    """Write the run record (`RUN_CONFIG`); the caller has removed secrets from `doc`."""
    path = Path(out_dir) / RUN_CONFIG
    atomic_write_json(path, _versioned(doc))
    return path


def read_run_config(out_dir: str | Path) -> dict[str, Any] | None:
    """The run record without `format_version`, or None when missing."""
    return _read_json(Path(out_dir) / RUN_CONFIG)


# ------------------------------------------------------------------------------ stages + all
def read_stages(out_dir: str | Path) -> dict[str, dict[str, Any]]:
    """`{stage: {fingerprint, started, finished, complete, failures}}` of earlier runs (empty when none)."""
    return _read_json(Path(out_dir) / STAGES) or {}


def write_stages(out_dir: str | Path, stages: Mapping[str, Any]) -> Path:
    path = Path(out_dir) / STAGES
    atomic_write_json(path, _versioned(stages))
    return path


def stage_output(stage: str) -> str:
    """The file whose existence marks a finished stage (relative to the interpret directory)."""
    return {"maxact": MAXACT, "logit_lens": LOGIT_LENS, "steering": EFFECTS, "explain": EXPLANATIONS,
            "score": SCORES_DIR, "dashboard": DASHBOARD}[stage]


def load_records(out_dir: str | Path, strict: bool = False) -> Records:
    """Every record of an interpret directory: maxact, logit lens, steering (texts + effects),
    explanations and scores of the max-act file's layer. Missing files leave their part empty;
    with `strict=False` unreadable files are skipped with a warning."""
    out_dir = Path(out_dir)
    records = read_maxact(out_dir, strict=strict) if (out_dir / MAXACT).is_file() else Records()
    read_logit_lens(out_dir, records, strict=strict)
    read_steering(out_dir, records, strict=strict)
    read_explanations(out_dir, records.layer, records, strict=strict)
    read_scores(out_dir, None, records, strict=strict)
    return records


__all__ = [
    "DASHBOARD", "DESCRIPTION_COLUMNS", "EFFECTS", "EXPLANATIONS", "EXPLANATIONS_DIR", "EXTRA_COLUMNS", "FINAL_STATUSES", "FORMAT_VERSION", "LOGIT_LENS",
    "MAXACT", "RETRYABLE_STATUSES", "RUN_CONFIG", "SUCCESS", "SCORES_DIR", "STAGES", "STEERING_DIR", "SUMMARY", "SUMMARY_COLUMNS", "Example", "Explanation", "FeatureRecord", "HEADLINES", "LABEL_FREE",
    "LogitLens", "Records", "Steering", "explanations_from_json", "explanations_json", "headline", "headline_field", "load_records",
    "read_explanations", "read_logit_lens", "read_run_config", "read_maxact", "read_scores", "read_stages", "read_steering",
    "read_steering_texts", "read_summary", "score_columns", "scores_path", "stage_output", "steering_text_path",
    "steering_texts_complete", "summary_by_feature", "write_combined_summary", "write_effects", "write_explanations", "write_logit_lens",
    "write_maxact", "write_run_config", "write_scores", "write_stages", "write_steering_texts", "write_summary",
]
