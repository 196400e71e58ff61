"""`make demo`: the whole loop on the embedded defaults (SmolLM2-135M GGUF, bundled Gutenberg corpus, CPU).

Each step is the real entry script a user would type; the demo only chains them and prints where
everything went. Set DEMO_TOKENS to change the number of extracted tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = Path(os.environ.get("DEMO_RUN_DIR", ROOT / "runs" / "demo"))
TOKENS = int(os.environ.get("DEMO_TOKENS", "300000"))


def step(title: str, *args: str) -> None:
    print(f"\n=== {title}: python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    print(f"=== {title} done in {time.perf_counter() - start:.0f}s", flush=True)


def main() -> None:
    start = time.perf_counter()
    step(
        "train",
        "train.py",
        f"run.dir={RUN}",
        "data.hookpoint=layers.15",
        f"data.n_tokens={TOKENS}",
        "data.batch_size=4096",
        "data.shuffle_buffer=65536",
        "sae.expansion_factor=8",
        "sae.k=32",
        "sae.warmup_steps=20",
        "checkpoint_every_n_steps=25",
    )
    metrics = json.loads((RUN / "metrics.json").read_text())
    print(f"\nDemo finished in {time.perf_counter() - start:.0f}s. Run directory: {RUN}")
    print(f"  SAE (SAELens format): {RUN / 'sae' / metrics['hookpoint']}")
    print(f"  held-out FVU {metrics['fvu']:.3f}, L0 {metrics['l0']:.1f}, dead {100 * metrics['dead_frac']:.1f}%")
    print(f"  W&B offline run: {RUN / 'wandb'} (upload later with `wandb sync`)")


if __name__ == "__main__":
    main()
