"""A scripted explainer on the shared chat-completions server (tests/chat_completions_server.py) and a
tiny maxact doc.

Used by test_explain.py, test_score.py and the pipeline test: `ScriptedChat(script)` answers each request with
`script(body) -> str | int` (an int is an HTTP error status) and, when the request asks for
logprobs, one logprob entry per character-level token of the answer, each with top alternatives
"0"/"1" so that P("1") follows the answer. Completions requests with `echo` (the surprisal
scorer's prompt logprobs) are answered from `prompt_logprobs`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from saeforge.interpret.records import Records
from tests.chat_completions_server import ChatCompletionsServer, Reply

Script = Callable[[dict], "str | int"]


def binary_logprobs(text: str, top_k: int) -> list[dict[str, Any]]:
    """Character-level tokens; each "0"/"1" has the other digit as its runner-up, so P("1") follows the answer."""
    content = []
    for ch in re.findall(r"[01]|[^01]+", text):
        top = [{"token": ch, "logprob": -0.01, "bytes": None}]
        if ch in "01" and len(ch) == 1:
            other = "0" if ch == "1" else "1"
            top.append({"token": other, "logprob": -4.6, "bytes": None})
        content.append({"token": ch, "logprob": -0.01, "bytes": None, "top_logprobs": top[:top_k]})
    return content


PromptLogprobs = Callable[[str, list[int], list[str]], list[float]]
"""`(prompt, text_offsets, tokens) -> logprob per token` for echoed completions requests."""


def word_tokens(text: str) -> tuple[list[str], list[int]]:
    """Tokens of an echoed prompt: each run of whitespace joined to the word after it; their offsets."""
    tokens = re.findall(r"\s*\S+|\s+", text)
    offsets, at = [], 0
    for tok in tokens:
        offsets.append(at)
        at += len(tok)
    return tokens, offsets


class ScriptedChat(ChatCompletionsServer):
    """The server; `requests` is every request body in arrival order. A request with a `prompt`
    (the completions endpoint) is answered, when `prompt_logprobs` is given, with the echoed prompt
    split into `word_tokens` and their scripted logprobs (the first token's is null, as OpenAI
    servers send it); without `prompt_logprobs` it gets HTTP 404, as from a chat-only API."""

    def __init__(self, script: Script, prompt_logprobs: PromptLogprobs | None = None) -> None:
        self.prompt_logprobs = prompt_logprobs

        def reply(n: int, body: dict) -> Reply:
            if "prompt" in body:
                return Reply() if prompt_logprobs is not None else Reply(status=404)
            answer = script(body)
            return Reply(status=answer) if isinstance(answer, int) else Reply(text=answer)

        super().__init__(reply, token_logprobs=binary_logprobs)

    def payload(self, reply: Reply, body: dict) -> dict[str, Any]:
        if "prompt" not in body or reply.status != 200 or self.prompt_logprobs is None:
            return super().payload(reply, body)
        tokens, offsets = word_tokens(body["prompt"])
        values: list[float | None] = list(self.prompt_logprobs(body["prompt"], offsets, tokens))
        values[0] = None
        echoed = {"tokens": tokens + [" x"], "token_logprobs": values + [-0.1],
                  "text_offset": offsets + [len(body["prompt"])], "top_logprobs": [None] + [{}] * len(tokens)}
        return {"id": "cmpl-test", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "text": body["prompt"] + " x", "logprobs": echoed, "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": 1, "total_tokens": len(tokens) + 1}}

    @property
    def requests(self) -> list[dict]:
        with self.lock:
            return [seen.body for seen in self.seen]

    def client(self, **kwargs: Any):
        from saeforge.explainers.openai_compat import OpenAICompatClient

        kwargs = {"max_retries": 0, "timeout_s": 10, **kwargs}
        return OpenAICompatClient(self.base_url, "scripted", **kwargs)


def last_user(body: dict) -> str:
    return [m for m in body["messages"] if m["role"] == "user"][-1]["content"]


def example_lines(body: dict) -> list[str]:
    """The `Example i: …` lines of the last user message."""
    return re.findall(r"^Example \d+: (.*)$", last_user(body), flags=re.MULTILINE)


# ------------------------------------------------------------------------------ a tiny maxact
DOG = ["The", " dog", " ran", " to", " the", " park"]
CAT = ["A", " cat", " sat", " on", " the", " mat"]


def _example(seq: int, tokens: list[str], hot: int, value: float, bucket: int | None = None) -> dict:
    acts = [0.0] * len(tokens)
    acts[hot] = value
    ex = {"activation": value, "tokens": tokens, "token_ids": list(range(len(tokens))), "acts": acts,
          "max_pos": hot, "seq": seq, "start": 0}
    return ex if bucket is None else {"bucket": bucket, **ex}


def make_maxact(features: dict[int, str] | None = None, n_top: int = 8, n_quant: int = 8, n_non: int = 8) -> dict:
    """Features whose activating windows contain a hot token ' dog' (kind "dog") or ' cat' (kind "cat");
    non-activating windows are of the other kind. Sequence ids are unique per feature and kind;
    one quantile example repeats a top window (the split must deduplicate it)."""
    features = features or {0: "dog", 1: "cat"}
    out: dict[str, Any] = {}
    for f, kind in features.items():
        pos, neg = (DOG, CAT) if kind == "dog" else (CAT, DOG)
        base = 1000 * (f + 1)
        top = [_example(base + i, pos, 1, 10.0 - i * 0.5) for i in range(n_top)]
        quant = [_example(base + 100 + i, pos, 1, 1.0 + i * 0.3, bucket=i % 4) for i in range(n_quant)]
        quant.append({**top[0], "bucket": 3})  # duplicate window
        non = [{"tokens": neg, "token_ids": list(range(6)), "seq": base + 500 + i, "start": 0} for i in range(n_non)]
        out[str(f)] = {"a_max": 10.0, "frequency": 0.01, "top": top, "quantile_examples": quant, "non_activating": non}
    return {"hookpoint": "layers.2", "layer": 2, "d_sae": 16, "features": out}


def records_of(maxact: dict) -> Records:
    """The records of a max-act document (what the max-act file gives the later stages)."""
    return Records.from_maxact_json(maxact)
