"""A chat-completions endpoint on 127.0.0.1 (stdlib http.server, real sockets, no mocks).

`ChatCompletionsServer(script)` answers the n-th request (0-based) with `script(n, body) -> Reply`
and records every request in `seen`, tracking the most requests handled at once. When a request
asks for logprobs, `token_logprobs(text, top_k)` gives the `content` list of the choice's logprobs.
Shared by the OpenAI-client tests (tests/llm) and the scripted explainer (tests/interpret).

A `Reply` with a `fault` misbehaves the way real servers and proxies do (see `FAULTS`);
`hostile_script(seed, ...)` answers with a seeded random mix of those faults and successes.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """What the server answers to one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    text: str | None = None  # None: echo the last message
    fault: str | None = None
    """One of `FAULTS` (with status 200): a malformed or missing reply instead of a completion."""


FAULTS = ("truncated_json", "invalid_json", "html", "empty_choices", "hang", "drop")
"""Misbehaviours of a 200 reply: the JSON body cut short (Content-Length matches the cut body); a
body that is not JSON; an HTML page with Content-Type text/html; a completion with `choices: []`;
no reply at all until the server shuts down; the connection closed without any reply."""

HOSTILE = ("500", "429") + FAULTS
"""Everything `hostile_script` picks from (besides success): 500s, 429 with Retry-After, `FAULTS`."""


def hostile_script(seed: int, p_fail: float = 0.6, retry_after: str = "0.05",
                   kinds: tuple[str, ...] = HOSTILE) -> Callable[[int, dict], Reply]:
    """A script that fails request n with probability `p_fail`, the failure kind drawn (seeded) from `kinds`."""

    def script(n: int, body: dict) -> Reply:
        rng = random.Random(seed * 1_000_003 + n)
        if rng.random() >= p_fail:
            return Reply()
        kind = rng.choice(kinds)
        if kind == "500":
            return Reply(500)
        if kind == "429":
            return Reply(429, {"Retry-After": retry_after})
        return Reply(fault=kind)

    return script


@dataclass
class Seen:
    """One request as the server received it."""

    at: float
    authorization: str
    body: dict


def word_logprobs(text: str, top_k: int) -> list[dict[str, Any]]:
    """One token per word, each its own only alternative."""
    return [{"token": word, "logprob": -0.5, "bytes": None,
             "top_logprobs": [{"token": word, "logprob": -0.5, "bytes": None}][:top_k]}
            for word in text.split()]


def completion(body: dict, text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """A `chat.completion` object with one choice."""
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": "stop",
                     "logprobs": {"content": logprobs} if logprobs is not None else None,
                     "message": {"role": "assistant", "content": text}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class ChatCompletionsServer:
    """The server; use it as a context manager (start / shut down)."""

    def __init__(self, script: Callable[[int, dict], Reply] = lambda n, body: Reply(),
                 token_logprobs: Callable[[str, int], list[dict[str, Any]]] = word_logprobs) -> None:
        self.script, self.token_logprobs = script, token_logprobs
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.closing = threading.Event()  # releases handlers stuck in a "hang" fault
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    n = len(owner.seen)
                    owner.seen.append(Seen(time.monotonic(), self.headers.get("Authorization", ""), body))
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    reply = owner.script(n, body)
                    time.sleep(reply.delay_s)
                    if reply.fault == "hang":
                        owner.closing.wait(300)
                        self.close_connection = True
                        return
                    if reply.fault == "drop":
                        self.close_connection = True
                        return
                    data, content_type = owner.body(reply, body)
                    self.send_response(reply.status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up
                finally:
                    with owner.lock:
                        owner.in_flight -= 1

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog (5) drops bursts of concurrent connections

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def body(self, reply: Reply, body: dict) -> tuple[bytes, str]:
        """The reply's bytes and Content-Type, malformed as its `fault` says."""
        if reply.fault == "html":
            return b"<html><body><h1>502 Bad Gateway</h1></body></html>", "text/html"
        if reply.fault == "invalid_json":
            return b"this is {not json", "application/json"
        payload = self.payload(reply, body)
        if reply.fault == "empty_choices":
            payload["choices"] = []
        data = json.dumps(payload).encode()
        if reply.fault == "truncated_json":
            data = data[: len(data) // 2]
        elif reply.fault not in (None, "empty_choices"):
            raise ValueError(f"unknown fault {reply.fault!r}; known: {FAULTS}")
        return data, "application/json"

    def payload(self, reply: Reply, body: dict) -> dict[str, Any]:
        if reply.status != 200:
            return {"error": {"message": f"scripted {reply.status}", "type": "test", "code": reply.status}}
        text = reply.text if reply.text is not None else body["messages"][-1]["content"]
        logprobs = self.token_logprobs(text, body.get("top_logprobs") or 0) if body.get("logprobs") else None
        return completion(body, text, logprobs)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> ChatCompletionsServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
