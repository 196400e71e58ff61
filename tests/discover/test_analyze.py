"""Concept analysis on planted data: the marker feature ranks first, the null stays calibrated, the formats hold."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse
from sklearn.metrics import roc_auc_score
from scipy.stats import false_discovery_control, rankdata, spearmanr

from saeforge.config.schema import ConceptAnalysisConfig
from saeforge.discover.analyze import analyze_concepts
from saeforge.discover import stats
from saeforge.discover.files import (FRAGMENT_FIELDS, RANKING_COLUMNS, ConceptActivations, activation_file_name, read_ranking,
                                     read_top_features, report_path, write_activations,
                                     write_configurations)
from saeforge.discover.stats import Permutations, auroc, benjamini_hochberg, sentence_activations

MARKERS = ["cat", "dog", "horse", "owl", "fox", "bear"]
NEUTRAL = ["the", "walked", "slowly", "into", "a", "quiet", "room", "near", "old", "table", "and", "then", "left"]
PLANTED = 11


def planted_sentences(n: int, rng: np.random.Generator) -> tuple[list[list[str]], np.ndarray]:
    """Sentences of neutral words with `label` marker words (animals) inserted; label = their count."""
    labels = np.arange(n) % 4
    rng.shuffle(labels)
    sentences = []
    for label in labels:
        words = list(rng.choice(NEUTRAL, size=int(rng.integers(5, 9))))
        for _ in range(label):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(MARKERS)))
        sentences.append(words)
    return sentences, labels


def make_activations(sentences: list[list[str]], labels: np.ndarray, rng: np.random.Generator, d_sae: int,
                     planted: int | None, layer: int, l0: int, sparse: bool = True) -> ConceptActivations:
    """One fragment per word prefix; `planted` fires at marker words with the number of markers so far."""
    rows, frags, sents, idx, pos, final, lengths, labs = [], [], [], [], [], [], [], []
    for s, (words, label) in enumerate(zip(sentences, labels)):
        seen = 0
        for t, word in enumerate(words):
            row = np.where(rng.random(d_sae) < 0.08, rng.exponential(1.0, d_sae), 0.0)
            if planted is not None:
                row[planted] = 0.0
                if word in MARKERS:
                    seen += 1
                    row[planted] = seen * (1.0 + 0.1 * rng.random())
            rows.append(row)
            frags.append(" ".join(words[:t + 1]))
            sents.append(" ".join(words))
            idx.append(s)
            pos.append(t)
            final.append(t == len(words) - 1)
            lengths.append(t + 1)
            labs.append(int(label))
    dense = np.asarray(rows, dtype=np.float32)
    return ConceptActivations(
        activations=scipy.sparse.csr_matrix(dense) if sparse else dense, fragments=np.asarray(frags),
        original_sentences=np.asarray(sents), concept_strength_labels=np.asarray(labs, np.int64),
        sentence_indices=np.asarray(idx, np.int64), token_positions=np.asarray(pos, np.int64),
        is_final_token=np.asarray(final), fragment_lengths=np.asarray(lengths, np.int64), layer=layer,
        average_l0=float(l0), num_features=d_sae)


def write_planted(folder: Path, n: int = 80, seed: int = 0, d_sae: int = 48) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    sentences, labels = planted_sentences(n, rng)
    for layer, l0, planted, sparse in ((1, 8, None, True), (2, 16, PLANTED, True), (3, 8, None, False)):
        acts = make_activations(sentences, labels, rng, d_sae, planted, layer, l0, sparse)
        write_activations(folder / activation_file_name(layer, l0), acts)
    write_configurations(folder, "test", [
        {"file": activation_file_name(1, 8), "layer": 1, "l0": "8", "source": "release-a/sae-a",
         "neuronpedia_id": "smollm2/1-res-a"},
        {"file": activation_file_name(2, 16), "layer": 2, "l0": "16", "source": "release-b/sae-b",
         "neuronpedia_id": "smollm2/2-res-b", "local": "/runs/b"},
        {"file": activation_file_name(3, 8), "layer": 3, "l0": "8", "source": str(folder), "neuronpedia_id": None}])
    return sentences


def test_planted_feature_ranks_first(tmp_path: Path) -> None:
    write_planted(tmp_path / "acts")
    ranking = analyze_concepts(tmp_path / "acts", tmp_path / "out", ConceptAnalysisConfig(top_features=3))
    rows = read_ranking(ranking)
    best = rows[0]
    assert (best["sae"], best["layer"], best["l0"], int(best["feature"])) == ("release-b/sae-b", "2", "16", PLANTED)
    assert float(best["spearman"]) > 0.8 and float(best["q"]) < 0.05
    assert float(best["auroc_ge3"]) > 0.9 and best["monotonic"] == "True" and float(best["selectivity"]) > 0.9
    assert best["neuronpedia_url"] == f"https://www.neuronpedia.org/smollm2/2-res-b/{PLANTED}"
    assert all(r["neuronpedia_url"] == "" for r in rows if r["sae"] == "layer_3_l0_8")  # no id, no link
    assert sum(float(r["q"]) < 0.05 for r in rows) <= 2  # the noise features stay insignificant
    top = read_top_features(tmp_path / "out")
    first = top["top_features"][0]
    assert all(any(m in s["sentence"].split() for m in MARKERS) for s in first["top_sentences"])
    assert first["top_fragments"][0]["fragment"].split()[-1] in MARKERS
    assert sorted(first["per_label"]) == ["0", "1", "2", "3"] and max(first["per_label"]["0"]) == 0
    assert f"interpret.features=[{PLANTED}]" in top["interpret_commands"][0]["command"]
    assert "ckpt=/runs/b" in top["interpret_commands"][0]["command"]
    assert report_path(tmp_path / "out").is_file()


def test_ranking_columns(tmp_path: Path) -> None:
    write_planted(tmp_path / "acts", n=24)
    ranking = analyze_concepts(tmp_path / "acts", tmp_path / "out", ConceptAnalysisConfig(n_permutations=50))
    with ranking.open() as handle:
        header = next(csv.reader(handle))
    assert tuple(header[:len(RANKING_COLUMNS)]) == RANKING_COLUMNS
    assert {"spearman_max", "spearman_final", "firing_rate_ratio", "mean_label3"} <= set(header)


def test_statistics_match_scipy() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 60)
    values = np.where(rng.random((60, 5)) < 0.5, rng.random((60, 5)) + labels[:, None] * 0.2, 0.0)
    perms = Permutations(labels, 200, 0)
    ranks = rankdata(values, axis=0)
    rho = perms.spearman(ranks)
    assert np.allclose(rho, [spearmanr(values[:, j], labels).statistic for j in range(5)])
    assert np.allclose(auroc(ranks, labels >= 2), [roc_auc_score(labels >= 2, values[:, j]) for j in range(5)])
    p = np.array([0.01, 0.04, 0.03, 0.5])
    assert np.allclose(benjamini_hochberg(p), false_discovery_control(p))
    assert np.allclose(benjamini_hochberg(p, 8), false_discovery_control([*p, 1, 1, 1, 1])[:4])


def test_dense_and_sparse_files_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    sentences, labels = planted_sentences(20, rng)
    dense = make_activations(sentences, labels, np.random.default_rng(2), 16, 3, 0, 4, sparse=False)
    sparse = make_activations(sentences, labels, np.random.default_rng(2), 16, 3, 0, 4, sparse=True)
    a, b = sentence_activations(dense), sentence_activations(sparse)
    assert np.array_equal(a.max, b.max.toarray()) and np.array_equal(a.final, b.final.toarray())
    assert np.array_equal(a.labels, labels)
    monkeypatch.setattr(stats, "BLOCK_NONZEROS", 7)  # many blocks, and the fragments out of sentence order
    order = np.random.default_rng(3).permutation(sparse.activations.shape[0])
    sparse.activations = sparse.activations[order]
    for name in FRAGMENT_FIELDS:
        setattr(sparse, name, getattr(sparse, name)[order])
    c = sentence_activations(sparse)
    assert np.array_equal(a.max, c.max.toarray()) and np.array_equal(a.final, c.final.toarray())
    first_out = dense.dense() * (dense.token_positions >= 1)[:, None]  # skip_first_tokens=1, by hand
    expected = np.stack([first_out[dense.sentence_indices == s].max(axis=0) for s in range(len(sentences))])
    assert np.array_equal(sentence_activations(dense, skip_first_tokens=1).max, expected)
    skipped = sentence_activations(sparse, skip_first_tokens=1)
    assert np.array_equal(skipped.max.toarray(), expected) and np.array_equal(skipped.final.toarray(), a.final)


def test_null_calibration(tmp_path: Path) -> None:
    """Shuffled labels: at most about 5% of runs have any feature at q < 0.05 (BH under the global null)."""
    rng = np.random.default_rng(7)
    runs, hits = 60, 0
    for run in range(runs):
        sentences, labels = planted_sentences(40, rng)
        acts = make_activations(sentences, rng.permutation(labels), rng, 24, PLANTED, 0, 8)
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        write_activations(folder / activation_file_name(0, 8), acts)
        settings = ConceptAnalysisConfig(n_permutations=1000, seed=run, top_features=1, examples_per_feature=1)
        rows = read_ranking(analyze_concepts(folder, folder / "out", settings))
        hits += any(float(r["q"]) < 0.05 for r in rows)
    assert hits <= 0.05 * runs + 2 * (0.05 * 0.95 * runs) ** 0.5 + 1  # ≤ 7 of 60


@pytest.mark.parametrize("bad", ["<script>alert(1)</script>", "\"><img/src=x/onerror=alert(2)>"])
def test_report_escapes_text(tmp_path: Path, bad: str) -> None:
    rng = np.random.default_rng(0)
    sentences, labels = planted_sentences(24, rng)
    sentences = [[bad if w in MARKERS else w for w in s] for s in sentences]
    acts = make_activations(sentences, labels, rng, 16, None, 0, 8)
    acts.activations = scipy.sparse.csr_matrix(np.asarray(
        [[float(f.split()[-1] == bad)] * 16 for f in acts.fragments], dtype=np.float32))
    write_activations(tmp_path / activation_file_name(0, 8), acts)
    analyze_concepts(tmp_path, tmp_path / "out", ConceptAnalysisConfig(n_permutations=50, top_features=2))
    page = report_path(tmp_path / "out").read_text()
    assert bad not in page and "<script" not in page and "<img" not in page
    assert bad.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;") in page


def test_labels_from_another_csv(tmp_path: Path) -> None:
    """concepts_csv relabels the extracted sentences without re-extraction; other sentences are refused."""
    sentences = write_planted(tmp_path / "acts", n=40)
    texts = [" ".join(words) for words in sentences]
    relabelled = tmp_path / "relabelled.csv"
    with relabelled.open("w", newline="") as handle:
        csv.writer(handle).writerows([["sentence", "concept_strength_label"], *[(t, i % 4) for i, t in enumerate(texts)]])
    settings = ConceptAnalysisConfig(n_permutations=200, top_features=1)
    rows = read_ranking(analyze_concepts(tmp_path / "acts", tmp_path / "out", settings, concepts_csv=relabelled))
    planted = next(r for r in rows if r["sae"] == "release-b/sae-b" and int(r["feature"]) == PLANTED)
    assert float(planted["q"]) > 0.05  # the new labels do not count marker words
    top = json.loads((tmp_path / "out" / "top_features.json").read_text())["top_features"][0]
    label_of = {t: i % 4 for i, t in enumerate(texts)}
    assert top["top_sentences"] and top["top_fragments"]
    assert all(s["label"] == label_of[s["sentence"]] for s in top["top_sentences"])  # the CSV's labels, not the file's
    assert all(f["label"] == label_of[f["sentence"]] for f in top["top_fragments"])
    assert sum(len(v) for v in top["per_label"].values()) == len(texts)
    with relabelled.open("w", newline="") as handle:
        csv.writer(handle).writerows([["sentence", "concept_strength_label"], *[(t + "!", 1 + i % 2) for i, t in enumerate(texts)]])
    with pytest.raises(ValueError, match="sentence 1 differs"):
        analyze_concepts(tmp_path / "acts", tmp_path / "out", settings, concepts_csv=relabelled)


def test_permutations_drawn_in_blocks_equal_one_draw(monkeypatch: pytest.MonkeyPatch) -> None:
    """The label shuffles, drawn in blocks and kept as codes, are the one-draw shuffles of the label ranks."""
    labels = np.random.default_rng(4).integers(0, 4, 37)
    monkeypatch.setattr(stats, "PERMUTATION_BLOCK", 100)
    perms = Permutations(labels, 50, 9)
    order = np.argsort(np.random.default_rng(9).random((50, 37)), axis=1)
    assert np.array_equal(perms.shuffled, perms.y[order].astype(np.float32))


def test_streamed_groups_and_chunks_change_no_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny read blocks, feature groups, rank blocks and chunks give byte-identical outputs (dense and CSR files)."""
    write_planted(tmp_path / "acts", n=60, d_sae=40)
    settings = ConceptAnalysisConfig(n_permutations=300, top_features=6, skip_first_tokens=1)
    monkeypatch.setattr(stats, "CHUNK_BYTES", 8 * (4 * 60 + 300) * 7)  # 7 features per chunk
    analyze_concepts(tmp_path / "acts", tmp_path / "whole", settings)
    for name, value in (("BLOCK_NONZEROS", 9), ("GROUP_BYTES", 32 * 25), ("RANK_BLOCK", 120), ("PERMUTATION_BLOCK", 130)):
        monkeypatch.setattr(stats, name, value)
    analyze_concepts(tmp_path / "acts", tmp_path / "streamed", settings)
    for name in ("ranking.csv", "top_features.json"):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "streamed" / name).read_bytes(), name
