"""OpenAICompatClient against a REAL vLLM server (CPU, SmolLM2 from the embedded GGUF).

Needs the separate vLLM venv (`make vllm`). Marked slow; it still runs in CI.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from saeforge.explainers.base import ChatParams
from saeforge.explainers.openai_compat import OpenAICompatClient
from saeforge.explainers.vllm_server import VLLMServer, default_vllm_venv
from saeforge.lm.hf_folder import write_smollm2_hf_folder

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CHAT_PATH = '"POST /v1/chat/completions'


@pytest.fixture(scope="session")
def smollm2_hf_folder() -> Path:
    """The embedded SmolLM2 GGUF as an HF folder, cached under $SAEFORGE_CACHE or ~/.cache/saeforge."""
    return write_smollm2_hf_folder()


@pytest.fixture(scope="session")
def vllm_server(smollm2_hf_folder: Path, tmp_path_factory) -> Iterator[VLLMServer]:
    venv = default_vllm_venv()
    if not (venv / "bin" / "python").exists():
        pytest.fail(f"no vLLM venv at {venv}: run `make vllm` (scripts/setup_vllm_venv.sh) first")
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    server = VLLMServer(smollm2_hf_folder, log_path=log_path, startup_timeout_s=240)
    server.start()
    print(f"vLLM server ready in {server.startup_s:.1f} s")
    try:
        yield server
    finally:
        server.stop()


def story(i: int) -> list[dict[str, str]]:
    topics = ["a lighthouse", "a lost key", "a paper boat", "a red kite", "an old map", "a quiet robot",
              "a winter fox", "a clockmaker", "a desert well", "a glass bell", "a moon garden", "a river ferry"]
    return [{"role": "user", "content": f"Write a short story about {topics[i % len(topics)]}."}]


def test_chat_returns_text_and_logprobs(vllm_server: VLLMServer) -> None:
    client = OpenAICompatClient(vllm_server.base_url, "smollm2", max_retries=1, timeout_s=120)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = asyncio.run(client.chat(messages, ChatParams(max_tokens=16, logprobs=True, top_logprobs=3)))
    assert result.ok, result.error
    assert "Paris" in result.text
    assert result.logprobs and len(result.logprobs) <= 16
    for entry in result.logprobs:
        assert entry["logprob"] <= 0 and 1 <= len(entry["top"]) <= 4  # vLLM may add the chosen token
    joined = "".join(e["token"] for e in result.logprobs)  # may end with the <|im_end|> token
    assert joined.strip().startswith(result.text.strip())


def test_prefill_stop_and_penalty_are_accepted(vllm_server: VLLMServer) -> None:
    client = OpenAICompatClient(vllm_server.base_url, "smollm2", max_retries=1, timeout_s=120, prefill=True)
    messages = [{"role": "user", "content": "What is the capital of France? Answer as CITY: <name>."},
                {"role": "assistant", "content": "CITY:"}]
    params = ChatParams(max_tokens=16, stop=("\n",), repetition_penalty=1.2)
    result = asyncio.run(client.chat(messages, params))
    assert result.ok, result.error
    assert "Paris" in result.text and "\n" not in result.text and not result.text.lstrip().startswith("CITY")


def test_eight_concurrent_requests(vllm_server: VLLMServer) -> None:
    client = OpenAICompatClient(vllm_server.base_url, "smollm2", max_in_flight=8, max_retries=1, timeout_s=120)
    requests = [(story(i), ChatParams(max_tokens=24)) for i in range(8)]
    results = asyncio.run(client.chat_many(requests, progress=False))
    assert all(r.ok and r.text for r in results), [r.error for r in results]
    assert len({r.text for r in results}) > 1


def test_killed_server_errors_then_rerun_sends_only_the_failed(vllm_server: VLLMServer, tmp_path) -> None:
    requests = [(story(i), ChatParams(max_tokens=48)) for i in range(12)]

    def make_client() -> OpenAICompatClient:
        return OpenAICompatClient(vllm_server.base_url, "smollm2", max_in_flight=2, max_retries=2,
                                  timeout_s=30, cache_dir=tmp_path, backoff_base_s=0.2)

    async def run_and_kill() -> list:
        client = make_client()
        tasks = [asyncio.create_task(client.chat(m, p)) for m, p in requests]
        deadline = time.monotonic() + 180
        while sum(t.done() for t in tasks) < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.to_thread(vllm_server.kill)  # mid-run: 2 requests on the wire, the rest queued
        return list(await asyncio.gather(*tasks))

    first = asyncio.run(run_and_kill())
    ok = [i for i, r in enumerate(first) if r.ok]
    failed = [i for i, r in enumerate(first) if not r.ok]
    assert len(ok) >= 3 and failed, [r.status for r in first]
    assert all("connection" in (first[i].error or "").lower() for i in failed), [first[i].error for i in failed]

    vllm_server.start()  # same port; later tests in this session see a live server again
    log_before = vllm_server.log_path.read_text(errors="replace").count(CHAT_PATH)
    second = asyncio.run(make_client().chat_many(requests, progress=False))
    assert all(r.ok for r in second), [r.error for r in second]
    assert [i for i, r in enumerate(second) if r.cached] == ok
    assert [second[i].text for i in ok] == [first[i].text for i in ok]
    sent = vllm_server.log_path.read_text(errors="replace").count(CHAT_PATH) - log_before
    assert sent == len(failed)  # the server saw only the failed requests again


def test_continuation_logprobs_from_echoed_completions(vllm_server: VLLMServer) -> None:
    """The surprisal scorer's prompt logprobs: exactly the continuation's tokens, and a context that
    predicts the continuation makes it cheaper."""
    client = OpenAICompatClient(vllm_server.base_url, "smollm2", max_retries=1, timeout_s=120)
    pairs = [("The capital of France is", " Paris, a city on the Seine."),
             ("My favourite vegetable is", " Paris, a city on the Seine.")]
    results = asyncio.run(client.continuation_logprobs_many(pairs, progress=False))
    assert all(r.ok for r in results), [r.error for r in results]
    for result in results:
        assert "".join(t["token"] for t in result.logprobs) == " Paris, a city on the Seine."
        assert all(t["logprob"] <= 0 for t in result.logprobs)
    assert results[0].logprobs[0]["logprob"] > results[1].logprobs[0]["logprob"]  # " Paris" after "France is"
