"""`make demo`: the whole loop on the embedded defaults (SmolLM2-135M GGUF, bundled Gutenberg corpus, CPU).

Each step is the real entry script a user would type (train → evaluate → interpret); the demo only
chains them, then prints where everything is and a short table of the features. Environment knobs:
DEMO_RUN_DIR (default runs/demo), DEMO_TOKENS (extracted tokens), DEMO_FEATURES (features interpreted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN = Path(os.environ.get("DEMO_RUN_DIR", ROOT / "runs" / "demo")).resolve()
TOKENS = int(os.environ.get("DEMO_TOKENS", "250000"))
FEATURES = int(os.environ.get("DEMO_FEATURES", "20"))
HOOKPOINT = "layers.15"


def step(title: str, *args: str) -> float:
    print(f"\n=== {title}: python {' '.join(args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True)
    elapsed = time.perf_counter() - start
    print(f"=== {title} done in {elapsed:.0f}s", flush=True)
    return elapsed


def mean(values: list[str]) -> str:
    numbers = [float(v) for v in values if v not in ("", None)]
    return f"{sum(numbers) / len(numbers):.3f} (n={len(numbers)})" if numbers else "-"


def main() -> None:
    start = time.perf_counter()
    times = {}
    times["train"] = step(
        "train", "train.py", f"run.dir={RUN}", f"data.hookpoint={HOOKPOINT}", f"data.n_tokens={TOKENS}",
        "data.batch_size=2048", "data.shuffle_buffer=65536", "trainer.max_epochs=4", "sae.expansion_factor=8", "sae.k=32",
        "sae.warmup_steps=20", "checkpoint_every_n_steps=100",
    )
    times["evaluate"] = step("evaluate", "evaluate.py", f"ckpt={RUN}", "evaluate.n_tokens=8192")
    times["interpret"] = step(
        "interpret", "interpret.py", f"ckpt={RUN}", f"interpret.max_latents={FEATURES}", "interpret.select=random",
        "interpret.n_tokens=65536", "interpret.explain.max_examples_in_prompt=10", "interpret.score.n_test=10",
        "interpret.score.n_negatives=10",
    )
    train = json.loads((RUN / "metrics.json").read_text())
    evaluation = json.loads((RUN / "eval" / "evaluation.json").read_text())
    out = RUN / "interpret" / HOOKPOINT

    print(f"\nDemo finished in {time.perf_counter() - start:.0f}s "
          f"(train {times['train']:.0f}s, evaluate {times['evaluate']:.0f}s, interpret {times['interpret']:.0f}s)")
    print(f"Run directory: {RUN}")
    print(f"  SAE (SAELens format)  {RUN / 'sae' / HOOKPOINT}")
    print(f"  checkpoints           {RUN / 'checkpoints'}")
    print(f"  evaluation            {RUN / 'eval' / 'evaluation.json'}")
    print(f"  interpretation        {out}")
    print(f"  dashboard             {out / 'dashboard.html'}")
    print(f"  W&B offline runs      {RUN}/**/wandb (upload with `wandb sync`)")
    print_wandb_run()
    print(f"\nSAE: held-out FVU {train['fvu']:.3f}, L0 {train['l0']:.1f}, dead {100 * train['dead_frac']:.1f}%;"
          f" in the LM: CE clean {evaluation['ce_clean']:.3f}, with SAE {evaluation['ce_sae']:.3f},"
          f" CE loss recovered {evaluation['ce_loss_recovered']:.3f}, KL {evaluation['kl_div']:.3f}")
    print_feature_table(out)


EXPLAINER_NOTE = (
    "Labels: the embedded explainer is the 135M SmolLM2 itself. It is there to exercise the plumbing (prompts,\n"
    "parsing, scoring), not to label: expect empty, generic or wrong labels and scores near chance. The\n"
    "`top tokens` column is label-free and comes from each feature's own data (the tokens its top examples\n"
    "peak on, then its logit-lens tokens). For real labels run interpret.py with explainer=vllm,\n"
    "explainer=openrouter or explainer=openai (see README).")


def print_feature_table(out: Path) -> None:
    """The features of an interpret directory: scores, steering effect, label (or why there is none)
    and the label-free top tokens, then the means and the note on what the labels are worth."""
    from saeforge.interpret.records import read_summary

    rows = read_summary(out, strict=False)
    if not rows:
        return
    print(f"\n{'feature':>7}  {'detection':>9}  {'fuzz':>6}  {'embed':>6}  {'steer':>6}  {'label':<40}  top tokens")
    for r in rows:
        cells = [r.get(c) or "-" for c in ("detection", "fuzz", "embedding", "steering_effect")]
        cells = [f"{float(c):.2f}" if c != "-" else c for c in cells]
        status = r.get("status") or ""
        label = r.get("label") or (f"({status})" if status else "(not explained)")
        print(f"{r['feature']:>7}  {cells[0]:>9}  {cells[1]:>6}  {cells[2]:>6}  {cells[3]:>6}  {label[:40]:<40}  "
              f"{(r.get('top_tokens') or '-')[:80]}")
    n_described = sum(1 for r in rows if r.get("top_tokens"))
    n_labelled = sum(1 for r in rows if r.get("label"))
    print(f"\n{n_labelled}/{len(rows)} features labelled, {n_described}/{len(rows)} with a top-token description;"
          f" mean detection {mean([r.get('detection') for r in rows])}, fuzz {mean([r.get('fuzz') for r in rows])},"
          f" embedding {mean([r.get('embedding') for r in rows])}")
    print("\n" + EXPLAINER_NOTE)


def print_wandb_run() -> None:
    """Read the offline W&B files back: train, evaluate and interpret all logged into one run."""
    from saeforge.pipelines.wandb_records import read_runs

    runs = read_runs(RUN / "wandb")
    if not runs:
        return
    for run in runs:
        summary = run.get("summary", {})
        groups = {g: sum(k.startswith(g + "/") for k in summary) for g in ("train", "final", "eval", "interpret")}
        print(f"  W&B run {run.get('id')} ({run.get('name')}): " + ", ".join(f"{g}/* {n} keys" for g, n in groups.items()))


if __name__ == "__main__":
    main()
