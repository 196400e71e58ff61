"""Explainer throughput: requests/s with 1 vs N requests in flight against a real vLLM server.

    python bench/explain.py                          # starts the embedded SmolLM2 under vLLM (CPU)
    python bench/explain.py --base-url http://127.0.0.1:8000/v1 --model smollm2 --in-flight 16

Same prompts in both runs, cache disabled, greedy; one untimed warm-up pass first.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saeforge.explainers.base import ChatParams, ChatRequest  # noqa: E402
from saeforge.explainers.openai_compat import OpenAICompatClient  # noqa: E402
from saeforge.explainers.vllm_server import VLLMServer  # noqa: E402
from saeforge.lm.hf_folder import write_smollm2_hf_folder  # noqa: E402

WORDS = ["ocean", "violin", "harvest", "engine", "senate", "glacier", "surgery", "railway",
         "comet", "orchard", "treaty", "lantern", "fever", "canyon", "ballot", "copper"]


def prompts(n: int, max_tokens: int) -> list[ChatRequest]:
    """Feature-explanation-shaped prompts, distinct per request."""
    out = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        text = (f"A neuron fires on these tokens: '{word}', '{word}s', 'the {word}' (example {i}). "
                "In one short phrase, what concept does it detect?")
        out.append(([{"role": "user", "content": text}], ChatParams(max_tokens=max_tokens)))
    return out


async def rate(client: OpenAICompatClient, requests: list[ChatRequest]) -> tuple[float, int]:
    start = time.perf_counter()
    results = await client.chat_many(requests, progress=False)
    seconds = time.perf_counter() - start
    errors = sum(not r.ok for r in results)
    return len(requests) / seconds, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server's /v1 root; default: start one")
    parser.add_argument("--model", default="smollm2", help="served model name")
    parser.add_argument("--requests", type=int, default=32, help="requests per run")
    parser.add_argument("--in-flight", type=int, default=16, help="N for the concurrent run")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    parser.add_argument("--log", type=Path, default=Path("/tmp/saeforge-bench-vllm.log"), help="server log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    server = None
    if args.base_url is None:
        server = VLLMServer(write_smollm2_hf_folder(), served_model_name=args.model, log_path=args.log)
    with server if server else nullcontext():
        base_url = args.base_url or server.base_url  # type: ignore[union-attr]
        if server:
            print(f"server ready in {server.startup_s:.1f} s ({base_url})")
        requests = prompts(args.requests, args.max_tokens)

        def client(in_flight: int) -> OpenAICompatClient:
            return OpenAICompatClient(base_url, args.model, max_in_flight=in_flight, max_retries=2,
                                      timeout_s=600, cache_dir=None)

        asyncio.run(client(args.in_flight).chat_many(requests, progress=False))  # warm-up
        seq, seq_err = asyncio.run(rate(client(1), requests))
        par, par_err = asyncio.run(rate(client(args.in_flight), requests))
    print(f"{args.requests} requests × {args.max_tokens} tokens, model {args.model}")
    print(f"in flight 1:  {seq:6.2f} req/s  ({seq_err} errors)")
    print(f"in flight {args.in_flight}: {par:6.2f} req/s  ({par_err} errors)")
    print(f"ratio: {par / seq:.2f}x")


if __name__ == "__main__":
    main()
