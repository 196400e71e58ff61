"""The explainer-client interface: chat requests in, text (and optional logprobs) out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Protocol, TypedDict, runtime_checkable

from saeforge.config import ChatParamsConfig

Message = dict[str, str]
"""One chat message: ``{"role": "system"|"user"|"assistant", "content": ...}``."""


class TokenLogprob(TypedDict):
    """Log-probability of one generated token and of its top alternatives."""

    token: str
    logprob: float
    top: dict[str, float]


@dataclass(frozen=True)
class ChatParams:
    """Sampling settings of one request (immutable, hashable, part of the cache key); the defaults
    and documentation of the settings are saeforge.config.ChatParamsConfig (`explainer.params`)."""

    temperature: float = ChatParamsConfig.temperature
    """0 means greedy decoding."""
    top_p: float = ChatParamsConfig.top_p
    """Nucleus-sampling mass; ignored when greedy."""
    max_tokens: int = ChatParamsConfig.max_tokens
    """Most tokens to generate."""
    logprobs: bool = ChatParamsConfig.logprobs
    """Return the log-probability of every generated token."""
    top_logprobs: int | None = ChatParamsConfig.top_logprobs
    """With ``logprobs``: how many alternatives per position to return (None or 0: none)."""
    seed: int | None = ChatParamsConfig.seed
    """Sampling seed (ignored when greedy; best effort on remote servers)."""
    repetition_penalty: float = ChatParamsConfig.repetition_penalty
    """Penalty (> 1) on tokens already in the prompt or the reply; 1.0 means off (local: generate's
    ``repetition_penalty``; OpenAI-compatible: sent through ``extra_body``, which vLLM understands)."""
    stop: tuple[str, ...] = ()
    """Generation ends at the first of these strings, which is not part of the returned text."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str) or not isinstance(self.stop, tuple):
            stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
            object.__setattr__(self, "stop", tuple(str(s) for s in stop))
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {self.top_logprobs}")


@dataclass(frozen=True)
class ChatResult:
    """What one request produced. Clients return errors here instead of raising."""

    text: str
    """The generated text ("" on error)."""
    logprobs: list[TokenLogprob] | None = None
    """Per generated token, when ``ChatParams.logprobs`` was asked for and available."""
    status: Literal["ok", "error"] = "ok"
    error: str | None = None
    """Why the request failed (after retries), when ``status == "error"``."""
    cached: bool = False
    """True when the result came from the on-disk cache, with no request made."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


ChatRequest = tuple[list[Message], ChatParams]


def assistant_prefill(messages: list[Message]) -> str:
    """The start of the reply written for the model (a final assistant message), or "".

    A client that continues that message returns only the continuation, so the whole reply is
    ``assistant_prefill(messages) + result.text``.
    """
    if messages and messages[-1].get("role") == "assistant":
        return messages[-1].get("content", "")
    return ""


@runtime_checkable
class ExplainerClient(Protocol):
    """A chat model that explains features. Implementations never raise for a failed request."""

    supports_prefill: bool
    """True when a final assistant message is continued (prefill) rather than answered; prompts
    add their prefill message only for such clients."""

    async def chat(self, messages: list[Message], params: ChatParams) -> ChatResult:
        """Answer one chat request."""
        ...

    async def chat_many(
        self, requests: list[ChatRequest], progress: bool = True
    ) -> list[ChatResult]:
        """Answer many requests (concurrently or batched); results in the order of ``requests``."""
        ...


Continuation = tuple[str, str]
"""``(context, continuation)``: the continuation's tokens are scored given the context."""


@runtime_checkable
class ContinuationScorer(Protocol):
    """A client that also scores given text: the log-probability of each token of a continuation
    after a context (prompt logprobs), as the surprisal scorer needs. Implemented by the local
    client (a forward pass) and the OpenAI-compatible client (the completions endpoint with
    ``echo`` + ``logprobs``, which vLLM serves; hosted chat-only APIs do not)."""

    async def continuation_logprobs_many(
        self, pairs: list[Continuation], progress: bool = True
    ) -> list[ChatResult]:
        """Per pair (in order) a result whose ``logprobs`` holds one entry per continuation token
        and whose ``text`` is the continuation; failures are error results, never raised."""
        ...


def log_throughput(logger: logging.Logger, results: list[ChatResult], seconds: float) -> None:
    """One INFO line: how many requests, cached, failed, and the rate of those actually sent."""
    n_cached = sum(r.cached for r in results)
    n_err = sum(not r.ok for r in results)
    sent = len(results) - n_cached
    logger.info(
        "%d requests in %.1f s (%d cached, %d errors, %.2f req/s sent)",
        len(results), seconds, n_cached, n_err, sent / seconds if seconds > 0 else 0.0,
    )
