"""End to end on the tiny model: `python discover.py` extracts and ranks a planted marker-word feature first."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from saeforge.discover.files import read_ranking, report_path
from saeforge.lm.capture import capture_residual, run_until_captured
from saeforge.lm.loading import load_lm
from saeforge.sae.formats import write_saelens
from saeforge.sae.model import SAEConfig, SparseAutoencoder
from tests.conftest import ROOT, compose_config

MARKERS = ["dog", "fox", "sky"]  # one token each (with their leading space) in the tiny tokenizer
NEUTRAL = ["the", "of", "and", "bottle", "Prince", "quick", "brown", "jumps", "Holmes", "history", "surgeon"]
HOOKPOINT = "layers.1"
PLANTED = 5


def sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """'Sherlock' + neutral words with `label` marker words after the first; label = their count."""
    rng = np.random.default_rng(seed)
    out, labels = [], []
    for i in range(n):
        label = [0, 0, 1, 2, 3][i % 5]
        words = list(rng.choice(NEUTRAL, size=int(rng.integers(4, 7))))
        for _ in range(label):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(MARKERS)))
        out.append(" ".join(["Sherlock", *words]) + f" {i}")
        labels.append(label)
    return out, labels


def planted_sae(folder: Path, texts: list[str]) -> None:
    """A topk SAE on the tiny model whose feature PLANTED reads the marker-token direction at HOOKPOINT."""
    lm = load_lm(compose_config("discover", ["model=tiny"]).model)
    hidden, is_marker = [], []
    marker_ids = {lm.tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in MARKERS}
    for text in texts:
        ids = [lm.tokenizer.bos_token_id, *lm.tokenizer(text, add_special_tokens=False)["input_ids"]]
        with torch.no_grad(), capture_residual(lm.model, [HOOKPOINT]) as captured:
            run_until_captured(lm.model, input_ids=torch.tensor([ids]))
        hidden.append(captured[HOOKPOINT][0, 1:].float())
        is_marker += [i in marker_ids for i in ids[1:]]
    h, m = torch.cat(hidden), torch.tensor(is_marker)
    direction = h[m].mean(0) - h[~m].mean(0)
    direction /= direction.norm()
    proj = h @ direction
    threshold = (proj[m].min() + proj[~m].max()) / 2 if proj[m].min() > proj[~m].max() else proj[m].quantile(0.1)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=h.shape[1], d_sae=32, k=8, architecture="topk"))
    with torch.no_grad():
        sae.W_enc.normal_(0, 0.05)
        sae.b_enc.fill_(-0.2)
        sae.W_enc[:, PLANTED] = 10 * direction
        sae.b_enc[PLANTED] = -10 * threshold
    write_saelens(sae, folder, hook_name=HOOKPOINT)


@pytest.mark.slow
def test_discover_ranks_the_planted_feature_first(tmp_path: Path) -> None:
    texts, labels = sentences(60)
    concepts = tmp_path / "concepts.csv"
    with concepts.open("w", newline="") as handle:
        csv.writer(handle).writerows([["sentence", "concept_strength_label"], *zip(texts, labels)])
    planted_sae(tmp_path / "planted", texts)
    (tmp_path / "saes.yaml").write_text(f"saes:\n  - {{layer: 1, l0: 16, path: {tmp_path / 'planted'}}}\n")
    out = tmp_path / "run"
    subprocess.run([sys.executable, "discover.py", "model=tiny", "logger=none", f"concepts={concepts}",
                    f"saes={tmp_path / 'saes.yaml'}", f"run.dir={out}", "discover.analysis.n_permutations=1000"],
                   cwd=ROOT, check=True, timeout=300)
    rows = read_ranking(out / "analysis")
    assert int(rows[0]["feature"]) == PLANTED and (rows[0]["layer"], rows[0]["l0"]) == ("1", "16")
    assert float(rows[0]["spearman"]) > 0.8 and float(rows[0]["q"]) < 0.05
    assert rows[0]["neuronpedia_url"] == ""  # a local SAE: no Neuronpedia id, no link
    assert report_path(out / "analysis").is_file()
