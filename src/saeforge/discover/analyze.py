"""Rank every feature of every SAE against the concept label: ranking.csv, top_features.json, the report.

Files are streamed, one group of features at a time (first pass: statistics of the fired features;
second pass: examples of the top features, only for the SAEs that hold them), so memory grows with
neither the sentences nor the SAEs' width. Benjamini–Hochberg runs over all
features × SAEs, the never-firing features counted with p = 1.
"""

from __future__ import annotations

import ctypes
import logging
import math
import shlex
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from saeforge.config.schema import ConceptAnalysisConfig
from saeforge.discover.concepts import read_concepts
from saeforge.discover.files import (RANKING_COLUMNS, ActivationFile, activation_files, open_activations,
                                     read_configurations, report_path, write_ranking, write_top_features)
from saeforge.discover.stats import (LABELS, STAT_COLUMNS, Permutations, SentenceLayout, benjamini_hochberg,
                                     feature_groups, group_activations, sentence_layout, stats_by_chunk,
                                     top_fragments)
from saeforge.report.concepts import write_concepts_report

log = logging.getLogger(__name__)
NEURONPEDIA = "https://www.neuronpedia.org/{id}/{feature}"
W_AND_B_ROWS = 1000
"""Rows of the ranking logged to W&B (best first)."""
MMAP_THRESHOLD = 2 << 20
"""Arrays at least this big get their own memory map (glibc), freed to the system when dropped."""


def _return_freed_memory() -> None:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD for this process (no-op without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # <malloc.h> M_MMAP_THRESHOLD
    libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)


def neuronpedia_url(neuronpedia_id: str | None, feature: int) -> str:
    """The feature's Neuronpedia page, or "" when the SAE has no known Neuronpedia id."""
    return NEURONPEDIA.format(id=neuronpedia_id.strip("/"), feature=feature) if neuronpedia_id else ""


def _csv_labels(path: Path, sentences: np.ndarray) -> np.ndarray:
    """Labels of the CSV at `path` (checked by read_concepts) for the extracted sentences, in their order."""
    concepts = read_concepts(path)
    if len(concepts.sentences) != sentences.size:
        raise ValueError(f"{path}: {len(concepts.sentences)} sentences, but the activation files hold {sentences.size}")
    for i, (mine, extracted) in enumerate(zip(concepts.sentences, sentences)):
        if mine != str(extracted):
            raise ValueError(f"{path}: sentence {i + 1} differs from the extracted one ({str(extracted)[:60]!r})")
    return np.asarray(concepts.labels, dtype=np.int64)


def _sae_info(layer: int, l0: str, path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Name, Neuronpedia id and local SAE of one file, from its configurations.json entry (if any).

    The name is the entry's name, else its source when that is a registry or hub id, else the file stem."""
    source = str(meta.get("source") or "")
    name = meta.get("name") or (source if source and not Path(source).exists() else "")
    return {"sae": str(name or path.name.removesuffix("_activations.npz")), "layer": layer,
            "l0": meta.get("l0", l0), "neuronpedia_id": meta.get("neuronpedia_id"),
            "ckpt": meta.get("local"), "hookpoint": meta.get("hookpoint"), "file": path.name}


def _number(value: float) -> float | None:
    """Six significant digits (a p of 4e-9 stays 4e-09, not 0.0); NaN → None."""
    value = float(value)
    return None if math.isnan(value) else float(f"{value:.6g}")


def _rows(info: dict[str, Any], features: np.ndarray, stats: dict[str, np.ndarray], q: np.ndarray) -> list[dict]:
    rows = []
    for i, feature in enumerate(features.tolist()):
        row = {"sae": info["sae"], "layer": info["layer"], "l0": info["l0"], "feature": feature}
        for column in STAT_COLUMNS:
            value = stats[column][i]
            row[column] = bool(value) if column == "monotonic" else _number(value)
        row["q"] = _number(q[i])
        row["neuronpedia_url"] = neuronpedia_url(info["neuronpedia_id"], feature)
        rows.append({c: row[c] for c in RANKING_COLUMNS} | {c: row[c] for c in row if c not in RANKING_COLUMNS})
    return rows


def _examples(acts: ActivationFile, layout: SentenceLayout, features: np.ndarray, which: str, n: int) -> dict[int, dict]:
    """Per feature: its sentence-level values by label, its top sentences and its top fragments (labels: `layout.labels`)."""
    sentence = group_activations(acts, layout, features)
    fragments = top_fragments(acts, layout, features, n)
    values = [sentence.columns(which, np.asarray([j]))[:, 0] for j in range(features.size)]
    orders = [np.argsort(-v, kind="stable")[:n] for v in values]
    sentence_rows = np.unique(np.concatenate([layout.first[o[v[o] > 0]] for o, v in zip(orders, values)] + [np.zeros(0, np.int64)]))
    fragment_rows = np.unique(np.concatenate([rows for rows, _ in fragments] + [np.zeros(0, np.int64)]))
    text = dict(zip(sentence_rows.tolist(), acts.rows("original_sentences", sentence_rows).tolist()))
    fields = {name: dict(zip(fragment_rows.tolist(), acts.rows(name, fragment_rows).tolist()))
              for name in ("fragments", "original_sentences", "token_positions")}
    out = {}
    for j, feature in enumerate(features.tolist()):
        v, order = values[j], orders[j]
        out[feature] = {
            "per_label": {str(k): [round(float(x), 5) for x in v[layout.labels == k]] for k in LABELS},
            "top_sentences": [{"sentence": str(text[int(layout.first[i])]), "label": int(layout.labels[i]),
                               "activation": round(float(v[i]), 5)} for i in order if v[i] > 0],
            "top_fragments": [{"fragment": str(fields["fragments"][i]), "sentence": str(fields["original_sentences"][i]),
                               "label": int(layout.labels[layout.sentence[i]]),
                               "token_position": int(fields["token_positions"][i]), "activation": round(float(value), 5)}
                              for i, value in zip(fragments[j][0].tolist(), fragments[j][1].tolist())],
        }
    return out


def interpret_command(info: dict[str, Any], features: list[int]) -> str:
    """The `python interpret.py` command that interprets `features` of one SAE."""
    ckpt = info.get("ckpt") or f"<path of SAE {info['sae']}>"
    args = ["python", "interpret.py", f"ckpt={ckpt}", f"interpret.features=[{','.join(map(str, features))}]"]
    return " ".join(shlex.quote(a) if not a.startswith("ckpt=<") else f"'{a}'" for a in args)


def analyze_concepts(activations_dir: Path, out_dir: Path, settings: ConceptAnalysisConfig,
                     concepts_csv: Path | None = None, logger: Any = None) -> Path:
    """Rank the features of every configuration file in `activations_dir`; write ranking.csv,
    top_features.json and the HTML report to `out_dir`; return the ranking.csv path."""
    activations_dir, out_dir = Path(activations_dir), Path(out_dir)
    _return_freed_memory()
    files = activation_files(activations_dir)
    if not files:
        raise FileNotFoundError(f"{activations_dir}: no layer_*_l0_*_activations.npz files to analyse")
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved = read_configurations(activations_dir) or {"configurations": []}
    configurations = {c["file"]: c for c in resolved["configurations"] if isinstance(c, dict) and "file" in c}
    perms: Permutations | None = None
    results: list[tuple[dict[str, Any], np.ndarray, dict[str, np.ndarray]]] = []
    n_tests = 0
    for layer, l0, path in tqdm(files, desc="analyse SAEs", unit="sae"):
        with open_activations(path) as acts:  # streamed: one group of features in memory at a time
            layout = sentence_layout(acts, str(path), settings.skip_first_tokens)
            if concepts_csv is not None:
                layout.labels = _csv_labels(Path(concepts_csv), acts.rows("original_sentences", layout.first))
            if perms is None:
                perms = Permutations(layout.labels, settings.n_permutations, settings.seed)
                if np.unique(layout.labels).size < 2:
                    raise ValueError(f"{path}: the sentences need at least two distinct labels")
            elif layout.labels.size != perms.labels.size or np.any(layout.labels != perms.labels):
                raise ValueError(f"{path}: its sentences or labels differ from {files[0][2].name}'s")
            groups = ((features, group_activations(acts, layout, features)) for features in feature_groups(acts, layout))
            fired, stats = stats_by_chunk(groups, perms, settings.activation)
            results.append((_sae_info(layer, l0, path, configurations.get(path.name, {})), fired, stats))
            n_tests += int(acts.num_features)
    q_all = benjamini_hochberg(np.concatenate([s["p"] for _, _, s in results]), n_tests)
    rows: list[dict] = []
    offset = 0
    for info, fired, stats in results:
        rows += _rows(info, fired, stats, q_all[offset:offset + fired.size])
        offset += fired.size
    rows.sort(key=lambda r: (r["q"], r["p"], -abs(r["spearman"] or 0.0), r["layer"], str(r["l0"]), r["feature"]))
    ranking = write_ranking(out_dir, rows)
    significant = sum(1 for r in rows if r["q"] < settings.fdr_alpha)
    log.info("%d features × %d SAEs tested; %d fired; %d at q < %g; ranking: %s", n_tests // max(len(files), 1),
             len(files), len(rows), significant, settings.fdr_alpha, ranking)

    infos = {info["file"]: info for info, _, _ in results}
    file_of = {info["sae"]: info["file"] for info in infos.values()}
    top = rows[:settings.top_features]
    wanted: dict[str, list[dict]] = {}
    for row in top:
        wanted.setdefault(file_of[row["sae"]], []).append(row)
    details: dict[tuple[str, int], dict] = {}
    for file, file_rows in tqdm(wanted.items(), desc="top-feature examples", unit="sae"):
        with open_activations(activations_dir / file) as acts:
            layout = sentence_layout(acts, file, settings.skip_first_tokens)
            layout.labels = perms.labels  # the labels ranked against (the CSV's, when given)
            examples = _examples(acts, layout, np.unique([row["feature"] for row in file_rows]), settings.activation,
                                 settings.examples_per_feature)
        for row in file_rows:
            details[(row["sae"], row["feature"])] = examples[row["feature"]]
    commands = []
    for info in infos.values():
        features = [r["feature"] for r in rows if r["sae"] == info["sae"] and r["q"] < settings.fdr_alpha]
        if features:
            commands.append({"sae": info["sae"], "command": interpret_command(info, features[:settings.interpret_features])})
    best = {}
    for row in rows:
        key = (row["layer"], str(row["l0"]))
        if key not in best or abs(row["spearman"] or 0.0) > abs(best[key]["spearman"] or 0.0):
            best[key] = row
    data = {
        "n_sentences": int(perms.labels.size) if perms is not None else 0,
        "label_counts": {str(k): int(np.sum(perms.labels == k)) for k in LABELS} if perms is not None else {},
        "n_saes": len(files), "n_features_tested": n_tests, "n_fired": len(rows), "n_significant": significant,
        "settings": {"n_permutations": settings.n_permutations, "fdr_alpha": settings.fdr_alpha,
                     "activation": settings.activation, "seed": settings.seed},
        "heatmap": [{"layer": r["layer"], "l0": r["l0"], "sae": r["sae"], "feature": r["feature"],
                     "spearman": r["spearman"], "q": r["q"]} for r in best.values()],
        "top_features": [row | details.get((row["sae"], row["feature"]), {}) for row in top],
        "interpret_commands": commands,
    }
    write_top_features(out_dir, data)
    report = write_concepts_report(report_path(out_dir), data)
    for entry in commands[:3]:
        log.info("interpret %s: %s", entry["sae"], entry["command"])
    log.info("report: %s", report)
    if logger is not None and hasattr(logger, "log_table"):
        columns = list(rows[0]) if rows else list(RANKING_COLUMNS)
        logger.log_table("discover/ranking", columns=columns,
                         data=[[r.get(c) for c in columns] for r in rows[:W_AND_B_ROWS]])
    return ranking
