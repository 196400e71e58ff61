"""Explainer and scorer throughput: requests/s with 1 vs N requests in flight against a real vLLM server.

    python bench/explain.py                          # starts the embedded SmolLM2 under vLLM (CPU)
    python bench/explain.py --base-url http://127.0.0.1:8000/v1 --model smollm2 --in-flight 32
    python bench/explain.py --workloads explain,intruder
    python bench/explain.py --repeats 2                # two timed pairs per workload (1, N, 1, N)

Workloads: `explain` (feature-explanation prompts through `chat_many`) and each scorer
(detection, fuzz, simulation, surprisal, intruder) run by `score_records` itself on a synthetic set
of 8 features, so the requests are exactly the scorer's own, through the same batching client.
Each workload runs with 1 request in flight, then with N (default 32; `--repeats` such pairs,
alternating, so a change of the machine's load hits both), cache disabled, greedy, each run on
new texts (so vLLM's prefix cache cannot favour a later run; prefixes shared within a run, such as
the system prompt, are cached alike in both), after one untimed warm-up pass on other texts. The
server's token counters, read around each run, are printed per request (prompt / generated), so
the table shows that both runs did the same work. While the concurrent run goes on, the server's
`vllm:num_requests_running` gauge is polled and its maximum printed beside the ratio, with the
most requests the client had on the wire at once (a server that admits fewer than N shows it;
prompt-only surprisal requests finish within one engine step, so the gauge rarely sees them).

On CPU, prefill is compute-bound and costs nearly the same per token one request at a time as 32
together, so concurrency multiplies the rate of decode-heavy requests (explain: 26 generated
tokens per request, simulation: 31) but much less that of prompt-heavy ones with short replies
(detection, fuzz: ~115-150 uncached prompt tokens for 15 generated; intruder: 9 generated) and of
prompt-only ones (surprisal: 28 prompt tokens, 1 generated; vLLM computes prompt logprobs without
its prefix cache). Measured on 2 shared cores (bench/README.md): explain 4.5x, simulation 4.2x,
detection 3.1x, fuzz 2.3x, intruder 1.8x, surprisal 1.7x. A GPU server batches prefill far better.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import tempfile
import threading
import time
import urllib.request
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from saeforge.config import ScoreConfig  # noqa: E402
from saeforge.explainers.base import ChatParams, ChatRequest, ChatResult  # noqa: E402
from saeforge.explainers.openai_compat import OpenAICompatClient  # noqa: E402
from saeforge.explainers.vllm_server import VLLMServer  # noqa: E402
from saeforge.interpret import records as records_io  # noqa: E402
from saeforge.interpret.prompts import load_prompts  # noqa: E402
from saeforge.interpret.score import score_records  # noqa: E402
from saeforge.lm.hf_folder import write_smollm2_hf_folder  # noqa: E402

WORDS = ["ocean", "violin", "harvest", "engine", "senate", "glacier", "surgery", "railway",
         "comet", "orchard", "treaty", "lantern", "fever", "canyon", "ballot", "copper"]
FILLER = ["quiet", "early", "broad", "old", "small", "warm", "dark", "plain", "long", "calm", "tall", "soft"]
N_FEATURES = 8
SCORER_SETTINGS = {  # each gives at least 32 requests over the 8 features
    "detection": dict(n_test=5, n_negatives=5),  # 2 batches × (own + baseline) × 8
    "fuzz": dict(n_test=5, n_negatives=5),
    "simulation": dict(n_test=1, n_negatives=1),  # 2 examples × (own + baseline) × 8
    "surprisal": dict(n_test=2, n_negatives=2),  # 4 examples × (plain, own, baseline context) × 8
    "intruder": dict(n_test=5, n_negatives=5, n_intruder=4, intruder_examples=4),  # 4 prompts × 8
}
WORKLOADS = ("explain", *SCORER_SETTINGS)


def prompts(n: int, max_tokens: int, variant: int = 0) -> list[ChatRequest]:
    """Feature-explanation-shaped prompts, distinct per request and per variant."""
    out = []
    for i in range(n):
        word = WORDS[(i + 5 * variant) % len(WORDS)]
        text = (f"A neuron fires on these tokens: '{word}', '{word}s', 'the {word}' (example {i}, set {variant}). "
                "In one short phrase, what concept does it detect?")
        out.append(([{"role": "user", "content": text}], ChatParams(max_tokens=max_tokens)))
    return out


def _window(seq: int, word: str, filler: str, hot: bool) -> dict:
    tokens = ["The", f" {filler}", f" {word}", " was", " seen", " near", " the", " hill", "."]
    ex = {"tokens": tokens, "token_ids": list(range(len(tokens))), "seq": seq, "start": 0}
    if hot:
        acts = [0.0] * len(tokens)
        acts[2] = 5.0 + seq % 5
        ex.update(activation=acts[2], acts=acts, max_pos=2)
    return ex


def synthetic_records(variant: int) -> records_io.Records:
    """8 features, feature f firing on WORDS[f] (distinct windows per variant), each labelled."""
    features, expl = {}, {}
    for f in range(N_FEATURES):
        word, other = WORDS[f], WORDS[(f + N_FEATURES) % len(WORDS)]
        base = 100_000 * variant + 1000 * f
        top = [_window(base + i, word, f"{FILLER[(i + variant) % len(FILLER)]} {i}v{variant}", True) for i in range(6)]
        non = [_window(base + 500 + i, other, f"{FILLER[(i + 3) % len(FILLER)]} {i}v{variant}", False) for i in range(6)]
        features[str(f)] = {"a_max": 10.0, "frequency": 0.01, "top": top, "quantile_examples": [], "non_activating": non}
        expl[str(f)] = {"status": "ok", "label": f"the word {word}", "split": {"shown": []}}
    doc = {"hookpoint": "bench", "layer": 0, "d_sae": N_FEATURES, "features": features}
    return records_io.explanations_from_json({"0": expl}, 0, records_io.Records.from_maxact_json(doc))


class CountingClient(OpenAICompatClient):
    """The real client, counting the requests and failures of every call and the most requests
    on the wire at once (inside the client's own in-flight bound)."""

    n_requests = 0
    n_errors = 0
    on_wire = 0
    peak_on_wire = 0

    async def _send(self, create, parse):  # type: ignore[no-untyped-def]
        async def counted(client):  # type: ignore[no-untyped-def]
            self.on_wire += 1
            self.peak_on_wire = max(self.peak_on_wire, self.on_wire)
            try:
                return await create(client)
            finally:
                self.on_wire -= 1

        return await super()._send(counted, parse)

    def _count(self, result: ChatResult) -> ChatResult:
        self.n_requests += 1
        self.n_errors += not result.ok
        return result

    async def chat(self, messages, params):  # type: ignore[no-untyped-def]
        return self._count(await super().chat(messages, params))

    async def continuation_logprobs(self, context, continuation):  # type: ignore[no-untyped-def]
        return self._count(await super().continuation_logprobs(context, continuation))


COUNTERS = {
    "prompt": r"^vllm:prompt_tokens_total\{[^}]*\} ([\d.e+]+)",
    "generated": r"^vllm:generation_tokens_total\{[^}]*\} ([\d.e+]+)",
}
"""Server counters read before and after each timed run (prompt and generated tokens), so the
table shows that both runs did the same work."""


def metrics_url(base_url: str) -> str:
    return base_url.rstrip("/").removesuffix("/v1") + "/metrics"


def read_counters(base_url: str) -> dict[str, float] | None:
    """The server's token counters now (None when /metrics does not answer or lacks them)."""
    try:
        with urllib.request.urlopen(metrics_url(base_url), timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    out = {}
    for key, pattern in COUNTERS.items():
        values = re.findall(pattern, text, re.MULTILINE)
        if not values:
            return None
        out[key] = sum(float(v) for v in values)
    return out


def counted(base_url: str, run):  # type: ignore[no-untyped-def]
    """`run()`'s result and the change of the server's token counters over it (None: unknown)."""
    before = read_counters(base_url)
    result = run()
    after = read_counters(base_url)
    delta = {k: after[k] - before[k] for k in COUNTERS} if before and after else None
    return result, delta


def summed(runs: list[tuple]) -> dict:
    """Requests, errors, seconds, most on the wire and token counters over the repeats of one setting."""
    deltas = [t for *_, t in runs]
    tokens = None if any(d is None for d in deltas) else {k: sum(d[k] for d in deltas) for k in COUNTERS}
    return {"n": sum(r[0] for r in runs), "errors": sum(r[1] for r in runs), "s": sum(r[2] for r in runs),
            "wire": max(r[3] for r in runs), "tokens": tokens}


def tokens_column(delta: dict[str, float] | None, n: int) -> str:
    """"prompt tokens / generated tokens" per request."""
    if not delta or not n:
        return "?"
    return f"{delta['prompt'] / n:.0f}/{delta['generated'] / n:.0f}"


class RunningGauge:
    """Polls the server's `vllm:num_requests_running` in a thread; `peak` is the largest value seen."""

    def __init__(self, base_url: str) -> None:
        self.url = metrics_url(base_url)
        self.peak: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    text = response.read().decode()
                for value in re.findall(r"^vllm:num_requests_running\{[^}]*\} ([\d.]+)", text, re.MULTILINE):
                    self.peak = max(self.peak or 0.0, float(value))
            except OSError:
                pass
            self._stop.wait(0.1)

    def __enter__(self) -> "RunningGauge":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_workload(name: str, base_url: str, model: str, in_flight: int, variant: int,
                 args: argparse.Namespace) -> tuple[int, int, float, int]:
    """(requests, errors, seconds, most requests on the wire at once) of one workload at `in_flight`."""
    client = CountingClient(base_url, model, max_in_flight=in_flight, max_retries=2, timeout_s=600, cache_dir=None)
    start = time.perf_counter()
    if name == "explain":
        asyncio.run(client.chat_many(prompts(args.requests, args.max_tokens, variant), progress=False))
    else:
        cfg = ScoreConfig(scorers=[name], seed=0, **SCORER_SETTINGS[name])
        with tempfile.TemporaryDirectory() as out:
            score_records(client, None, synthetic_records(variant), None, load_prompts(), ChatParams(max_tokens=args.score_tokens),
                          out, "bench", 0, cfg)
    return client.n_requests, client.n_errors, time.perf_counter() - start, client.peak_on_wire


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server's /v1 root; default: start one")
    parser.add_argument("--model", default="smollm2", help="served model name")
    parser.add_argument("--requests", type=int, default=32, help="explain: requests per run")
    parser.add_argument("--in-flight", type=int, default=32, help="N for the concurrent runs")
    parser.add_argument("--repeats", type=int, default=1,
                        help="timed pairs per workload (1 in flight, then N; new texts each time); rates over all of them")
    parser.add_argument("--max-tokens", type=int, default=32, help="explain: tokens generated per request")
    parser.add_argument("--score-tokens", type=int, default=16,
                        help="scorers: max_tokens of detection/fuzz/intruder replies (simulation sizes its own)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated subset of {','.join(WORKLOADS)}")
    parser.add_argument("--log", type=Path, default=Path("/tmp/saeforge-bench-vllm.log"), help="server log")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {list(WORKLOADS)}")

    server = None
    if args.base_url is None:
        server = VLLMServer(write_smollm2_hf_folder(), served_model_name=args.model, log_path=args.log)
    rows = []
    with server if server else nullcontext():
        base_url = args.base_url or server.base_url  # type: ignore[union-attr]
        if server:
            print(f"server ready in {server.startup_s:.1f} s ({base_url})")
        for name in workloads:
            run_workload(name, base_url, args.model, args.in_flight, 2, args)  # warm-up, other texts
            runs: dict[int, list] = {1: [], args.in_flight: []}  # in flight -> [(requests, errors, s, wire, tokens)]
            peak = None
            for r in range(args.repeats):  # 1, N, 1, N, ...: a change of the machine's load hits both alike
                variants = (0, 1) if r == 0 else (2 * r + 1, 2 * r + 2)  # 2 is the warm-up's
                for in_flight, variant in zip((1, args.in_flight), variants):
                    with RunningGauge(base_url) if in_flight > 1 else nullcontext() as gauge:
                        result, tokens = counted(base_url, lambda: run_workload(name, base_url, args.model, in_flight, variant, args))
                    runs[in_flight].append((*result, tokens))
                    if gauge is not None and gauge.peak is not None:
                        peak = max(peak or 0.0, gauge.peak)
            seq, par = (summed(runs[k]) for k in (1, args.in_flight))
            rows.append((name, seq["n"], seq["n"] / seq["s"], par["n"] / par["s"], par["wire"], peak, seq["errors"] + par["errors"],
                         tokens_column(seq["tokens"], seq["n"]), tokens_column(par["tokens"], par["n"])))
            print(f"{name}: done ({seq['n']} requests; {seq['s']:.1f} s sequential, {par['s']:.1f} s with {args.in_flight} in flight)",
                  flush=True)
    print(f"\nmodel {args.model}; explain: {args.max_tokens} tokens per reply; in flight 1 vs {args.in_flight}")
    print(f"{'workload':<11} {'requests':>8} {'1 req/s':>9} {f'{args.in_flight} req/s':>9} {'ratio':>7} "
          f"{'peak on wire':>12} {'peak running (server)':>21} {'errors':>6} {'tokens 1':>10} {f'tokens {args.in_flight}':>10}")
    for name, n, seq, par, wire, peak, errors, seq_tok, par_tok in rows:
        shown_peak = "?" if peak is None else f"{peak:.0f}"
        print(f"{name:<11} {n:>8} {seq:>9.2f} {par:>9.2f} {par / seq:>6.2f}x {wire:>12} {shown_peak:>21} {errors:>6} "
              f"{seq_tok:>10} {par_tok:>10}")
    print("tokens: prompt / generated tokens per request, from the server's counters")


if __name__ == "__main__":
    main()
