"""`make demo-lora`: the LoRA-adapter SAE workflow end to end on the embedded SmolLM2 (CPU, ~10 minutes).

1. fine-tune a rank-1 LoRA on all seven module types (q, k, v, o, gate, up, down) for a few steps
   with peft, on windows of the bundled Gutenberg corpus; saved as a peft adapter folder in the cache
   (reused by a second run);
2. extract the LoRA A-activations (`train.py data=lora extract_only=true`);
3. train a batch-TopK SAE on them (expansion 16, k 50);
4. interpret with the default stages (max-act, logit lens per adapter type, LoRA-space steering,
   labels, scores), which also writes the dashboard.
Steps 2-4 are the entry scripts a user types with their own adapter (see the README). Each phase is
timed. Environment knobs: DEMO_LORA_RUN_DIR (default runs/demo-lora), DEMO_LORA_STEPS (fine-tuning
steps), DEMO_LORA_TOKENS (extracted tokens), DEMO_LORA_FEATURES (features interpreted).
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

from demo import ROOT, print_feature_table, step

RUN = Path(os.environ.get("DEMO_LORA_RUN_DIR", ROOT / "runs" / "demo-lora")).resolve()
STEPS = int(os.environ.get("DEMO_LORA_STEPS", "8"))
TOKENS = int(os.environ.get("DEMO_LORA_TOKENS", "49152"))
FEATURES = int(os.environ.get("DEMO_LORA_FEATURES", "6"))
TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, CTX_LEN, LR, ALPHA, SEED = 2, 128, 5e-3, 8, 0


def finetune(adapter: Path) -> None:
    """A rank-1 LoRA on all 7 module types, trained briefly on Gutenberg windows; saved as a peft folder."""
    import torch
    from omegaconf import OmegaConf
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    from saeforge.activations.corpus import iter_texts, load_corpus
    from saeforge.activations.windows import pack_windows
    from saeforge.atomic import atomic_dir
    from saeforge.lm.loading import load_lm
    from saeforge.paths import cache_root

    torch.manual_seed(SEED)
    lm = load_lm(OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "model" / "smollm2.yaml")))
    corpus = load_corpus({"kind": "gutenberg", "shuffle": True, "shuffle_seed": SEED + 1}, cache_root())
    windows = pack_windows(iter_texts(corpus, "text"), lm.tokenizer, CTX_LEN, STEPS * BATCH * CTX_LEN).long()
    model = get_peft_model(lm.model, LoraConfig(r=1, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TYPES))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    bar = tqdm(range(STEPS), desc="fine-tune LoRA", dynamic_ncols=True)
    for i in bar:
        ids = windows[i * BATCH : (i + 1) * BATCH].to(lm.device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    with atomic_dir(adapter) as tmp:
        model.save_pretrained(str(tmp), save_embedding_layers=False)


def timed(title: str, *args: str) -> tuple[float, float]:
    """`demo.step` (wall seconds) plus the CPU seconds its process used (the wall time on an idle machine
    is about CPU / cores; on a shared machine the wall time alone says little)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = step(title, *args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"=== {title}: {cpu:.0f} CPU-seconds", flush=True)
    return wall, cpu


def main() -> None:
    from saeforge.paths import cache_root

    start = time.perf_counter()
    times: dict[str, tuple[float, float]] = {}
    adapter = (cache_root() / "lora-demo" / f"smollm2-r1-all7-{STEPS}steps-lr{LR:g}-alpha{ALPHA}-seed{SEED}").resolve()
    if (adapter / "adapter_config.json").is_file():
        print(f"\n=== fine-tune: reusing the adapter in {adapter}", flush=True)
        times["fine-tune"] = (0.0, 0.0)
    else:  # in its own process, so that its copy of the LM is freed before the next steps
        print(f"\n=== fine-tune: a rank-1 LoRA on {', '.join(TYPES)}, {STEPS} steps", flush=True)
        times["fine-tune"] = timed("fine-tune", str(Path(__file__).resolve()), "finetune", str(adapter))

    data = ["data=lora", f"data.lora.adapter={adapter}", f"data.n_tokens={TOKENS}", f"run.dir={RUN}"]
    times["extract"] = timed("extract", "train.py", *data, "extract_only=true")
    times["train"] = timed(
        "train", "train.py", *data, "sae.expansion_factor=16", "sae.k=50", "data.batch_size=1024",
        "data.shuffle_buffer=65536", "trainer.max_epochs=8", "sae.warmup_steps=20", "checkpoint_every_n_steps=200",
    )
    times["interpret"] = timed(
        "interpret", "interpret.py", f"ckpt={RUN}", f"interpret.max_latents={FEATURES}", "interpret.select=random",
        "interpret.n_tokens=16384", "interpret.steering.max_new_tokens=24", "interpret.maxact.n_examples=10",
        "interpret.maxact.context_left=10", "interpret.maxact.context_right=10", "interpret.explain.max_examples_in_prompt=10", "interpret.score.n_test=10",
        "interpret.score.n_negatives=10",
    )
    out = RUN / "interpret" / "lora"
    print(f"\nLoRA demo finished in {time.perf_counter() - start:.0f}s ("
          + ", ".join(f"{name} {wall:.0f}s" for name, (wall, _) in times.items()) + "); CPU-seconds: "
          + ", ".join(f"{name} {cpu:.0f}" for name, (_, cpu) in times.items()))
    print(f"  adapter (peft)        {adapter}")
    print(f"  SAE (SAELens format)  {RUN / 'sae' / 'lora'}")
    print(f"  interpretation        {out}")
    print(f"  dashboard             {out / 'dashboard.html'} (each feature's layer × adapter-type layout)")
    print_feature_table(out)

if __name__ == "__main__":
    if sys.argv[1:2] == ["finetune"]:
        finetune(Path(sys.argv[2]))
    else:
        main()
