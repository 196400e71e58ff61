"""Label-free descriptions of a feature from its own data, and the test for labels that say nothing.

- `peak_tokens`: the token at which each activating example peaks, counted (the feature's "top
  activating tokens").
- `top_token_description`: those tokens, then the logit-lens top tokens where a lens exists, as one
  line, e.g. `act: left ×7, right ×3 | lens: Left, right` — what the `top_tokens` column of the
  summary, the dashboard and the demo show beside every label. It needs no explainer, so it is
  there even when the explainer (e.g. the 135M default) cannot label.
- `is_generic_label`: "The Feature", "The LABEL", "The feature is a feature of the language model",
  or a label that only echoes the prompt; the explain stage gives such labels `status: generic`.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping

from saeforge.interpret.records import FeatureRecord

N_TOP_TOKENS = 5
"""Tokens listed per part of a description."""

GENERIC_WORDS = frozenset({"the", "a", "an", "this", "that", "feature", "features", "label", "latent", "neuron", "concept",
                           "pattern", "unknown", "none", "na", "n", "various", "misc", "miscellaneous", "text", "token",
                           "tokens", "word", "words", "is", "of", "it", "and", "or"})
"""Words that say nothing about what a feature detects (see `is_generic_label`)."""

ECHO_MIN_WORDS = 3
"""A label of at least this many words found verbatim in the prompt's instructions is an echo."""


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9 ]+", " ", text.lower()).split()


def is_generic_label(label: str, prompt_text: str = "") -> bool:
    """A label that names no concept. Lower-cased and kept to letters, digits and spaces, it is
    generic when every word is in `GENERIC_WORDS` ("The feature", "The LABEL", "a pattern"), when it
    holds "feature" twice ("The feature is a feature of ..."), when it is a template placeholder left
    unfilled (`<label>`, `[LABEL]`, `{label}`), or when it is an echo: at least `ECHO_MIN_WORDS`
    words that appear verbatim in `prompt_text` (the prompt's instructions, without the examples)."""
    text = label.strip()
    if re.search(r"[<\[{]\s*label\s*[>\]}]", text, re.IGNORECASE):
        return True
    words = _words(text)
    if not words or all(w in GENERIC_WORDS for w in words) or words.count("feature") + words.count("features") >= 2:
        return True
    return len(words) >= ECHO_MIN_WORDS and f" {' '.join(words)} " in f" {' '.join(_words(prompt_text))} "


def _display(token: str) -> str:
    """A token for one line: surrounding whitespace dropped, inner newlines/tabs escaped; a pure
    whitespace token shown as its repr."""
    shown = token.strip()
    if not shown:
        return repr(token)
    return shown.replace("\n", "\\n").replace("\t", "\\t")


def peak_tokens(examples: Iterable[Mapping[str, Any]]) -> list[tuple[str, int, float]]:
    """`(token, count, mean peak activation)` of the token at which each example peaks (`max_pos`,
    else the largest of `acts`), tokens merged by their displayed form; most frequent first, ties
    by the larger mean activation."""
    counts: dict[str, list[float]] = {}
    for ex in examples:
        tokens, acts = list(ex.get("tokens") or []), [float(a) for a in ex.get("acts") or []]
        pos = ex.get("max_pos")
        if not isinstance(pos, int) or not 0 <= pos < len(tokens):
            if not acts or not tokens:
                continue
            pos = max(range(min(len(acts), len(tokens))), key=acts.__getitem__)
        value = float(ex.get("activation") if ex.get("activation") is not None else (acts[pos] if pos < len(acts) else 0.0))
        counts.setdefault(_display(str(tokens[pos])), []).append(value)
    ranked = [(tok, len(vals), sum(vals) / len(vals)) for tok, vals in counts.items()]
    return sorted(ranked, key=lambda item: (-item[1], -item[2], item[0]))


def top_token_description(rec: FeatureRecord, n: int = N_TOP_TOKENS) -> str:
    """`act: tok ×count, … | lens: tok, …` from the record's top examples and logit lens ("" when
    it has neither)."""
    parts = []
    ranked = peak_tokens(ex.to_json() for ex in rec.top)
    if ranked:
        parts.append("act: " + ", ".join(f"{tok} ×{count}" for tok, count, _ in ranked[:n]))
    if rec.logit_lens is not None and rec.logit_lens.top:
        parts.append("lens: " + ", ".join(_display(str(pair[0])) for pair in rec.logit_lens.top[:n]))
    return " | ".join(parts)


__all__ = ["GENERIC_WORDS", "is_generic_label", "peak_tokens", "top_token_description"]
