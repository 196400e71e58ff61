"""A chat-completions endpoint on 127.0.0.1 (stdlib http.server, real sockets, no mocks).

`ChatCompletionsServer(script)` answers the n-th request (0-based) with `script(n, body) -> Reply`
and records every request in `seen`, tracking the most requests handled at once. When a request
asks for logprobs, `token_logprobs(text, top_k)` gives the `content` list of the choice's logprobs.
Shared by the OpenAI-client tests (tests/llm) and the scripted explainer (tests/interpret).
"""

from __future__ import annotations

import json
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
                    data = json.dumps(owner.payload(reply, body)).encode()
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
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
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

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
        self.server.shutdown()
        self.server.server_close()
