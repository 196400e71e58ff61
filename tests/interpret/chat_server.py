"""A scripted OpenAI chat-completions server on 127.0.0.1 (stdlib, real sockets) and a tiny maxact doc.

Used by test_explain.py and test_score.py: `ScriptedChat(script)` answers each request with
`script(body) -> str | int` (an int is an HTTP error status) and, when the request asks for
logprobs, one logprob entry per character-level token of the answer, each with top alternatives
"0"/"1" so that P("1") follows the answer.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Script = Callable[[dict], "str | int"]


def _logprobs(text: str, k: int) -> dict[str, Any]:
    content = []
    for ch in re.findall(r"[01]|[^01]+", text):
        top = [{"token": ch, "logprob": -0.01, "bytes": None}]
        if ch in "01" and len(ch) == 1:
            other = "0" if ch == "1" else "1"
            top.append({"token": other, "logprob": -4.6, "bytes": None})
        content.append({"token": ch, "logprob": -0.01, "bytes": None, "top_logprobs": top[:k]})
    return {"content": content}


class ScriptedChat:
    """The server; `requests` keeps every request body in arrival order."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner.lock:
                    owner.requests.append(body)
                reply = owner.script(body)
                if isinstance(reply, int):
                    status, payload = reply, {"error": {"message": f"scripted {reply}", "type": "test", "code": reply}}
                else:
                    status = 200
                    logprobs = _logprobs(reply, body.get("top_logprobs") or 0) if body.get("logprobs") else None
                    payload = {
                        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                                     "message": {"role": "assistant", "content": reply}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            request_queue_size = 256  # the default backlog (5) drops bursts of concurrent connections

        self.server = Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def client(self, **kwargs: Any):
        from saeforge.llm.openai_compat import OpenAICompatClient

        kwargs = {"max_retries": 0, "timeout_s": 10, **kwargs}
        return OpenAICompatClient(self.base_url, "scripted", **kwargs)

    def __enter__(self) -> "ScriptedChat":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


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
