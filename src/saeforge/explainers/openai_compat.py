"""Explainer client for any OpenAI-compatible chat-completions server (vLLM, OpenRouter, OpenAI)."""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import openai
from openai.types.chat import ChatCompletion
from tqdm.auto import tqdm

from saeforge.explainers.base import (
    ChatParams, ChatRequest, ChatResult, Continuation, Message, TokenLogprob, log_throughput,
)
from saeforge.explainers.cache import ResponseCache, request_key

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
"""HTTP statuses worth retrying; any other 4xx fails at once."""
UNREACHABLE_AFTER = 3
"""Failed connection attempts (nothing listening, unknown host), with no reply from the server
ever, after which every request of the client fails at once as "server unreachable"."""


def parse_retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``retry-after`` (seconds or HTTP date)."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_logprobs(choice: Any) -> list[TokenLogprob] | None:
    content = getattr(getattr(choice, "logprobs", None), "content", None)
    if content is None:
        return None
    return [
        TokenLogprob(
            token=item.token,
            logprob=float(item.logprob),
            top={alt.token: float(alt.logprob) for alt in (item.top_logprobs or [])},
        )
        for item in content
    ]


def _could_not_connect(err: BaseException) -> bool:
    """True when the connection itself failed (httpx's ConnectError: refused, unknown host), not
    a connection dropped by a server that accepted it."""
    return type(err.__cause__).__name__ == "ConnectError"


def _connect_detail(err: BaseException) -> str:
    """"connection refused" when that is the root cause, else the transport's message."""
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return f"connection error: {err.__cause__ or err}"


class BadReply(ValueError):
    """A reply with status 200 that is not a usable chat completion (retried like a 5xx)."""


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _result_from(response: Any) -> ChatResult:
    """The ChatResult of a parsed reply; raises BadReply when it is not a chat completion.

    The openai client hands back a plain ``str`` for a non-JSON Content-Type (an HTML error page
    from a proxy, say), and builds its response models without validation, so check the shape.
    """
    if not isinstance(response, ChatCompletion):
        raise BadReply(f"reply is not a chat completion: {type(response).__name__} {_clip(repr(response), 120)}")
    if not response.choices:
        raise BadReply("reply has no choices")
    choice = response.choices[0]
    message = getattr(choice, "message", None)
    content = getattr(message, "content", None)
    if message is None or not (content is None or isinstance(content, str)):
        raise BadReply(f"reply's first choice has no message text: {_clip(repr(choice), 120)}")
    return ChatResult(text=content or "", logprobs=_parse_logprobs(choice))


class OpenAICompatClient:
    """Bounded-concurrency chat client with retries, backoff and an on-disk cache.

    The API key is read from the environment variable *named* by ``api_key_env`` (``"EMPTY"``
    when it is None) and is kept only inside the ``openai.AsyncOpenAI`` object, never in this
    object's repr or config. The openai client's own retries are off: ours are the one policy
    (exponential backoff with jitter, honouring ``Retry-After`` on 429/5xx, timeouts, connection
    errors and malformed 200 replies). A request that still fails returns
    ``ChatResult(status="error")`` whose ``error`` names ``base_url``; nothing a server sends
    ends the run.

    Fail-fast: once ``UNREACHABLE_AFTER`` attempts could not connect at all (connection refused,
    unknown host) and the server has never answered this client, the server counts as
    unreachable: every pending and later request returns ``"<base_url>: server unreachable
    (connection refused)"`` (or the transport's message) without further attempts. A server that answered once (any status)
    never counts as unreachable, so transient errors keep their retries.

    With ``prefill`` (for vLLM servers) a request whose last message is from the assistant is sent
    with ``extra_body={"continue_final_message": True, "add_generation_prompt": False}``, so the
    server continues that text; the result holds only the continuation. Hosted APIs (OpenAI,
    OpenRouter) do not continue assistant messages: leave ``prefill`` off there, and prompts then
    send no prefill message. ``repetition_penalty`` other than 1 also goes through ``extra_body``
    (vLLM's sampling extension).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None = None,
        max_in_flight: int = 32,
        max_retries: int = 5,
        timeout_s: float = 120.0,
        cache_dir: Path | str | None = None,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 60.0,
        max_retry_after_s: float = 300.0,
        prefill: bool = False,
    ) -> None:
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {max_in_flight}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.max_in_flight = max_in_flight
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.supports_prefill = bool(prefill)
        self.cache = ResponseCache(cache_dir) if cache_dir is not None else None
        if api_key_env is not None and not os.environ.get(api_key_env):
            raise ValueError(f"environment variable {_shown(api_key_env)} (the explainer API key) is not set")
        # Per event loop: the httpx pool and the semaphore belong to the loop that made them.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._reached = False  # the server answered at least once (any status)
        self._connect_failures = 0  # attempts that could not connect, while never reached
        self._unreachable: str | None = None  # the reason once the server counts as unreachable

    def __repr__(self) -> str:
        return (
            f"OpenAICompatClient(base_url={self.base_url!r}, model={self.model!r}, "
            f"api_key_env={_shown(self.api_key_env)!r}, max_in_flight={self.max_in_flight}, "
            f"max_retries={self.max_retries}, timeout_s={self.timeout_s}, prefill={self.supports_prefill}, "
            f"cache={self.cache!r})"
        )

    def _session(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._client is None or self._semaphore is None:
            api_key = os.environ.get(self.api_key_env, "") if self.api_key_env else "EMPTY"
            # Our own httpx client: openai's default one schedules its close on whatever loop
            # runs when it is garbage-collected, which fails once its own loop has closed.
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=api_key or "EMPTY",
                timeout=self.timeout_s,
                max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(),
            )
            self._semaphore = asyncio.Semaphore(self.max_in_flight)
            self._loop = loop
        return self._client, self._semaphore

    async def aclose(self) -> None:
        """Close the connection pool of the current event loop (optional; GC also frees it)."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.close()
        self._client = self._semaphore = self._loop = None

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: uniform in [½, 1] × min(max, base·2^attempt)."""
        return min(self.backoff_max_s, self.backoff_base_s * 2**attempt) * random.uniform(0.5, 1.0)

    def _request_kwargs(self, messages: list[Message], params: ChatParams) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "max_tokens": params.max_tokens,
        }
        if params.seed is not None:
            kwargs["seed"] = params.seed
        if params.logprobs:
            kwargs["logprobs"] = True
            if params.top_logprobs:
                kwargs["top_logprobs"] = params.top_logprobs
        if params.stop:
            kwargs["stop"] = list(params.stop)
        extra: dict[str, Any] = {}
        if params.repetition_penalty != 1.0:
            extra["repetition_penalty"] = params.repetition_penalty
        if self.supports_prefill and messages and messages[-1]["role"] == "assistant":
            extra.update(continue_final_message=True, add_generation_prompt=False)
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    async def _request(self, messages: list[Message], params: ChatParams) -> ChatResult:
        """Send one request, retrying what may pass on a second try; never raises for a bad reply.

        Retried (backoff, or ``Retry-After`` when the server sends one): 408/409/425/429/5xx,
        timeouts (``timeout_s`` bounds the whole request, so a reply that never finishes ends
        too), connection errors (refused, dropped), and 200 replies that are not a usable chat
        completion (invalid or truncated JSON, an HTML page, no ``choices``). Any other status
        fails at once. Every error result names ``base_url``.
        """
        kwargs = self._request_kwargs(messages, params)
        return await self._send(lambda client: client.chat.completions.create(**kwargs), _result_from)

    async def _send(self, create: Callable[[openai.AsyncOpenAI], Awaitable[Any]],
                    parse: Callable[[Any], ChatResult]) -> ChatResult:
        """The retry loop of `_request` around one call `create(client)` whose reply `parse` reads."""
        client, semaphore = self._session()
        reason = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if self._unreachable is not None:
                return self._error(self._unreachable)
            retry_after: float | None = None
            try:
                async with semaphore:
                    if self._unreachable is not None:
                        return self._error(self._unreachable)
                    response = await asyncio.wait_for(create(client), self.timeout_s)
                self._reached = True
                return parse(response)
            except openai.APIStatusError as err:
                self._reached = True
                reason = f"HTTP {err.status_code}: {err.message}"
                if err.status_code not in RETRYABLE_STATUS:
                    return self._error(reason)
                retry_after = parse_retry_after(err.response.headers)
            except (openai.APITimeoutError, asyncio.TimeoutError):
                reason = f"timed out after {self.timeout_s} s"
            except openai.APIConnectionError as err:
                reason = f"connection error: {err.__cause__ or err}"
                if _could_not_connect(err) and not self._reached:
                    reason = f"server unreachable ({_connect_detail(err)})"
                    self._connect_failures += 1
                    if self._connect_failures >= UNREACHABLE_AFTER:
                        if self._unreachable is None:
                            self._unreachable = reason
                            log.warning("%s: %s; failing every remaining request at once", self.base_url, reason)
                        return self._error(self._unreachable)
            except Exception as err:  # noqa: BLE001 — malformed replies: bad JSON, HTML, no choices, ...
                self._reached = True
                reason = f"bad reply: {type(err).__name__}: {_clip(str(err))}"
            if attempt == self.max_retries:
                break
            if retry_after is not None:
                delay = min(retry_after, self.max_retry_after_s) + random.uniform(0, 0.1)
            else:
                delay = self._backoff(attempt)
            log.debug("retry %d/%d in %.2f s: %s", attempt + 1, self.max_retries, delay, reason)
            await asyncio.sleep(delay)
        log.warning("request to %s failed after %d attempts: %s", self.base_url, self.max_retries + 1, reason)
        return self._error(reason)

    def _error(self, reason: str) -> ChatResult:
        return ChatResult(text="", status="error", error=f"{self.base_url}: {reason}")

    async def chat(self, messages: list[Message], params: ChatParams) -> ChatResult:
        """One request: from the cache when present, else from the server (with retries)."""
        return await self._cached(messages, params, lambda: self._request(messages, params))

    async def _cached(self, messages: list[Message], params: ChatParams,
                      fetch: Callable[[], Awaitable[ChatResult]]) -> ChatResult:
        """The cached result of (messages, params) when present, else `fetch()`'s, then cached."""
        key = request_key(self.model, messages, params) if self.cache else None
        if self.cache is not None and key is not None:
            hit = self.cache.get(key)
            if hit is not None:
                return hit
        result = await fetch()
        if self.cache is not None and key is not None:
            self.cache.put(key, result)
        return result

    async def _all(self, items: list[tuple[Any, ...]], call: Callable[..., Awaitable[ChatResult]], desc: str,
                   progress: bool) -> list[ChatResult]:
        """`call(*item)` for every item concurrently (the semaphore bounds the wire), with a progress
        bar and one throughput line; input order kept."""
        start = time.perf_counter()
        with tqdm(total=len(items), desc=f"{desc} ({self.model})", disable=not progress) as bar:

            async def one(item: tuple[Any, ...]) -> ChatResult:
                result = await call(*item)
                bar.update(1)
                return result

            results = await asyncio.gather(*(one(item) for item in items))
        log_throughput(log, results, time.perf_counter() - start)
        return list(results)

    async def chat_many(
        self, requests: list[ChatRequest], progress: bool = True
    ) -> list[ChatResult]:
        """All requests concurrently (at most ``max_in_flight`` on the wire); input order kept."""
        return await self._all(list(requests), self.chat, "explain", progress)

    async def continuation_logprobs(self, context: str, continuation: str) -> ChatResult:
        """Log-probabilities of `continuation`'s tokens after `context`, from the completions
        endpoint with ``echo`` and ``logprobs`` (vLLM serves it; chat-only hosted APIs answer an
        HTTP error, returned as an error result). Cached like chat requests."""
        messages = [{"role": "context", "content": context}, {"role": "continuation", "content": continuation}]
        kwargs = {"model": self.model, "prompt": context + continuation, "echo": True, "logprobs": 0,
                  "max_tokens": 1, "temperature": 0.0}

        async def fetch() -> ChatResult:
            result = await self._send(lambda client: client.completions.create(**kwargs),
                                      lambda response: _continuation_from(response, context, continuation))
            if not result.ok and result.error and "HTTP 4" in result.error:
                result = ChatResult(text="", status="error", error=f"{result.error} (prompt logprobs need the "
                                    "completions endpoint with echo + logprobs, as vLLM serves it)")
            return result

        return await self._cached(messages, ECHO_PARAMS, fetch)

    async def continuation_logprobs_many(
        self, pairs: list[Continuation], progress: bool = True
    ) -> list[ChatResult]:
        """All pairs concurrently (at most ``max_in_flight`` on the wire); input order kept."""
        return await self._all(list(pairs), self.continuation_logprobs, "prompt logprobs", progress)


ECHO_PARAMS = ChatParams(temperature=0.0, max_tokens=1, logprobs=True, top_logprobs=None)
"""The fixed settings of a continuation-scoring request (part of its cache key)."""


def _continuation_from(response: Any, context: str, continuation: str) -> ChatResult:
    """The continuation's token logprobs from an echoed completion: the prompt tokens that overlap
    the continuation (by ``text_offset``, else by the tokens' cumulative length), so a token that
    joins the context's last characters to the continuation's first counts; the one generated
    token is dropped."""
    choices = getattr(response, "choices", None)
    lp = getattr(choices[0], "logprobs", None) if choices else None
    tokens, values = getattr(lp, "tokens", None), getattr(lp, "token_logprobs", None)
    if not tokens or values is None or len(values) != len(tokens):
        raise BadReply(f"reply has no echoed prompt logprobs: {_clip(repr(response), 120)}")
    offsets = getattr(lp, "text_offset", None)
    if not offsets or len(offsets) != len(tokens):
        offsets, at = [], 0
        for tok in tokens:
            offsets.append(at)
            at += len(tok)
    start, end = len(context), len(context) + len(continuation)
    ends = [max(o + len(t), n) for o, t, n in zip(offsets, tokens, [*offsets[1:], 0])]
    picked = [TokenLogprob(token=t, logprob=float(v), top={})
              for t, v, o, e in zip(tokens, values, offsets, ends) if o < end and e > start and v is not None]
    if continuation and not picked:
        raise BadReply("no echoed prompt token lies in the continuation")
    return ChatResult(text=continuation, logprobs=picked)


def _shown(name: str | None) -> str | None:
    """The env-var name as it may be printed: masked when it looks like a key pasted in by mistake."""
    from saeforge.config import ENV_NAME, looks_like_key, mask

    if name is None or (ENV_NAME.fullmatch(name) and not looks_like_key(name)):
        return name
    return mask(name)
