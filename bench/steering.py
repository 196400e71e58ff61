"""Steering: one batched generate per feature vs one generate call per (prompt, strength).

Same feature (a random SAE row, or feature --feature of an exported SAE), --prompts corpus
prompts × --strengths, greedy, --max-new-tokens. Both paths produce the "original" rows too; the
loop is the same code with max_batch=1, i.e. one batch-1 generate call per row. Asserts the texts are identical and
prints the wall times and the ratio (goal >= 5x).

    python bench/steering.py [--model smollm2|tiny] [--sae DIR] [--hookpoint layers.15]
                             [--prompts 10] [--max-new-tokens 30] [--a-max 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from saeforge.activations.corpus import load_corpus
from saeforge.config import SteeringConfig
from saeforge.interpret.steering import generate_steered, sample_prompts
from saeforge.lm.loading import load_lm
from saeforge.sae.model import SAEConfig, SparseAutoencoder

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--sae", default=None, help="exported SAE directory (default: a random SAE)")
    parser.add_argument("--feature", type=int, default=0)
    parser.add_argument("--hookpoint", default=None, help="default: the middle block")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--strengths", type=float, nargs="+", default=[-2.0, -1.0, 1.0, 2.0])
    parser.add_argument("--max-new-tokens", type=int, default=30)
    parser.add_argument("--a-max", type=float, default=8.0)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", [f"model={args.model}", "logger=none"])
    start = time.perf_counter()
    lm = load_lm(cfg.model)
    print(f"model {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, threads {torch.get_num_threads()}, "
          f"loaded in {time.perf_counter() - start:.0f} s")
    if args.sae:
        from saeforge.sae.formats import load_sae

        sae, _ = load_sae(args.sae)
    else:
        torch.manual_seed(0)
        sae = SparseAutoencoder(SAEConfig(d_in=lm.d_model, d_sae=64, k=8))
    hookpoint = args.hookpoint or f"layers.{lm.n_layers // 2}"
    corpus = load_corpus(cfg.corpus, Path(cfg.data.cache_dir))
    prompts = sample_prompts(corpus, cfg.corpus.column, args.prompts, seed=0)
    gen = SteeringConfig(max_new_tokens=args.max_new_tokens)
    steer = lambda ps, ss: generate_steered(lm, sae, hookpoint, args.feature, args.a_max, ps, ss, gen).texts  # noqa: E731
    steer(prompts[:1], args.strengths[:1])  # warm-up

    start = time.perf_counter()
    batched = steer(prompts, args.strengths)
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    looped = generate_steered(lm, sae, hookpoint, args.feature, args.a_max, prompts, args.strengths,
                              dataclasses.replace(gen, max_batch=1)).texts  # max_batch 1: one generate call per row
    t_loop = time.perf_counter() - start

    n_calls = len(prompts) * (len(args.strengths) + 1)
    mismatches = [(p, k) for p in prompts for k in batched[p] if batched[p][k] != looped[p][k]]
    for p, k in mismatches:
        print(f"MISMATCH {k} {p[:40]!r}:\n  batched {batched[p][k]!r}\n  looped  {looped[p][k]!r}")
    print(f"\nfeature {args.feature} at {hookpoint}, {len(prompts)} prompts x {len(args.strengths)} strengths "
          f"(+ original), greedy, {args.max_new_tokens} new tokens")
    print(f"{'one generate per (prompt, strength)':<40}{t_loop:>8.1f} s  ({n_calls} calls)")
    print(f"{'one batched generate':<40}{t_batched:>8.1f} s  (1 call, {n_calls} rows)")
    print(f"{'ratio':<40}{t_loop / t_batched:>8.1f} x   (goal >= 5x)")
    print(f"sample: {prompts[0][:60]!r} → original {batched[prompts[0]]['original'][:60]!r}, "
          f"{args.strengths[-1]} {batched[prompts[0]][str(args.strengths[-1])][:60]!r}")
    assert not mismatches, f"{len(mismatches)} of {n_calls} texts differ between batched and looped generation"
    print("texts identical: yes")


if __name__ == "__main__":
    main()
