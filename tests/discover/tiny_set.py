"""Test inputs for concept discovery: tiny random SAEs on the tiny model, a set file, a labelled CSV."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

from saeforge.sae.formats import write_saelens
from saeforge.sae.model import SAEConfig, SparseAutoencoder

PHRASES = ["the quick brown fox", "a dog jumps over", "Sherlock Holmes took his bottle",
           "the history of the United States", "Prince Andrew looked at the sky", "a surgeon must wash"]


def write_saes(folder: Path, specs: list[tuple[int, int]], d_in: int = 64, d_sae: int = 256, seed: int = 0) -> Path:
    """One SAELens-format topk SAE per (layer, k) and a YAML set listing them (file names layer_L_l0_k)."""
    torch.manual_seed(seed)
    lines = []
    for i, (layer, k) in enumerate(specs):
        sae = SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, architecture="topk"))
        with torch.no_grad():
            sae.b_enc.normal_()
        write_saelens(sae, folder / f"sae{i}", hook_name=f"layers.{layer}")
        lines.append(f"  - {{layer: {layer}, l0: {k}, path: sae{i}}}")
    path = folder / "saes.yaml"
    path.write_text("saes:\n" + "\n".join(lines) + "\n")
    return path


def write_concepts(path: Path, n: int = 24) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence", "concept_strength_label"])
        for i in range(n):
            writer.writerow([f"{PHRASES[i % len(PHRASES)]} {i}", i % 4])
    return path
