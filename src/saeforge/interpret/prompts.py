"""The explainer and scorer prompts: `saeforge/interpret/prompts.yaml` (package data), merged with an override file.

The override file is, first match wins (`resolve_prompt_file`): `prompts.override` (the config),
else the file named by the `PROMPT_CONFIG_FILE` environment variable, else `<run.dir>/prompts.yaml`
when it exists, else none. It is written in either schema:
- flat (saeforge's own): `explain_maxact: {system, user, prefill}`, `detection: {...}` — prompt names of
  the default file;
- nested (delphi's): `explainers: {default: {system, system_contrastive, system_single_token},
  steering: {system, ...}}` and `scorers: {<scorer>: {system, ...}}`, mapped onto the flat names by
  `NESTED_EXPLAINERS` (scorers keep their name). Its `explainers.default.cot` and
  `explainers.np_max_act` prompts have no saeforge counterpart: they are ignored with a warning.
An override that gives a `system` holding `{prompt}` (as delphi's do) but no `user` gets the default
user message without its `{prompt}`, so the examples appear once.

Prompts live only in YAML. A prompt is a `system` and a `user` template, and optionally a `prefill`:
the start of the reply, sent as a final assistant message for the model to continue (only to
clients whose `supports_prefill` is true; the reply to parse is then `prefill + reply`). `{prompt}` (the examples)
and, for scorers, `{explanation}` are the only placeholders substituted — other braces in the text
stay as they are, so templates may show JSON such as `[1, 0]` or `{"a": 1}` without escaping.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from saeforge.explainers.base import Message

log = logging.getLogger(__name__)

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.yaml")
"""The default prompt file, the base every override merges into."""
PROMPT_FILE_ENV = "PROMPT_CONFIG_FILE"
"""Environment variable naming an override file (used when `prompts.override` is not set)."""
RUN_DIR_PROMPTS = "prompts.yaml"
"""An override file found in the run directory (used when neither of the above is set)."""

NESTED_EXPLAINERS = {
    ("default", "system"): ("explain_maxact", "system"),
    ("default", "user"): ("explain_maxact", "user"),
    ("default", "prefill"): ("explain_maxact", "prefill"),
    ("default", "system_contrastive"): ("explain_contrastive", "system"),
    ("default", "system_single_token"): ("explain_single_token", "system"),
    ("steering", "system"): ("explain_steering", "system"),
    ("steering", "user"): ("explain_steering", "user"),
    ("steering", "prefill"): ("explain_steering", "prefill"),
}
"""`explainers.<section>.<key>` of the nested schema → (flat prompt name, key)."""
NESTED_IGNORED = {("default", "cot"), ("np_max_act", "system_concise")}
"""Nested-schema prompts with no saeforge counterpart (warned about, not used)."""

PROMPT_KEYS = ("system", "user", "prefill")
PLACEHOLDERS = ("prompt", "explanation")
REQUIRED = {
    "explain_maxact": ("prompt",),
    "explain_contrastive": ("prompt",),
    "explain_single_token": ("prompt",),
    "explain_steering": ("prompt",),
    "detection": ("prompt", "explanation"),
    "fuzz": ("prompt", "explanation"),
    "simulation": ("prompt", "explanation"),
    "intruder": ("prompt",),
    "surprisal": ("prompt", "explanation"),
    "surprisal_plain": ("prompt",),
}
"""Prompts the stages use, with the placeholders their user template must contain."""


@dataclass(frozen=True)
class PromptTemplate:
    """One prompt: a system message (may be empty), a user-message template and a reply prefill."""

    name: str
    system: str
    user: str
    prefill: str = ""
    """The start of the assistant's reply (e.g. "LABEL:"), continued by the model; "" → none."""

    def messages(self, prompt: str, prefill: bool = False, **fields: str) -> list[Message]:
        """The chat messages with `{prompt}` (and e.g. `{explanation}`) filled in.

        With `prefill` (pass the client's `supports_prefill`) and a non-empty `self.prefill`, a
        final assistant message holding the prefill is appended.
        """
        out: list[Message] = []
        if self.system.strip():
            out.append({"role": "system", "content": fill(self.system, prompt=prompt, **fields)})
        out.append({"role": "user", "content": fill(self.user, prompt=prompt, **fields)})
        if prefill and self.prefill:
            out.append({"role": "assistant", "content": self.prefill})
        return out


def fill(template: str, **fields: str) -> str:
    """Substitute `{name}` for the known placeholders only (single pass, so filled text is not rescanned)."""
    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        return str(fields[name]) if name in fields else match.group(0)

    return re.sub(r"\{(" + "|".join(PLACEHOLDERS) + r")\}", sub, template)


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"prompt file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"prompt file {path} must be a mapping of prompt name → {{system, user, prefill}}")
    return dict(data)


def _entry(name: str, value: Any, path: Path) -> dict[str, str]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{path}: prompt {name!r} must be a mapping with keys {list(PROMPT_KEYS)}")
    unknown = sorted(set(value) - set(PROMPT_KEYS))
    if unknown:
        raise ValueError(f"{path}: prompt {name!r} has unknown keys {unknown}; valid keys are {list(PROMPT_KEYS)}")
    for key, text in value.items():
        if not isinstance(text, str):
            raise ValueError(f"{path}: {name}.{key} must be a string, got {type(text).__name__}")
    return dict(value)


def resolve_prompt_file(override: str | Path | None, run_dir: str | Path | None = None) -> tuple[Path | None, str]:
    """The override file and where it came from: `prompts.override` > `$PROMPT_CONFIG_FILE` >
    `<run_dir>/prompts.yaml` (when it exists) > none (`(None, "default")`). A file named by the
    config or the environment variable must exist."""
    if override not in (None, ""):
        return Path(str(override)).expanduser(), "prompts.override"
    env = os.environ.get(PROMPT_FILE_ENV, "")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{PROMPT_FILE_ENV}={env}: no such prompt file")
        return path, PROMPT_FILE_ENV
    if run_dir is not None and (Path(run_dir) / RUN_DIR_PROMPTS).is_file():
        return Path(run_dir) / RUN_DIR_PROMPTS, "run.dir"
    return None, "default"


def _flatten_nested(data: Mapping[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    """Flat `{prompt: {key: text}}` from a file in either schema (the nested sections mapped)."""
    flat: dict[str, dict[str, Any]] = {}
    for name, value in data.items():
        if name not in ("explainers", "scorers"):
            flat[name] = value
            continue
        if not isinstance(value, Mapping):
            raise ValueError(f"{path}: {name} must be a mapping of sections")
        for section, keys in value.items():
            if not isinstance(keys, Mapping):
                raise ValueError(f"{path}: {name}.{section} must be a mapping of prompt keys")
            for key, text in keys.items():
                if name == "scorers":
                    flat.setdefault(str(section), {})[str(key)] = text
                elif (section, key) in NESTED_EXPLAINERS:
                    target, target_key = NESTED_EXPLAINERS[(section, key)]
                    flat.setdefault(target, {})[target_key] = text
                elif (section, key) in NESTED_IGNORED:
                    log.warning("%s: explainers.%s.%s has no saeforge counterpart; ignored", path, section, key)
                else:
                    known = sorted(f"explainers.{s}.{k}" for s, k in NESTED_EXPLAINERS)
                    raise ValueError(f"{path}: unknown prompt explainers.{section}.{key}; known are {known}")
    return flat


def load_prompts(override_path: str | Path | None = None) -> dict[str, PromptTemplate]:
    """The default prompts, with the prompts named in `override_path` replaced.

    The override file (flat or nested schema, see the module doc) names some prompts of the
    default file; for each, the keys it gives (`system` and/or `user`) replace the default text
    and the others are kept. An unknown prompt name or key is an error (a typo must not silently
    leave the default in place).
    """
    base_raw = _read(DEFAULT_PROMPTS)
    merged = {name: _entry(name, value, DEFAULT_PROMPTS) for name, value in base_raw.items()}
    if override_path not in (None, ""):
        path = Path(str(override_path)).expanduser()
        for name, value in _flatten_nested(_read(path), path).items():
            if name not in merged:
                raise ValueError(
                    f"prompt file {path}: unknown prompt {name!r}; known prompts are {sorted(merged)}"
                )
            given = _entry(name, value, path)
            merged[name] = {**merged[name], **given}
            if "{prompt}" in given.get("system", "") and "user" not in given:
                merged[name]["user"] = merged[name].get("user", "").replace("{prompt}", "").strip()
    prompts = {
        name: PromptTemplate(name=name, system=entry.get("system", ""), user=entry.get("user", ""),
                             prefill=entry.get("prefill", ""))
        for name, entry in merged.items()
    }
    for name, needed in REQUIRED.items():
        if name not in prompts:
            raise ValueError(f"prompt {name!r} is missing from {DEFAULT_PROMPTS}")
        for placeholder in needed:
            text = prompts[name].system + prompts[name].user  # never the prefill: it is not filled
            if "{" + placeholder + "}" not in text:
                raise ValueError(f"prompt {name!r} must contain the placeholder {{{placeholder}}}")
    return prompts


def prompts_json(prompts: Mapping[str, PromptTemplate]) -> dict[str, dict[str, str]]:
    """`{name: {system, user, prefill}}`: the effective prompts, for the run record."""
    return {name: {"system": p.system, "user": p.user, "prefill": p.prefill} for name, p in sorted(prompts.items())}


__all__ = ["DEFAULT_PROMPTS", "PROMPT_FILE_ENV", "RUN_DIR_PROMPTS", "PromptTemplate", "fill", "load_prompts", "prompts_json",
           "resolve_prompt_file"]
