"""OpenAICompatClient against a real local HTTP server (stdlib, real sockets, no mocks)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saeforge.llm.base import ChatParams, ExplainerClient
from saeforge.llm.openai_compat import OpenAICompatClient, parse_retry_after


@dataclass
class Reply:
    """What the fake server answers to one request."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0
    text: str | None = None  # None: echo the last user message


@dataclass
class Seen:
    """One request as the fake server received it."""

    at: float
    authorization: str
    body: dict


class FakeOpenAI:
    """A chat-completions endpoint on 127.0.0.1 whose replies come from ``script(n, body)``."""

    def __init__(self, script: Callable[[int, dict], Reply] = lambda n, body: Reply()) -> None:
        self.script = script
        self.seen: list[Seen] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    n = len(fake.seen)
                    fake.seen.append(Seen(time.monotonic(), self.headers.get("Authorization", ""), body))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                try:
                    reply = fake.script(n, body)
                    time.sleep(reply.delay_s)
                    payload = fake.payload(reply, body) if reply.status == 200 else {
                        "error": {"message": f"scripted {reply.status}", "type": "test", "code": reply.status}
                    }
                    data = json.dumps(payload).encode()
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
                    with fake.lock:
                        fake.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def payload(reply: Reply, body: dict) -> dict:
        text = reply.text if reply.text is not None else body["messages"][-1]["content"]
        logprobs = None
        if body.get("logprobs"):
            k = body.get("top_logprobs") or 0
            logprobs = {"content": [
                {"token": word, "logprob": -0.5, "bytes": None,
                 "top_logprobs": [{"token": word, "logprob": -0.5, "bytes": None}][:k]}
                for word in text.split()
            ]}
        return {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": logprobs,
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_server() -> Iterator[Callable[..., FakeOpenAI]]:
    servers: list[FakeOpenAI] = []

    def make(script: Callable[[int, dict], Reply] = lambda n, body: Reply()) -> FakeOpenAI:
        servers.append(FakeOpenAI(script).__enter__())
        return servers[-1]

    yield make
    for server in servers:
        server.__exit__()


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You explain features."}, {"role": "user", "content": text}]


FAST = dict(backoff_base_s=0.01, backoff_max_s=0.05)


def test_429_retry_after_is_honoured(fake_server) -> None:
    server = fake_server(lambda n, body: Reply(429, {"Retry-After": "1"}) if n == 0 else Reply())
    client = OpenAICompatClient(server.base_url, "m", max_retries=3, **FAST)
    assert isinstance(client, ExplainerClient)
    result = asyncio.run(client.chat(msgs("hello there"), ChatParams()))
    assert result.ok and result.text == "hello there" and not result.cached
    assert len(server.seen) == 2
    waited = server.seen[1].at - server.seen[0].at
    assert 1.0 <= waited < 3.0, waited  # backoff alone would be ~10 ms


def test_500s_exhaust_retries_to_an_error(fake_server, tmp_path) -> None:
    server = fake_server(lambda n, body: Reply(500))
    client = OpenAICompatClient(server.base_url, "m", max_retries=3, cache_dir=tmp_path, **FAST)
    result = asyncio.run(client.chat(msgs("x"), ChatParams()))
    assert result.status == "error" and "500" in (result.error or "")
    assert result.text == ""
    assert len(server.seen) == 4  # 1 + 3 retries
    assert not list(tmp_path.rglob("*.json"))  # errors are never cached


def test_non_retryable_status_fails_at_once(fake_server) -> None:
    server = fake_server(lambda n, body: Reply(400))
    client = OpenAICompatClient(server.base_url, "m", max_retries=3, **FAST)
    result = asyncio.run(client.chat(msgs("x"), ChatParams()))
    assert result.status == "error" and "400" in (result.error or "")
    assert len(server.seen) == 1


def test_timeout_is_retried(fake_server) -> None:
    server = fake_server(lambda n, body: Reply(delay_s=1.0) if n == 0 else Reply())
    client = OpenAICompatClient(server.base_url, "m", max_retries=2, timeout_s=0.3, **FAST)
    result = asyncio.run(client.chat(msgs("after a timeout"), ChatParams()))
    assert result.ok and result.text == "after a timeout"
    assert len(server.seen) == 2


def test_connection_refused_ends_in_error() -> None:
    with FakeOpenAI() as server:
        url = server.base_url  # the port is free again once the server is closed
    client = OpenAICompatClient(url, "m", max_retries=2, **FAST)
    result = asyncio.run(client.chat(msgs("x"), ChatParams()))
    assert result.status == "error" and "connection" in (result.error or "").lower()


def test_concurrency_is_bounded_and_order_kept(fake_server) -> None:
    # Each reply takes 0.25 s, long enough that 4 requests overlap even on a loaded 2-core machine.
    server = fake_server(lambda n, body: Reply(delay_s=0.25))
    client = OpenAICompatClient(server.base_url, "m", max_in_flight=4, max_retries=0)
    requests = [(msgs(f"request {i}"), ChatParams(seed=i)) for i in range(24)]
    results = asyncio.run(client.chat_many(requests, progress=False))
    assert [r.text for r in results] == [f"request {i}" for i in range(24)]
    assert server.max_in_flight == 4, server.max_in_flight
    assert len(server.seen) == 24


def test_params_are_sent_per_request(fake_server) -> None:
    server = fake_server()
    client = OpenAICompatClient(server.base_url, "m", max_retries=0)
    a = ChatParams(temperature=0.7, top_p=0.9, max_tokens=7, logprobs=True, top_logprobs=1, seed=5)
    b = ChatParams(max_tokens=3)
    ra, rb = asyncio.run(client.chat_many([(msgs("one two"), a), (msgs("three"), b)], progress=False))
    bodies = sorted((s.body for s in server.seen), key=lambda body: body["max_tokens"])
    assert bodies[0]["max_tokens"] == 3 and "logprobs" not in bodies[0]
    assert {k: bodies[1][k] for k in ("temperature", "top_p", "max_tokens", "logprobs", "top_logprobs", "seed")} == {
        "temperature": 0.7, "top_p": 0.9, "max_tokens": 7, "logprobs": True, "top_logprobs": 1, "seed": 5}
    assert ra.logprobs == [{"token": "one", "logprob": -0.5, "top": {"one": -0.5}},
                           {"token": "two", "logprob": -0.5, "top": {"two": -0.5}}]
    assert rb.logprobs is None
    assert "stop" not in bodies[0] and "repetition_penalty" not in bodies[0]  # defaults: nothing extra sent


def test_prefill_stop_and_penalty_reach_the_server(fake_server) -> None:
    server = fake_server()
    prefilled = msgs("explain") + [{"role": "assistant", "content": "LABEL:"}]
    params = ChatParams(max_tokens=4, stop=("\n\n",), repetition_penalty=1.2)
    asyncio.run(OpenAICompatClient(server.base_url, "m", max_retries=0, prefill=True).chat(prefilled, params))
    asyncio.run(OpenAICompatClient(server.base_url, "m", max_retries=0).chat(prefilled, ChatParams(max_tokens=5)))
    asyncio.run(OpenAICompatClient(server.base_url, "m", max_retries=0, prefill=True).chat(msgs("x"), ChatParams(max_tokens=6)))
    on, off, plain = sorted((s.body for s in server.seen), key=lambda body: body["max_tokens"])
    assert on["messages"][-1] == {"role": "assistant", "content": "LABEL:"}
    assert on["continue_final_message"] is True and on["add_generation_prompt"] is False
    assert on["stop"] == ["\n\n"] and on["repetition_penalty"] == 1.2
    assert "continue_final_message" not in off  # prefill off: the messages go as they are
    assert "continue_final_message" not in plain  # nothing to continue


def test_cache_hit_makes_no_request(fake_server, tmp_path) -> None:
    server = fake_server()
    params = ChatParams(logprobs=True, top_logprobs=1)
    first = asyncio.run(OpenAICompatClient(server.base_url, "m", cache_dir=tmp_path).chat(msgs("cache me"), params))
    assert first.ok and not first.cached and len(server.seen) == 1
    client = OpenAICompatClient(server.base_url, "m", cache_dir=tmp_path)  # a rerun
    again = asyncio.run(client.chat_many([(msgs("cache me"), params)] * 3, progress=False))
    assert len(server.seen) == 1
    assert all(r.cached and r.text == first.text and r.logprobs == first.logprobs for r in again)
    other = asyncio.run(client.chat(msgs("cache me"), ChatParams(max_tokens=5)))  # other params: a miss
    assert not other.cached and len(server.seen) == 2


def test_key_from_env_never_in_logs_or_repr(fake_server, monkeypatch, caplog, capsys) -> None:
    secret = "sk-test-0123456789-do-not-leak"
    monkeypatch.setenv("SAEFORGE_TEST_KEY", secret)
    for name in (None, "openai", "httpx", "httpcore", "httpx2", "saeforge"):
        caplog.set_level(logging.DEBUG, logger=name)
    server = fake_server(lambda n, body: Reply(500) if n == 0 else Reply(401) if n == 2 else Reply())
    client = OpenAICompatClient(server.base_url, "m", api_key_env="SAEFORGE_TEST_KEY", max_retries=2, **FAST)
    ok = asyncio.run(client.chat(msgs("a"), ChatParams()))
    failed = asyncio.run(client.chat(msgs("b"), ChatParams()))
    assert ok.ok and failed.status == "error"
    assert {s.authorization for s in server.seen} == {f"Bearer {secret}"}  # the key was used
    captured = capsys.readouterr()
    for text in (caplog.text, repr(client), str(vars(client)), failed.error or "", captured.out, captured.err):
        assert secret not in text
    assert "SAEFORGE_TEST_KEY" in repr(client)
    assert "retry 1/2" in caplog.text and "HTTP Request" in caplog.text  # the logs were captured


def test_no_key_env_sends_empty_and_missing_env_is_an_error(fake_server, monkeypatch) -> None:
    server = fake_server()
    asyncio.run(OpenAICompatClient(server.base_url, "m").chat(msgs("a"), ChatParams()))
    assert server.seen[0].authorization == "Bearer EMPTY"
    monkeypatch.delenv("SAEFORGE_MISSING_KEY", raising=False)
    with pytest.raises(ValueError, match="SAEFORGE_MISSING_KEY"):
        OpenAICompatClient(server.base_url, "m", api_key_env="SAEFORGE_MISSING_KEY")


def test_parse_retry_after() -> None:
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({}) is None
    assert parse_retry_after({"retry-after": "soon"}) is None
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 <= (parse_retry_after({"retry-after": date}) or 0) <= 31
