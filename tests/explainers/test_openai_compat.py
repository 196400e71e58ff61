"""OpenAICompatClient against a real local HTTP server (stdlib, real sockets, no mocks)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator

import pytest
from tests.chat_completions_server import ChatCompletionsServer, Reply

from saeforge.explainers.base import ChatParams, ExplainerClient
from saeforge.explainers.openai_compat import OpenAICompatClient, parse_retry_after


@pytest.fixture
def fake_server() -> Iterator[Callable[..., ChatCompletionsServer]]:
    servers: list[ChatCompletionsServer] = []

    def make(script: Callable[[int, dict], Reply] = lambda n, body: Reply()) -> ChatCompletionsServer:
        servers.append(ChatCompletionsServer(script).__enter__())
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
    with ChatCompletionsServer() as server:
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
