"""The OpenAI-compatible client against a hostile server: every request ends as a result, never a crash.

A real local HTTP server (tests/chat_completions_server.py) answers with a seeded random mix of
500s, 429s with Retry-After, truncated/invalid JSON, HTML pages, empty `choices`, replies that
never finish and dropped connections. Failures are retried like a 5xx and, when retries run
out, come back as error results naming the server; a rerun against a healthy server fills the
gaps from the on-disk cache plus one request per earlier failure (failures are never cached).
"""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from tests.chat_completions_server import HOSTILE, ChatCompletionsServer, Reply, hostile_script

from saeforge.explainers.base import ChatParams
from saeforge.explainers.openai_compat import OpenAICompatClient

FAST = dict(backoff_base_s=0.01, backoff_max_s=0.05)
SEED = 0
"""hostile_script(SEED) gives every kind in HOSTILE (and successes) among its first 30 answers."""


def msgs(text: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You explain features."}, {"role": "user", "content": text}]


def drawn_kind(seed: int, n: int, p_fail: float = 0.6) -> str:
    """The kind hostile_script(seed) answers request n with (mirrors its draw)."""
    rng = random.Random(seed * 1_000_003 + n)
    return "ok" if rng.random() >= p_fail else rng.choice(HOSTILE)


@pytest.mark.parametrize("fault", HOSTILE)
def test_each_fault_is_retried_then_recorded_as_an_error(fault: str) -> None:
    reply = {"500": Reply(500), "429": Reply(429, {"Retry-After": "0.05"})}.get(fault, Reply(fault=fault))
    with ChatCompletionsServer(lambda n, body: reply) as server:
        client = OpenAICompatClient(server.base_url, "m", max_retries=1, timeout_s=0.4, **FAST)
        result = asyncio.run(client.chat(msgs("x"), ChatParams()))
        assert result.status == "error" and result.text == ""
        assert server.base_url in (result.error or ""), result.error
        assert len(server.seen) == 2  # retried once, like a 5xx
    with ChatCompletionsServer(lambda n, body: reply if n == 0 else Reply()) as server:
        client = OpenAICompatClient(server.base_url, "m", max_retries=1, timeout_s=0.4, **FAST)
        result = asyncio.run(client.chat(msgs("second try"), ChatParams()))
        assert result.ok and result.text == "second try"


def test_hostile_run_ends_every_request_and_a_healthy_rerun_fills_the_gaps(tmp_path) -> None:
    assert {drawn_kind(SEED, n) for n in range(30)} == set(HOSTILE) | {"ok"}
    requests = [(msgs(f"request {i}"), ChatParams(seed=i)) for i in range(30)]
    with ChatCompletionsServer(hostile_script(SEED)) as server:
        client = OpenAICompatClient(server.base_url, "m", max_in_flight=8, max_retries=1, timeout_s=0.5,
                                    cache_dir=tmp_path, **FAST)
        first = asyncio.run(client.chat_many(requests, progress=False))
        assert len(server.seen) >= 30
    failed = [i for i, r in enumerate(first) if not r.ok]
    for i, result in enumerate(first):
        if result.ok:
            assert result.text == f"request {i}"
        else:
            assert result.text == "" and server.base_url in (result.error or ""), result.error
    assert failed and len(failed) < len(first), [r.error for r in first]

    with ChatCompletionsServer() as healthy:
        client = OpenAICompatClient(healthy.base_url, "m", max_in_flight=8, max_retries=1, timeout_s=30,
                                    cache_dir=tmp_path, **FAST)
        second = asyncio.run(client.chat_many(requests, progress=False))
        assert len(healthy.seen) == len(failed)  # only the earlier failures go out again
    assert [r.text for r in second] == [f"request {i}" for i in range(30)]
    assert [i for i, r in enumerate(second) if not r.cached] == failed


def test_closed_port_error_names_the_url() -> None:
    with ChatCompletionsServer() as server:
        url = server.base_url  # the port is free again once the server is closed
    result = asyncio.run(OpenAICompatClient(url, "m", max_retries=1, **FAST).chat(msgs("x"), ChatParams()))
    assert result.status == "error" and url in (result.error or "") and "connection" in (result.error or "").lower()


def test_unreachable_server_fails_fast_and_a_reached_one_keeps_its_retries() -> None:
    with ChatCompletionsServer() as server:
        url = server.base_url  # closed again: connections are refused
    client = OpenAICompatClient(url, "m", max_retries=5, backoff_base_s=1.0)  # ~31 s of backoff per request
    start = time.monotonic()
    results = asyncio.run(client.chat_many([(msgs(f"r{i}"), ChatParams(seed=i)) for i in range(6)], progress=False))
    later = asyncio.run(client.chat(msgs("later"), ChatParams()))
    assert time.monotonic() - start < 5
    errors = {r.error for r in results + [later]}
    assert errors == {f"{url}: server unreachable (connection refused)"}, errors

    with ChatCompletionsServer() as server:
        client = OpenAICompatClient(server.base_url, "m", max_retries=3, **FAST)
        assert asyncio.run(client.chat(msgs("up"), ChatParams())).ok
    gone = asyncio.run(client.chat(msgs("down"), ChatParams(seed=1)))  # the server answered once: no fail-fast
    assert gone.status == "error" and "unreachable" not in (gone.error or "") and "connection error" in (gone.error or "")
