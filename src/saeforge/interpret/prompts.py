"""The explainer and scorer prompts: `saeforge/interpret/prompts.yaml` (package data), merged with `prompts.override`.

Prompts live only in YAML. A prompt is a `system` and a `user` template, and optionally a `prefill`:
the start of the reply, sent as a final assistant message for the model to continue (only to
clients whose `supports_prefill` is true; the reply to parse is then `prefill + reply`). `{prompt}` (the examples)
and, for scorers, `{explanation}` are the only placeholders substituted — other braces in the text
stay as they are, so templates may show JSON such as `[1, 0]` or `{"a": 1}` without escaping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import yaml

from saeforge.explainers.base import Message

DEFAULT_PROMPTS = Path(__file__).with_name("prompts.yaml")
"""The default prompt file, the base every override merges into."""

PROMPT_KEYS = ("system", "user", "prefill")
PLACEHOLDERS = ("prompt", "explanation")
REQUIRED = {
    "explain_maxact": ("prompt",),
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
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
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


def load_prompts(override_path: str | Path | None = None) -> dict[str, PromptTemplate]:
    """The default prompts, with the prompts named in `override_path` replaced.

    The override file names some prompts of the default file; for each, the keys it gives
    (`system` and/or `user`) replace the default text and the others are kept. An unknown prompt
    name or key is an error (a typo must not silently leave the default in place).
    """
    base_raw = _read(DEFAULT_PROMPTS)
    merged = {name: _entry(name, value, DEFAULT_PROMPTS) for name, value in base_raw.items()}
    if override_path not in (None, ""):
        path = Path(str(override_path)).expanduser()
        for name, value in _read(path).items():
            if name not in merged:
                raise ValueError(
                    f"prompts.override {path}: unknown prompt {name!r}; known prompts are {sorted(merged)}"
                )
            merged[name] = {**merged[name], **_entry(name, value, path)}
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


__all__ = ["DEFAULT_PROMPTS", "PromptTemplate", "fill", "load_prompts"]
