"""Max-activation pass: throughput vs the bare (forward-to-hook + encode) loop, and peak memory.

(a) tokens/s of the bare loop — capture the hookpoint, stop the forward there, `encode_inference` —
and of `collect_maxact` (the same forward + encode, plus the per-feature state merges) over the
same token batches; the ratio (goal >= 0.8). The JSON assembly at the end is timed separately.
(b) peak RSS of a fresh subprocess running `collect_maxact` on n tokens and on 10×n tokens
(goal: flat — the state does not grow with n_tokens; only the token ids themselves do, 4 B/token).

    python bench/maxact.py                        # tiny random model, random SAE (~1-2 min)
    python bench/maxact.py --model smollm2 --hookpoint layers.8 --tokens 4096 --d-sae 4608

Random token ids (BOS first in each window) and a random SAE whose threshold is calibrated to
L0 ≈ k, so the sparsity of the merged state is realistic.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from saeforge.config import MaxActConfig  # noqa: E402
from saeforge.interpret import maxact as maxact_mod  # noqa: E402
from saeforge.interpret.maxact import collect_maxact  # noqa: E402
from saeforge.lm.capture import capture_residual, run_until_captured  # noqa: E402
from saeforge.lm.loading import load_lm  # noqa: E402
from saeforge.sae.model import SAEConfig, SparseAutoencoder, calibrate_threshold  # noqa: E402


def setup(args: argparse.Namespace, n_tokens: int):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", [f"model={args.model}", "logger=none"])
    lm = load_lm(cfg.model)
    g = torch.Generator().manual_seed(0)
    n_seq = -(-n_tokens // args.ctx_len)
    tokens = torch.randint(10, len(lm.tokenizer), (n_seq, args.ctx_len), generator=g, dtype=torch.int32)
    if lm.tokenizer.bos_token_id is not None:
        tokens[:, 0] = lm.tokenizer.bos_token_id
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=lm.d_model, d_sae=args.d_sae, k=args.k))
    with capture_residual(lm.model, [args.hookpoint]) as cap:
        run_until_captured(lm.model, input_ids=tokens[: args.batch].long())
    sample = cap[args.hookpoint].reshape(-1, lm.d_model)
    sae.init_from_sample(sample)
    calibrate_threshold(sae, [sample])
    return lm, sae, tokens


def bare_loop(lm, sae, hookpoint: str, tokens: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    with capture_residual(lm.model, [hookpoint]) as cap, torch.inference_mode():
        for s in range(0, tokens.shape[0], batch):
            run_until_captured(lm.model, input_ids=tokens[s : s + batch].long())
            x = cap.pop(hookpoint)
            sae.encode_inference(x.reshape(-1, x.shape[-1]))
    return tokens.numel() / (time.perf_counter() - start)


def maxact_cfg(args: argparse.Namespace) -> MaxActConfig:
    return MaxActConfig(batch_size=args.batch, progress=False)


def _status_mib(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child(args: argparse.Namespace) -> None:
    """Run one pass in this process and print its RSS before and its peak RSS during the pass (MiB).

    The peak is VmHWM after resetting it with `echo 5 > /proc/self/clear_refs` (Linux), so model
    loading and setup do not mask the pass; elsewhere it falls back to ru_maxrss of the process.
    """
    lm, sae, tokens = setup(args, args.child_tokens)
    before = _status_mib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    assemble, marks = maxact_mod._assemble, {}

    def marked_assemble(*a, **kw):
        marks["stream"] = _status_mib("VmHWM") if reset else None
        return assemble(*a, **kw)

    maxact_mod._assemble = marked_assemble
    collect_maxact(lm, sae, args.hookpoint, tokens, maxact_cfg(args))
    peak = _status_mib("VmHWM") if reset else None
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens": tokens.numel(), "peak_mib": peak, "stream_peak_mib": marks.get("stream") or peak,
                      "before_mib": before or 0.0, "reset": reset}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--hookpoint", default="layers.2")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--k", type=float, default=32)
    parser.add_argument("--rss-tokens", type=int, default=8192, help="memory part: n and 10×n tokens")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: on a shared 2-core machine 2 threads contend)")
    parser.add_argument("--no-rss", action="store_true", help="skip the memory part")
    parser.add_argument("--child-tokens", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child_tokens:
        child(args)
        return
    lm, sae, tokens = setup(args, args.tokens)
    print(f"model {lm.name} {args.hookpoint}, d_sae {args.d_sae}, k {args.k}, {tokens.numel()} tokens, "
          f"batch {args.batch}×{args.ctx_len}, threads {torch.get_num_threads()}")
    bare_loop(lm, sae, args.hookpoint, tokens[: args.batch], args.batch)  # warm-up
    assemble = maxact_mod._assemble
    timing = {}

    def timed_assemble(*a, **kw):
        start = time.perf_counter()
        out = assemble(*a, **kw)
        timing["assemble"] = time.perf_counter() - start
        return out

    maxact_mod._assemble = timed_assemble
    bare = bare_loop(lm, sae, args.hookpoint, tokens, args.batch)
    start = time.perf_counter()
    collect_maxact(lm, sae, args.hookpoint, tokens, maxact_cfg(args))
    total = time.perf_counter() - start
    maxact_mod._assemble = assemble
    ours = tokens.numel() / (total - timing["assemble"])
    print(f"\n{'bare loop tok/s':>18}{'maxact pass tok/s':>20}{'ratio':>8}   JSON assembly")
    print(f"{bare:>18.0f}{ours:>20.0f}{ours / bare:>8.2f}   {timing['assemble']:.1f} s  (goal ratio >= 0.8)")
    if args.no_rss:
        return
    print(f"\n{'tokens':>10}{'RSS before':>12}{'peak, streaming':>17}{'peak, with JSON assembly':>26}  (MiB)")
    for n in (args.rss_tokens, 10 * args.rss_tokens):
        cmd = [sys.executable, __file__, *sys.argv[1:], "--child-tokens", str(n)]
        res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(f"{res['tokens']:>10}{res['before_mib']:>12.0f}{res['stream_peak_mib']:>17.0f}{res['peak_mib']:>26.0f}")
    print("(the JSON assembly holds the output: it grows with d_sae × examples, not with n_tokens)")
    print("(goal: flat in n_tokens. The machine is shared with other jobs: tok/s vary run to run)")


if __name__ == "__main__":
    main()
