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

Memory does not grow with the number of sentences: a file is streamed (`ActivationFile.blocks`) once
per group of features (`feature_groups`, sized to GROUP_BYTES), each group's sentence-level values
are built from the nonzeros of its features only, and the statistics run over chunks of fired
features sized to CHUNK_BYTES — the same chunks whatever the grouping (`stats_by_chunk`), so
streaming changes no result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol

import numpy as np
import scipy.sparse
from scipy.stats import rankdata
from scipy.stats import t as student_t

THRESHOLDS = (1, 2, 3)
LABELS = (0, 1, 2, 3)
STAT_COLUMNS = ("spearman", "auroc_ge1", "auroc_ge2", "auroc_ge3", "selectivity", "monotonic", "p", "p_permutation",
                "spearman_max", "spearman_final", "firing_rate_ratio", "mean_label0", "mean_label1", "mean_label2", "mean_label3")
"""Per-feature statistics `stats_by_chunk` returns, one float64 array each (monotonic as 0/1)."""
TAIL_EXCEEDANCES = 10
"""Below this many shuffles reaching |ρ|, the p-value comes from the t tail (see Permutations.p_values)."""
BLOCK_NONZEROS = 1 << 18
"""Stored values of a file read at a time."""
GROUP_BYTES = 32 << 20
"""Working set of one feature group's sentence-level values: for a CSR file about 32 bytes per
stored value of its features (keys and values, then sorted), for a dense file its [n_sentences,
group] max and final-token arrays."""
CHUNK_BYTES = 64 << 20
"""Working-set budget of one feature chunk (dense sentence × feature arrays and shuffled ρ)."""
PERMUTATION_BLOCK = 1 << 19
"""Entries (shuffles × sentences) of the label shuffles drawn at a time."""
RANK_BLOCK = 1 << 19
"""Entries (sentences × features) ranked at a time."""


@dataclass
class SentenceActivations:
    """Sentence-level activations of some features: rows are sentences (by sentence index), columns features."""

    max: np.ndarray | scipy.sparse.csc_matrix
    final: np.ndarray | scipy.sparse.csc_matrix
    labels: np.ndarray
    sentences: np.ndarray | None = None

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

    def take(self, features: np.ndarray) -> SentenceActivations:
        """These columns only."""
        return SentenceActivations(self.max[:, features], self.final[:, features], self.labels, self.sentences)


def _hstack(parts: list[SentenceActivations]) -> SentenceActivations:
    if len(parts) == 1:
        return parts[0]

    def stack(mats: list) -> Any:
        if scipy.sparse.issparse(mats[0]):
            return scipy.sparse.hstack(mats, format="csc", dtype=mats[0].dtype)
        return np.hstack(mats)

    return SentenceActivations(stack([p.max for p in parts]), stack([p.final for p in parts]), parts[0].labels,
                               parts[0].sentences)


class ActivationSource(Protocol):
    """What the statistics read from a configuration's activations (ConceptActivations in memory, or
    ActivationFile streamed from disk)."""

    is_sparse: bool

    @property
    def shape(self) -> tuple[int, int]: ...

    def field(self, name: str) -> np.ndarray: ...

    def rows(self, name: str, index: np.ndarray) -> np.ndarray: ...

    def blocks(self, block_nonzeros: int) -> Iterator[tuple[int, np.ndarray | scipy.sparse.csr_matrix]]: ...


@dataclass
class SentenceLayout:
    """Which fragment belongs to which sentence, from a file's per-fragment fields."""

    sentence: np.ndarray
    """Sentence index of each fragment."""
    first: np.ndarray
    """Each sentence's first fragment row."""
    final: np.ndarray
    """Whether each fragment is its sentence's final token (exactly one per sentence)."""
    kept: np.ndarray
    """Whether each fragment counts in the sentence max (token position ≥ skip_first_tokens)."""
    labels: np.ndarray
    """Each sentence's label."""

    @property
    def n_sentences(self) -> int:
        return int(self.first.size)


def sentence_layout(acts: ActivationSource, source: str = "", skip_first_tokens: int = 0) -> SentenceLayout:
    """The sentences of a configuration's fragments, checked: every sentence index present, one final token each."""
    sent = np.asarray(acts.field("sentence_indices"), dtype=np.int64)
    n_sent = int(sent.max()) + 1 if sent.size else 0
    present = np.bincount(sent, minlength=n_sent) > 0
    if not present.all():
        raise ValueError(f"{source}: sentence_indices skip sentence {int(np.flatnonzero(~present)[0])}")
    first = np.full(n_sent, -1, dtype=np.int64)
    first[sent[::-1]] = np.arange(sent.size - 1, -1, -1)
    labels = np.asarray(acts.field("concept_strength_labels"), dtype=np.int64)[first]
    final = np.asarray(acts.field("is_final_token"), dtype=bool)
    final_rows = np.flatnonzero(final)
    final_rows = final_rows[np.argsort(sent[final_rows], kind="stable")]
    if final_rows.size != n_sent or np.any(sent[final_rows] != np.arange(n_sent)):
        raise ValueError(f"{source}: every sentence needs exactly one fragment with is_final_token")
    kept = np.asarray(acts.field("token_positions")) >= skip_first_tokens
    return SentenceLayout(sentence=sent, first=first, final=final, kept=kept, labels=labels)


def sentence_activations(acts: ActivationSource, source: str = "", skip_first_tokens: int = 0) -> SentenceActivations:
    """Max over each sentence's fragments (those at token positions ≥ skip_first_tokens) and the
    final-token value, of every feature (activations are ≥ 0, as SAE codes are)."""
    layout = sentence_layout(acts, source, skip_first_tokens)
    sentence = group_activations(acts, layout, np.arange(acts.shape[1]))
    sentence.sentences = acts.rows("original_sentences", layout.first)
    return sentence


def feature_groups(acts: ActivationSource, layout: SentenceLayout) -> Iterator[np.ndarray]:
    """Consecutive ranges of features whose sentence-level values fit GROUP_BYTES (CSR: counted from
    one pass over the file's nonzeros; dense: a fixed number of columns)."""
    d = acts.shape[1]
    if not acts.is_sparse:
        step = max(1, GROUP_BYTES // (8 * max(layout.n_sentences, 1)))
        yield from (np.arange(start, min(start + step, d)) for start in range(0, d, step))
        return
    counts = np.zeros(d, dtype=np.int64)
    for start, block in acts.blocks(BLOCK_NONZEROS):
        if layout.kept.all():
            counts += np.bincount(block.indices, minlength=d)
            continue
        rows = start + np.repeat(np.arange(block.shape[0]), np.diff(block.indptr))
        counts += np.bincount(block.indices[layout.kept[rows]], minlength=d)
    total = np.cumsum(counts)
    budget = max(1, GROUP_BYTES // 32)
    start = 0
    while start < d:
        below = total[start - 1] if start else 0
        stop = min(max(int(np.searchsorted(total, below + budget, side="right")), start + 1), d)
        yield np.arange(start, stop)
        start = stop


def group_activations(acts: ActivationSource, layout: SentenceLayout, features: np.ndarray) -> SentenceActivations:
    """Sentence-level max and final-token value of `features` (sorted, unique), streamed over the file."""
    n_sent, d = layout.n_sentences, acts.shape[1]
    k = int(features.size)
    if not acts.is_sparse:
        maximum = np.full((n_sent, k), -np.inf, dtype=np.float32)
        final = np.zeros((n_sent, k), dtype=np.float32)
        for start, block in acts.blocks(BLOCK_NONZEROS):
            values = np.asarray(block[:, features], dtype=np.float32)
            rows = np.arange(start, start + values.shape[0])
            last = layout.final[rows]
            final[layout.sentence[rows[last]]] = values[last]
            values[~layout.kept[rows]] = 0.0
            order = np.argsort(layout.sentence[rows], kind="stable")
            sents, starts = np.unique(layout.sentence[rows][order], return_index=True)
            maximum[sents] = np.maximum(maximum[sents], np.maximum.reduceat(values[order], starts, axis=0))
        return SentenceActivations(max=maximum, final=final, labels=layout.labels)
    column = np.full(d, -1, dtype=np.int32)
    column[features] = np.arange(k)
    drop_zeros = not layout.kept.all()  # skipping tokens drops stored zeros too (as eliminate_zeros did)
    max_parts: list[tuple[np.ndarray, np.ndarray]] = []
    final_parts: list[tuple[np.ndarray, np.ndarray]] = []
    for start, block in acts.blocks(BLOCK_NONZEROS):
        hit = np.flatnonzero(column[block.indices] >= 0)
        rows = start + np.searchsorted(block.indptr, hit, side="right") - 1
        # one int64 key per value, column-major (feature, sentence): sorted keys are CSC order
        key = column[block.indices[hit]].astype(np.int64) * n_sent + layout.sentence[rows]
        vals = np.asarray(block.data[hit], dtype=np.float32)
        last = layout.final[rows]
        final_parts.append((key[last], vals[last]))
        keep = layout.kept[rows] & (vals != 0) if drop_zeros else layout.kept[rows]
        max_parts.append((key[keep], vals[keep]))
        del hit, rows, key, vals
    return SentenceActivations(max=_csc_max(max_parts, n_sent, k), final=_csc_max(final_parts, n_sent, k),
                               labels=layout.labels)


def _csc_max(parts: list[tuple[np.ndarray, np.ndarray]], n_rows: int, n_cols: int) -> scipy.sparse.csc_matrix:
    """CSC [n_rows, n_cols] float32 of the max value per column-major key (column × n_rows + row)."""
    key = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    vals = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.float32)
    parts.clear()
    order = np.argsort(key)
    key, vals = key[order], vals[order]
    del order
    starts = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if key.size else np.zeros(0, np.int64)
    maximum = np.maximum.reduceat(vals, starts) if starts.size else np.zeros(0, np.float32)
    key = key[starts]
    del vals, starts
    indptr = np.searchsorted(key, np.arange(n_cols + 1, dtype=np.int64) * n_rows)
    return scipy.sparse.csc_matrix((maximum, (key % max(n_rows, 1)).astype(np.int32), indptr), shape=(n_rows, n_cols))


def top_fragments(acts: ActivationSource, layout: SentenceLayout, features: np.ndarray,
                  n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each of `features`: (rows, values) of its n highest positive fragment values (fragments
    before skip_first_tokens count as 0), highest first, ties by row; streamed over the file."""
    best = [(np.zeros(0, np.int64), np.zeros(0, np.float64)) for _ in features]
    column = np.full(acts.shape[1], -1, dtype=np.int64)
    column[features] = np.arange(features.size)
    for start, block in acts.blocks(BLOCK_NONZEROS):
        if scipy.sparse.issparse(block):
            local = column[block.indices]
            hit = local >= 0
            rows = (start + np.repeat(np.arange(block.shape[0]), np.diff(block.indptr)))[hit]
            cols, vals = local[hit], np.asarray(block.data[hit], dtype=np.float64)
        else:
            sub = np.asarray(block[:, features], dtype=np.float64)
            r, cols = np.nonzero(sub)
            rows, vals = start + r, sub[r, cols]
        positive = (vals > 0) & layout.kept[rows]
        rows, cols, vals = rows[positive], cols[positive], vals[positive]
        for j in np.unique(cols):
            mine = cols == j
            merged_rows = np.concatenate([best[j][0], rows[mine]])
            merged_vals = np.concatenate([best[j][1], vals[mine]])
            order = np.lexsort((merged_rows, -merged_vals))[:n]
            best[j] = (merged_rows[order], merged_vals[order])
    return best


class Permutations:
    """The label shuffles shared by every feature of every SAE: ρ under each shuffle is one matrix product.

    The shuffles are kept as label codes (one byte per shuffle × sentence) and expanded to the float32
    matrix of shuffled centred unit label ranks only while a chunk is tested (`shuffled`)."""

    def __init__(self, labels: np.ndarray, n_permutations: int, seed: int) -> None:
        self.labels = np.asarray(labels, dtype=np.int64)
        ranks = rankdata(self.labels)
        centred = ranks - ranks.mean()
        norm = float(np.linalg.norm(centred))
        self.y = centred / norm if norm > 0 else centred
        self.n_permutations = int(n_permutations)
        levels, codes = np.unique(self.labels, return_inverse=True)
        # y is one value per label, so a shuffle of y is a shuffle of the label codes
        self._levels = self.y[_first_index(codes, levels.size)].astype(np.float32)
        codes = codes.astype(np.int8 if levels.size <= 127 else np.int32)
        rng = np.random.default_rng(seed)
        n = self.labels.size
        self._codes = np.empty((self.n_permutations, n), dtype=codes.dtype)
        step = max(1, PERMUTATION_BLOCK // max(n, 1))
        for start in range(0, self.n_permutations, step):  # drawn in blocks: the same stream, less scratch memory
            rows = min(step, self.n_permutations - start)
            self._codes[start:start + rows] = codes[np.argsort(rng.random((rows, n)), axis=1)]

    @property
    def shuffled(self) -> np.ndarray:
        """[P, n] float32: the centred unit label ranks under each shuffle (built on each call)."""
        out = np.empty(self._codes.shape, dtype=np.float32)
        step = max(1, PERMUTATION_BLOCK // max(self._codes.shape[1], 1))
        for start in range(0, self.n_permutations, step):  # blocks: indexing widens the codes to intp
            out[start:start + step] = self._levels[self._codes[start:start + step]]
        return out

    def spearman(self, ranks: np.ndarray) -> np.ndarray:
        """ρ of each column of feature ranks with the label (0 for a constant column)."""
        return self.y @ _unit(ranks)

    def p_values(self, unit: np.ndarray, rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Two-sided p-values of the observed ρ, (p, the plain permutation p); `unit`: the feature
        ranks centred and scaled to unit length (`_unit`), as float32.

        The plain permutation p cannot go below 1/(1 + shuffles), too coarse for BH over many
        thousand features; where fewer than TAIL_EXCEEDANCES shuffles reach |ρ|, p is the Student-t
        tail of ρ (df n − 2; the permutation null of a correlation has variance 1/(n − 1) whatever
        the ties), never above the permutation p."""
        shuffled = self.shuffled @ unit  # [P, F]
        exceed = (np.abs(shuffled) >= np.abs(rho).astype(np.float32) - 1e-6).sum(axis=0)
        permutation = np.where(np.abs(rho) > 0, (1.0 + exceed) / (1.0 + self.n_permutations), 1.0)
        n = self.labels.size
        r2 = np.minimum(rho ** 2, 1.0 - 1e-12)
        tail = 2.0 * student_t.sf(np.sqrt(r2 * max(n - 2, 1) / (1.0 - r2)), max(n - 2, 1))
        p = np.where(exceed < TAIL_EXCEEDANCES, np.minimum(tail, permutation), permutation)
        return p, permutation


def _first_index(codes: np.ndarray, n_codes: int) -> np.ndarray:
    first = np.full(n_codes, -1, dtype=np.int64)
    first[codes[::-1]] = np.arange(codes.size - 1, -1, -1)
    return first


def _unit(ranks: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Each column centred and scaled to unit length (0 for a constant column); `out=ranks` works in place."""
    centred = np.subtract(ranks, ranks.mean(axis=0, keepdims=True), out=out)
    norm = np.linalg.norm(centred, axis=0, keepdims=True)
    if out is None:
        return np.divide(centred, norm, out=np.zeros_like(centred), where=norm > 0)
    np.divide(centred, norm, out=centred, where=norm > 0)
    centred[:, norm[0] == 0] = 0.0
    return centred


def rank_columns(values: np.ndarray) -> np.ndarray:
    """Average ranks of each column (scipy's rankdata, a few columns at a time: less scratch memory).
    Fortran order, as rankdata(axis=0) returns: the sums along columns then round the same way."""
    ranks = np.empty(values.shape, dtype=np.float64, order="F")
    step = max(1, RANK_BLOCK // max(values.shape[0], 1))
    for start in range(0, values.shape[1], step):
        ranks[:, start:start + step] = rankdata(values[:, start:start + step], axis=0)
    return ranks


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


def chunk_features(n_sentences: int, perms: Permutations) -> int:
    """Features per chunk of the statistics (CHUNK_BYTES over the dense working set of one feature)."""
    return max(1, CHUNK_BYTES // (8 * (4 * max(n_sentences, 1) + perms.n_permutations)))


def _chunk_stats(sentence: SentenceActivations, perms: Permutations, activation: str) -> dict[str, np.ndarray]:
    """Every column of STAT_COLUMNS for every feature of `sentence`, the primary statistics on `activation`."""
    labels = sentence.labels
    cols = np.arange(sentence.n_features)
    values = sentence.columns(activation, cols)
    ranks = rank_columns(values)
    part = {f"auroc_ge{t}": auroc(ranks, labels >= t) for t in THRESHOLDS}
    part.update(_label_stats(values, labels))
    del values
    unit = _unit(ranks, out=ranks)  # in place: the ranks are done with
    del ranks
    part["spearman"] = perms.y @ unit
    unit = unit.astype(np.float32)  # the float64 copy is freed before the shuffles are built
    part["p"], part["p_permutation"] = perms.p_values(unit, part["spearman"])
    del unit
    for which in ("max", "final"):
        part[f"spearman_{which}"] = part["spearman"] if which == activation else perms.spearman(
            rank_columns(sentence.columns(which, cols)))
    return part


def stats_by_chunk(groups: Iterable[tuple[np.ndarray, SentenceActivations]], perms: Permutations,
                   activation: str = "max") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(features, STAT_COLUMNS) of the fired features of each (feature ids, their sentence-level
    values) group, in order: fired features are carried across groups into chunks of
    `chunk_features` each, so every chunk, and so every float, is the same whatever the grouping."""
    ids: list[np.ndarray] = []
    parts: list[dict[str, np.ndarray]] = []
    carry_ids: list[np.ndarray] = []
    carry: list[SentenceActivations] = []
    chunk = None
    for features, sentence in groups:
        chunk = chunk or chunk_features(sentence.labels.size, perms)
        fired = sentence.fired()
        if not fired.size:
            continue
        carry_ids.append(features[fired])
        carry.append(sentence.take(fired))
        del sentence
        pending = sum(c.size for c in carry_ids)
        if pending < chunk:
            continue
        merged, merged_ids = _hstack(carry), np.concatenate(carry_ids)
        full = pending - pending % chunk
        for start in range(0, full, chunk):
            ids.append(merged_ids[start:start + chunk])
            parts.append(_chunk_stats(merged.take(np.arange(start, start + chunk)), perms, activation))
        carry_ids = [merged_ids[full:]] if full < pending else []
        carry = [merged.take(np.arange(full, pending))] if full < pending else []
    if carry:
        ids.append(np.concatenate(carry_ids))
        parts.append(_chunk_stats(_hstack(carry), perms, activation))
    if not parts:
        return np.zeros(0, np.int64), {c: np.zeros(0) for c in STAT_COLUMNS}
    return np.concatenate(ids), {c: np.concatenate([p[c] for p in parts]) for c in STAT_COLUMNS}


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
