"""Extraction throughput vs a bare forward of the same model over the same batches.

Prints tokens/s of (a) a bare full forward (logits included, what a user would otherwise run) and
(b) our extraction loop (capture hooks, early stop after the hookpoint, copy to CPU, shard write),
for a hookpoint at the last layer and at a middle layer, and the ratios. Goals: >= 0.9 at the
last layer, > 1 at a middle one.

    python bench/extract.py [--model smollm2|tiny] [--tokens 16384] [--ctx-len 128] [--batch 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from saeforge.activations.extract import build_store
from saeforge.lm.loading import load_lm

ROOT = Path(__file__).resolve().parents[1]


def bare_forward(lm, tokens: torch.Tensor, batch: int) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, tokens.shape[0], batch):
            lm.model(input_ids=tokens[b : b + batch].long().to(lm.device), use_cache=False)
    return tokens.numel() / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", [f"model={args.model}", "logger=none"])
    lm = load_lm(cfg.model)
    print(f"model {lm.name}: {lm.n_layers} layers, d_model {lm.d_model}, threads {torch.get_num_threads()}")
    rows = []
    for label, layer in (("last layer", lm.n_layers - 1), ("middle layer", lm.n_layers // 2)):
        with tempfile.TemporaryDirectory() as tmp:
            data = dict(cfg.data)
            data.update(hookpoint=f"layers.{layer}", hookpoints=[f"layers.{layer}"], n_tokens=args.tokens,
                        ctx_len=args.ctx_len, extract_batch_size=args.batch, cache_dir=tmp)
            bare_forward(lm, torch.zeros(args.batch, args.ctx_len, dtype=torch.int32), args.batch)  # warm-up
            start = time.perf_counter()
            store = build_store(cfg.model, cfg.corpus, data, lm=lm)
            from saeforge.activations.store import read_tokens

            tokens = read_tokens(store.root)
            ours = tokens.numel() / (time.perf_counter() - start)
            bare = bare_forward(lm, tokens, args.batch)
            rows.append((label, layer, bare, ours))
    print(f"\n{'hookpoint':<22}{'bare forward tok/s':>20}{'extraction tok/s':>20}{'ratio':>8}")
    for label, layer, bare, ours in rows:
        print(f"{label + f' (layers.{layer})':<22}{bare:>20.0f}{ours:>20.0f}{ours / bare:>8.2f}")
    print("(extraction time includes corpus tokenisation and shard writes; goals: >= 0.9 last, > 1 middle)")


if __name__ == "__main__":
    main()
