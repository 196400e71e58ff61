"""Per-feature statistics of one SAE's activations against the 0–3 concept label.

Each formula is written once here:
- sentence-level activation: the max over the sentence's fragments (prefixes), and the value at its
  final token (`sentence_activations`);
- Spearman ρ (average ranks for ties) and its permutation p-value: ranks are taken once, and every
  shuffle is one row of a matrix product of shuffled, centred label ranks with the centred feature
  ranks (`Permutations`); p = (1 + #{|ρ_shuffled| ≥ |ρ|}) / (1 + shuffles), two-sided, refined by
  the t tail where the shuffles cannot resolve it (`Permutations.p_values`);
- AUROC at label ≥ 1, ≥ 2, ≥ 3 against the rest, from the same ranks (Mann–Whitney U / n₊n₋);
- selectivity = (m₃ − m₀) / (m₃ + m₀), m_k the mean activation at label k (in [−1, 1]; 0 when both
  are 0), and the firing-rate ratio (f₃ + 1)/(n₃ + 2) ÷ (f₀ + 1)/(n₀ + 2) (Laplace-smoothed rates of
  firing, activation > 0, at label 3 and 0);
- monotonic: the per-label means never fall from one label to the next and m_max > m_min;
- Benjamini–Hochberg q-values (`benjamini_hochberg`).

Memory stays bounded: a CSR file stays sparse (the sentence-level max is built from its nonzeros),
and the statistics run over chunks of fired features sized to a fixed budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy.stats import rankdata
from scipy.stats import t as student_t

from saeforge.discover.files import ConceptActivations

THRESHOLDS = (1, 2, 3)
LABELS = (0, 1, 2, 3)
STAT_COLUMNS = ("spearman", "auroc_ge1", "auroc_ge2", "auroc_ge3", "selectivity", "monotonic", "p", "p_permutation",
                "spearman_max", "spearman_final", "firing_rate_ratio", "mean_label0", "mean_label1", "mean_label2", "mean_label3")
"""Per-feature statistics `feature_stats` returns, one float64 array each (monotonic as 0/1)."""
TAIL_EXCEEDANCES = 10
"""Below this many shuffles reaching |ρ|, the p-value comes from the t tail (see Permutations.p_values)."""
BLOCK_NONZEROS = 1 << 20
"""Nonzeros of a CSR file turned into sentence maxima at a time."""
CHUNK_BYTES = 64 << 20
"""Working-set budget of one feature chunk (dense sentence × feature arrays and shuffled ρ)."""


@dataclass
class SentenceActivations:
    """One SAE's sentence-level activations: rows are sentences (by sentence index), columns features."""

    max: np.ndarray | scipy.sparse.csc_matrix
    final: np.ndarray | scipy.sparse.csc_matrix
    labels: np.ndarray
    sentences: np.ndarray

    @property
    def n_features(self) -> int:
        return int(self.max.shape[1])

    def columns(self, which: str, features: np.ndarray) -> np.ndarray:
        """Dense float64 [n_sentences, len(features)] of the `max` or `final` activation."""
        matrix = self.max if which == "max" else self.final
        block = matrix[:, features]
        return np.asarray(block.toarray() if scipy.sparse.issparse(block) else block, dtype=np.float64)

    def fired(self) -> np.ndarray:
        """Features whose sentence-level max is nonzero in at least one sentence."""
        if scipy.sparse.issparse(self.max):
            return np.flatnonzero(np.diff(self.max.indptr) > 0)
        return np.flatnonzero((self.max != 0).any(axis=0))


def sentence_activations(acts: ConceptActivations, source: str = "", skip_first_tokens: int = 0) -> SentenceActivations:
    """Max over each sentence's fragments (those at token positions ≥ skip_first_tokens) and the
    final-token value (activations are ≥ 0, as SAE codes are)."""
    sent = np.asarray(acts.sentence_indices, dtype=np.int64)
    n_sent = int(sent.max()) + 1 if sent.size else 0
    present = np.bincount(sent, minlength=n_sent) > 0
    if not present.all():
        raise ValueError(f"{source}: sentence_indices skip sentence {int(np.flatnonzero(~present)[0])}")
    first = np.full(n_sent, -1, dtype=np.int64)
    first[sent[::-1]] = np.arange(sent.size - 1, -1, -1)
    labels = np.asarray(acts.concept_strength_labels, dtype=np.int64)[first]
    sentences = np.asarray(acts.original_sentences)[first]
    final_rows = np.flatnonzero(np.asarray(acts.is_final_token, dtype=bool))
    final_rows = final_rows[np.argsort(sent[final_rows], kind="stable")]
    if final_rows.size != n_sent or np.any(sent[final_rows] != np.arange(n_sent)):
        raise ValueError(f"{source}: every sentence needs exactly one fragment with is_final_token")
    skipped = np.asarray(acts.token_positions) < skip_first_tokens
    if scipy.sparse.issparse(acts.activations):
        csr = scipy.sparse.csr_matrix(acts.activations)
        if skipped.any():
            csr = scipy.sparse.csr_matrix(scipy.sparse.diags((~skipped).astype(np.float32)) @ csr)
            csr.eliminate_zeros()
        maximum = _sparse_sentence_max(csr, sent, n_sent)
        final = scipy.sparse.csc_matrix(acts.activations[final_rows], dtype=np.float32)
    else:
        dense = np.asarray(acts.activations, dtype=np.float32)
        final = dense[final_rows]
        if skipped.any():
            dense = np.where(skipped[:, None], np.float32(0), dense)
        order = np.argsort(sent, kind="stable")
        ordered = dense if np.all(order == np.arange(order.size)) else dense[order]
        starts = np.searchsorted(sent[order], np.arange(n_sent))
        maximum = np.maximum.reduceat(ordered, starts, axis=0)
    return SentenceActivations(max=maximum, final=final, labels=labels, sentences=sentences)


def _sparse_sentence_max(csr: scipy.sparse.csr_matrix, sent: np.ndarray, n_sent: int) -> scipy.sparse.csc_matrix:
    """Per-sentence max of a CSR's rows, built from its nonzeros in blocks of BLOCK_NONZEROS (bounded
    scratch memory); the sentence's rows need not be contiguous."""
    d = csr.shape[1]
    order = np.argsort(sent, kind="stable")
    if np.any(order != np.arange(order.size)):
        csr, sent = csr[order], sent[order]
    bounds = np.searchsorted(sent, np.arange(n_sent + 1))  # sentence s: rows bounds[s]:bounds[s + 1]
    cuts = [0]
    while cuts[-1] < n_sent:  # whole sentences per block, about BLOCK_NONZEROS nonzeros each
        target = csr.indptr[bounds[cuts[-1]]] + BLOCK_NONZEROS
        nxt = int(np.searchsorted(csr.indptr[bounds], target, side="right")) - 1
        cuts.append(min(max(nxt, cuts[-1] + 1), n_sent))
    rows, cols, vals = [], [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        block = csr[bounds[a]:bounds[b]].tocoo()
        key = (sent[bounds[a]:bounds[b]][block.row] - a) * d + block.col.astype(np.int64)
        order = np.argsort(key, kind="stable")
        keys, starts = np.unique(key[order], return_index=True)
        if keys.size:
            vals.append(np.maximum.reduceat(block.data[order], starts).astype(np.float32))
            rows.append((keys // d + a).astype(np.int32))
            cols.append((keys % d).astype(np.int32))
    if not vals:
        return scipy.sparse.csc_matrix((n_sent, d), dtype=np.float32)
    return scipy.sparse.coo_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                   shape=(n_sent, d)).tocsc()


class Permutations:
    """The label shuffles shared by every feature of every SAE: ρ under each shuffle is one matrix product."""

    def __init__(self, labels: np.ndarray, n_permutations: int, seed: int) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        ranks = rankdata(self.labels)
        centred = ranks - ranks.mean()
        norm = float(np.linalg.norm(centred))
        self.y = centred / norm if norm > 0 else centred
        rng = np.random.default_rng(seed)
        order = np.argsort(rng.random((n_permutations, self.labels.size)), axis=1)
        self.shuffled = self.y[order].astype(np.float32)  # [P, n]: shuffled centred unit label ranks

    def spearman(self, ranks: np.ndarray) -> np.ndarray:
        """ρ of each column of feature ranks with the label (0 for a constant column)."""
        return self.y @ _unit(ranks)

    def p_values(self, ranks: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Two-sided p-values of the observed ρ: (p, the plain permutation p).

        The plain permutation p cannot go below 1/(1 + shuffles), too coarse for BH over many
        thousand features; where fewer than TAIL_EXCEEDANCES shuffles reach |ρ|, p is the Student-t
        tail of ρ (df n − 2; the permutation null of a correlation has variance 1/(n − 1) whatever
        the ties), never above the permutation p."""
        shuffled = self.shuffled @ _unit(ranks).astype(np.float32)  # [P, F]
        exceed = (np.abs(shuffled) >= np.abs(rho).astype(np.float32) - 1e-6).sum(axis=0)
        permutation = np.where(np.abs(rho) > 0, (1.0 + exceed) / (1.0 + self.shuffled.shape[0]), 1.0)
        n = self.labels.size
        r2 = np.minimum(rho ** 2, 1.0 - 1e-12)
        tail = 2.0 * student_t.sf(np.sqrt(r2 * max(n - 2, 1) / (1.0 - r2)), max(n - 2, 1))
        p = np.where(exceed < TAIL_EXCEEDANCES, np.minimum(tail, permutation), permutation)
        return p, permutation


def _unit(ranks: np.ndarray) -> np.ndarray:
    centred = ranks - ranks.mean(axis=0, keepdims=True)
    norm = np.linalg.norm(centred, axis=0, keepdims=True)
    return np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)


def auroc(ranks: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """AUROC of each column (higher activation → positive) from its average ranks; NaN without both classes."""
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return np.full(ranks.shape[1], np.nan)
    return (ranks[positive].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _label_stats(values: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    means = np.stack([values[labels == k].mean(axis=0) if np.any(labels == k) else np.full(values.shape[1], np.nan)
                      for k in LABELS])
    present = means[~np.isnan(means[:, 0])]
    rising = np.all(np.diff(present, axis=0) >= 0, axis=0) & (present[-1] > present[0])
    m0, m3 = means[0], means[3]
    total = np.nan_to_num(m0) + np.nan_to_num(m3)
    selectivity = np.divide(np.nan_to_num(m3) - np.nan_to_num(m0), total, out=np.zeros_like(total), where=total > 0)
    fires = values > 0

    def rate(k: int) -> np.ndarray:
        mask = labels == k
        return (fires[mask].sum(axis=0) + 1.0) / (mask.sum() + 2.0)

    out = {f"mean_label{k}": means[k] for k in LABELS}
    out.update(selectivity=selectivity, firing_rate_ratio=rate(3) / rate(0), monotonic=rising.astype(np.float64))
    return out


def feature_stats(sentence: SentenceActivations, perms: Permutations, features: np.ndarray,
                  activation: str = "max") -> dict[str, np.ndarray]:
    """Every column of STAT_COLUMNS for `features`, the primary statistics on `activation` (max or final)."""
    labels = sentence.labels
    n = max(labels.size, 1)
    chunk = max(1, CHUNK_BYTES // (8 * (4 * n + perms.shuffled.shape[0])))
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, features.size, chunk):
        cols = features[start:start + chunk]
        values = sentence.columns(activation, cols)
        ranks = rankdata(values, axis=0)
        rho = perms.spearman(ranks)
        p, permutation = perms.p_values(ranks, rho)
        part = {"spearman": rho, "p": p, "p_permutation": permutation}
        for t in THRESHOLDS:
            part[f"auroc_ge{t}"] = auroc(ranks, labels >= t)
        part.update(_label_stats(values, labels))
        del values, ranks
        for which in ("max", "final"):
            part[f"spearman_{which}"] = rho if which == activation else perms.spearman(
                rankdata(sentence.columns(which, cols), axis=0))
        parts.append(part)
    if not parts:
        return {c: np.zeros(0) for c in STAT_COLUMNS}
    return {c: np.concatenate([p[c] for p in parts]) for c in STAT_COLUMNS}


def benjamini_hochberg(p: np.ndarray, n_tests: int | None = None) -> np.ndarray:
    """BH q-values; `n_tests` ≥ len(p) counts untested hypotheses (p = 1) without listing them."""
    p = np.asarray(p, dtype=np.float64)
    m = max(int(n_tests if n_tests is not None else p.size), p.size)
    if p.size == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, p.size + 1)
    q_sorted = np.minimum.accumulate(scaled[::-1])[::-1].clip(max=1.0)
    q = np.empty_like(q_sorted)
    q[order] = q_sorted
    return q
