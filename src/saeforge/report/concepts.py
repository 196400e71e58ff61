"""Render the concept-discovery report: one self-contained HTML page with inline SVG, no script.

Input is the `top_features.json` data of discover/analyze.py (a plain dict; nothing is read here).
Every string (sentences, fragments, SAE names, links) passes through `html.escape`, and a
Content-Security-Policy blocks every script and every network load, so the page is safe to open
whatever the sentences hold. Plots: a layer × L0 heatmap of the best |ρ| per SAE, and for each top
feature a per-label strip plot with a box (quartiles, median) of its sentence-level activation.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from saeforge.atomic import atomic_write_text

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
MAX_POINTS = 300
"""Points drawn per label in a strip plot (evenly subsampled beyond that)."""
MAX_L0_COLUMNS = 12
"""Beyond this many distinct L0 values the heatmap's columns are each layer's L0s in rising order."""

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
th{background:#f4f4f4}.feature{border:1px solid #ccc;border-radius:6px;padding:12px;margin:16px 0}
.row{display:flex;gap:24px;flex-wrap:wrap}.muted{color:#777}code{background:#f4f4f4;padding:2px 4px}
"""


def esc(value: Any) -> str:
    """Any value as HTML text (quotes escaped too, so it is safe in attributes)."""
    return html.escape("" if value is None else str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def _color(strength: float) -> str:
    """White to dark red for |ρ| in [0, 1]."""
    s = min(max(strength, 0.0), 1.0)
    return f"rgb({255 - int(80 * s)},{255 - int(220 * s)},{255 - int(220 * s)})"


def heatmap_svg(cells: list[dict[str, Any]]) -> str:
    """Layer (rows) × L0 (columns) heatmap of the best |ρ|, each cell labelled with its value."""
    if not cells:
        return "<p class='muted'>No SAE had a feature that fired.</p>"
    layers = sorted({int(c["layer"]) for c in cells})

    def l0_key(v: Any) -> tuple[float, str]:
        try:
            return float(v), str(v)
        except (TypeError, ValueError):
            return math.inf, str(v)

    distinct = sorted({str(c["l0"]) for c in cells}, key=l0_key)
    by_rank = len(distinct) > MAX_L0_COLUMNS
    position: dict[tuple[int, str], int] = {}
    for layer in layers:
        l0s = sorted({str(c["l0"]) for c in cells if int(c["layer"]) == layer}, key=l0_key)
        for i, l0 in enumerate(l0s):
            position[(layer, l0)] = i if by_rank else distinct.index(l0)
    n_cols = max(position.values()) + 1
    cw, ch, left, top = 64, 26, 70, 40
    width, height = left + cw * n_cols + 10, top + ch * len(layers) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">',
             f'<text x="{left}" y="14">{"L0 (rising within each layer)" if by_rank else "L0"}</text>']
    if not by_rank:
        for j, l0 in enumerate(distinct):
            parts.append(f'<text x="{left + j * cw + cw / 2}" y="{top - 6}" text-anchor="middle">{esc(l0)}</text>')
    for i, layer in enumerate(layers):
        parts.append(f'<text x="{left - 6}" y="{top + i * ch + ch / 2 + 4}" text-anchor="end">layer {layer}</text>')
    for c in cells:
        layer, l0 = int(c["layer"]), str(c["l0"])
        x, y = left + position[(layer, l0)] * cw, top + layers.index(layer) * ch
        rho = abs(float(c.get("spearman") or 0.0))
        tip = f"{c['sae']} feature {c['feature']}: ρ={_fmt(c.get('spearman'))}, q={_fmt(c.get('q'))}"
        label = f"{rho:.2f}" if not by_rank else f"{rho:.2f}·{l0}"
        parts.append(f'<g><title>{esc(tip)}</title><rect x="{x}" y="{y}" width="{cw - 2}" height="{ch - 2}" '
                     f'fill="{_color(rho)}"/><text x="{x + cw / 2 - 1}" y="{y + ch / 2 + 3}" '
                     f'text-anchor="middle">{esc(label)}</text></g>')
    parts.append("</svg>")
    return "".join(parts)


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return at(0.25), at(0.5), at(0.75)


def strip_svg(per_label: dict[str, list[float]]) -> str:
    """Per-label strip plot (deterministic jitter) with a box of quartiles and the median."""
    values = [v for vs in per_label.values() for v in vs]
    top_value = max(values, default=0.0) or 1.0
    w, h, left, bottom, col = 300, 180, 40, 24, 64
    plot_h = h - bottom - 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-size="10">',
             f'<line x1="{left}" y1="10" x2="{left}" y2="{10 + plot_h}" stroke="#999"/>',
             f'<text x="{left - 4}" y="14" text-anchor="end">{esc(_fmt(top_value, 2))}</text>',
             f'<text x="{left - 4}" y="{10 + plot_h}" text-anchor="end">0</text>']

    def y_of(v: float) -> float:
        return 10 + plot_h * (1 - v / top_value)

    for k, label in enumerate(sorted(per_label, key=int)):
        vs = per_label[label]
        cx = left + 20 + k * col + col / 2 - 10
        parts.append(f'<text x="{cx}" y="{h - 6}" text-anchor="middle">label {esc(label)} (n={len(vs)})</text>')
        if not vs:
            continue
        q1, med, q3 = _quartiles(vs)
        parts.append(f'<rect x="{cx - 18}" y="{y_of(q3)}" width="36" height="{max(y_of(q1) - y_of(q3), 1)}" '
                     f'fill="#dde8f6" stroke="#5b7fb0"/><line x1="{cx - 18}" y1="{y_of(med)}" x2="{cx + 18}" '
                     f'y2="{y_of(med)}" stroke="#1f3f73" stroke-width="2"/>')
        step = max(1, math.ceil(len(vs) / MAX_POINTS))
        for i, v in enumerate(vs[::step]):
            jitter = ((i * 37) % 23 - 11) * 1.2
            parts.append(f'<circle cx="{cx + jitter:.1f}" cy="{y_of(v):.1f}" r="1.8" fill="#c0392b" fill-opacity="0.5"/>')
    parts.append("</svg>")
    return "".join(parts)


def _examples_table(rows: list[dict[str, Any]], text_key: str) -> str:
    if not rows:
        return "<p class='muted'>none fired</p>"
    body = "".join(f"<tr><td>{esc(_fmt(r.get('activation')))}</td><td>{esc(r.get('label'))}</td>"
                   f"<td>{esc(r.get(text_key))}</td></tr>" for r in rows)
    return f"<table><tr><th>act</th><th>label</th><th>{esc(text_key)}</th></tr>{body}</table>"


def _feature_section(rank: int, f: dict[str, Any]) -> str:
    url = f.get("neuronpedia_url") or ""
    link = f' · <a href="{esc(url)}">Neuronpedia</a>' if url.startswith("https://www.neuronpedia.org/") else ""
    stats = " · ".join(f"{name} {esc(_fmt(f.get(key)))}" for name, key in (
        ("ρ", "spearman"), ("ρ final", "spearman_final"), ("AUROC≥1", "auroc_ge1"), ("AUROC≥2", "auroc_ge2"),
        ("AUROC≥3", "auroc_ge3"), ("selectivity", "selectivity"), ("rate ratio", "firing_rate_ratio"),
        ("monotonic", "monotonic"), ("p", "p"), ("q", "q")))
    return (f'<div class="feature"><h3>#{rank} {esc(f.get("sae"))} (layer {esc(f.get("layer"))}, L0 {esc(f.get("l0"))})'
            f' feature {esc(f.get("feature"))}{link}</h3><p>{stats}</p><div class="row">'
            f'<div>{strip_svg(f.get("per_label") or {})}</div>'
            f'<div><h4>Top sentences</h4>{_examples_table(f.get("top_sentences") or [], "sentence")}</div>'
            f'<div><h4>Top fragments</h4>{_examples_table(f.get("top_fragments") or [], "fragment")}</div></div></div>')


def render_concepts_report(data: dict[str, Any], title: str = "Concept discovery") -> str:
    """The whole page as one string."""
    counts = ", ".join(f"label {esc(k)}: {esc(v)}" for k, v in (data.get("label_counts") or {}).items())
    settings = data.get("settings") or {}
    commands = "".join(f"<li>{esc(c.get('sae'))}: <code>{esc(c.get('command'))}</code></li>"
                       for c in data.get("interpret_commands") or [])
    features = "".join(_feature_section(i + 1, f) for i, f in enumerate(data.get("top_features") or []))
    return (f'<!doctype html><html><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"><title>{esc(title)}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{esc(title)}</h1>"
            f"<p>{esc(data.get('n_sentences'))} sentences ({counts}); {esc(data.get('n_saes'))} SAEs, "
            f"{esc(data.get('n_features_tested'))} features tested, {esc(data.get('n_fired'))} fired, "
            f"{esc(data.get('n_significant'))} at q &lt; {esc(settings.get('fdr_alpha'))} "
            f"({esc(settings.get('n_permutations'))} permutations, Benjamini–Hochberg over all features × SAEs; "
            f"sentence activation: {esc(settings.get('activation'))}).</p>"
            f"<h2>Best |ρ| per SAE</h2>{heatmap_svg(data.get('heatmap') or [])}"
            f"<h2>Interpret the top features</h2><ul>{commands or '<li>no feature at q below the level</li>'}</ul>"
            f"<h2>Top features</h2>{features}</body></html>")


def write_concepts_report(path: Path, data: dict[str, Any], title: str = "Concept discovery") -> Path:
    """Write the report atomically and return its path."""
    atomic_write_text(path, render_concepts_report(data, title))
    return Path(path)
