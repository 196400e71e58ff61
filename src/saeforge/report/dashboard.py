"""Render one self-contained ``dashboard.html`` from an interpret directory.

The interpret stages write their outputs under ``interpret/<hookpoint>/`` (see docs/architecture.md); they
are read here only through ``saeforge.interpret.records`` (``load_records``, ``read_summary``).
Any of them may be missing; the dashboard shows what exists.

Safety: every string from the corpus or a model is data, never markup. The data goes into the
page as JSON inside ``<script type="application/json">`` with ``<``, ``>``, ``&``, U+2028 and
U+2029 written as ``\\u003c`` etc. (so no string can close the script element), and the page
script renders it with ``textContent`` / ``createTextNode`` only. A Content-Security-Policy with
the hash of the page's own script blocks any other script and all network access.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import re
from importlib import resources
from pathlib import Path
from typing import Any

from saeforge.atomic import atomic_write_text
from saeforge.interpret import records as records_io

log = logging.getLogger(__name__)

DATA_PLACEHOLDER = "__SAEFORGE_DATA__"
"""Where the template receives the JSON blob."""

CSP_HASH_PLACEHOLDER = "__SAEFORGE_SCRIPT_HASH__"
"""Where the template receives the CSP hash of its own app script (computed, not data)."""

_APP_SCRIPT_RE = re.compile(r'<script id="saeforge-app">(.*?)</script>', re.DOTALL)

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_JSON_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")

ACT_DECIMALS = 4
"""Per-token activations are rounded to this many decimals in the page (keeps 16k features small)."""


# --------------------------------------------------------------------------------------- loading


def _float_or_none(text: Any) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def load_interpret_outputs(interpret_dir: Path) -> dict[str, Any]:
    """Collect everything the interpret stages wrote for one hookpoint (through `records`).

    Returns a dict with keys ``hookpoint``, ``layer``, ``d_sae``, ``n_tokens`` (from the max-act
    header, or None) and per-feature maps keyed by int feature id: ``maxact``, ``logit_lens``,
    ``explanations``, ``summary``, ``steering``, ``steering_effects``; plus ``scores``:
    ``{scorer: {feature: {field: value}}}``. Missing or unreadable files give empty maps.
    """
    interpret_dir = Path(interpret_dir)
    recs = records_io.load_records(interpret_dir)
    feats = recs.features
    scores: dict[str, dict[int, Any]] = {}
    for f in recs.ids():
        for scorer, result in feats[f].scores.items():
            scores.setdefault(scorer, {})[f] = result
    return {
        "hookpoint": recs.hookpoint or interpret_dir.name,
        "layer": recs.layer,
        "d_sae": recs.d_sae,
        "n_tokens": recs.n_tokens,
        "maxact": {f: feats[f].maxact_entry() for f in recs.with_maxact()},
        "logit_lens": {f: feats[f].logit_lens.to_json() for f in recs.ids() if feats[f].logit_lens is not None},
        "explanations": {f: feats[f].explanation.to_json(f) for f in recs.ids() if feats[f].explanation is not None},
        "scores": {name: scores[name] for name in sorted(scores)},
        "summary": records_io.summary_by_feature(records_io.read_summary(interpret_dir, strict=False), recs.layer),
        "steering": {f: feats[f].steering.texts for f in recs.ids()
                     if feats[f].steering is not None and feats[f].steering.texts},
        "steering_effects": {f: feats[f].steering.effects_entry() for f in recs.ids()
                             if feats[f].steering is not None and feats[f].steering.measured},
        "not_applicable": {stage: str(entry[records_io.NOT_APPLICABLE])
                           for stage, entry in records_io.read_stages(interpret_dir).items()
                           if isinstance(entry, dict) and entry.get(records_io.NOT_APPLICABLE)},
    }


# ------------------------------------------------------------------------------ page data model


def headline_field(scorer: str, fields: dict[str, Any]) -> str | None:
    """The field shown for a scorer in the feature list: ``auc`` for embedding scorers,
    ``balanced_accuracy`` otherwise, falling back to the other, then ``f1``, then the first
    numeric field."""
    order = ["auc", "balanced_accuracy"] if "embedding" in scorer.lower() else ["balanced_accuracy", "auc"]
    for name in [*order, "f1", "accuracy"]:
        if _float_or_none(fields.get(name)) is not None:
            return name
    for name, value in fields.items():
        if not isinstance(value, bool) and _float_or_none(value) is not None:
            return name
    return None


def _clean(value: Any) -> Any:
    """JSON-safe copy: non-finite floats become None, keys become strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _num(value: Any, decimals: int | None = None) -> float | int | None:
    """A finite number (optionally rounded), or None."""
    if type(value) is float:  # the common case, kept fast for millions of per-token values
        if not math.isfinite(value):
            return None
        return round(value, decimals) if decimals is not None else value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    number = _float_or_none(value)
    if number is None:
        return None
    return round(number, decimals) if decimals is not None else number


def _example(raw: Any) -> dict[str, Any] | None:
    """One context window for the page: tokens, per-token activations, the max position."""
    if not isinstance(raw, dict):
        return None
    tokens = [str(t) for t in raw.get("tokens") or []]
    acts = [_num(a, ACT_DECIMALS) or 0.0 for a in raw.get("acts") or []]  # None -> 0.0
    acts = (acts + [0.0] * len(tokens))[: len(tokens)]
    max_pos = raw.get("max_pos")
    if not isinstance(max_pos, int) or not 0 <= max_pos < len(tokens):
        max_pos = max(range(len(acts)), key=acts.__getitem__) if acts else 0
    ex = {"activation": _num(raw.get("activation")), "tokens": tokens, "acts": acts, "max_pos": max_pos}
    for key in ("bucket", "seq", "start"):
        if key in raw:
            ex[key] = _clean(raw[key])
    return ex


def _pairs(raw: Any) -> list[list[Any]]:
    """``[[token, value], ...]`` with string tokens and finite values."""
    out = []
    for item in raw or []:
        if isinstance(item, (list, tuple)) and len(item) >= 2:
            out.append([str(item[0]) if not isinstance(item[0], int) else item[0], _num(item[1])])
    return out


def _lens_type(raw: dict[str, Any]) -> dict[str, Any]:
    """One LoRA adapter type's lens: defined (top/bottom pairs) or its "not defined" note, and the norm."""
    out: dict[str, Any] = {"defined": bool(raw.get("defined")), "norm": _num(raw.get("norm"))}
    for key in ("top", "bottom"):
        if raw.get(key):
            out[key] = _pairs(raw[key])
    if raw.get("note"):
        out["note"] = str(raw["note"])
    return out


def _steering_rows(prompts: dict[str, dict[str, str]]) -> list[dict[str, Any]]:
    """Per prompt, outputs ordered original first, then by strength."""

    def order(key: str) -> tuple[int, float, str]:
        number = _float_or_none(key)
        return (0, 0.0, key) if number is None else (1, number, key)

    return [
        {"prompt": prompt, "outputs": [[k, by_strength[k]] for k in sorted(by_strength, key=order)]}
        for prompt, by_strength in prompts.items()
    ]


def build_dashboard_data(outputs: dict[str, Any], title: str | None = None) -> dict[str, Any]:
    """The JSON the page reads: ``meta`` plus one entry per feature, sorted by feature id."""
    maxact, lens = outputs["maxact"], outputs["logit_lens"]
    expl, scores = outputs["explanations"], outputs["scores"]
    summary, steering = outputs["summary"], outputs["steering"]
    effects = outputs.get("steering_effects", {})
    ids = set(maxact) | set(lens) | set(expl) | set(summary) | set(steering)
    for per_feature in scores.values():
        ids |= set(per_feature)

    labels: dict[int, str] = {}
    features = []
    for fid in sorted(ids):
        m = maxact.get(fid) if isinstance(maxact.get(fid), dict) else {}
        e = expl.get(fid) if isinstance(expl.get(fid), dict) else {}
        s = summary.get(fid, {})
        label = e.get("label") or s.get("label") or ""
        labels[fid] = str(label)
        entry: dict[str, Any] = {"id": fid, "label": str(label)}
        if e:
            entry["interpretation"] = str(e.get("interpretation") or "")
            entry["status"] = str(e.get("status") or "")
        for key, name in (("frequency", "frequency"), ("a_max", "a_max"), ("n_fired", "n_fired")):
            if _num(m.get(name)) is not None:
                entry[key] = _num(m.get(name))
        if m.get("quantiles"):
            entry["quantiles"] = [_num(q, ACT_DECIMALS) for q in m["quantiles"]]
        hist = m.get("histogram")
        if isinstance(hist, dict) and hist.get("counts"):
            entry["histogram"] = {"edges": [_num(x) for x in hist.get("edges") or []],
                                  "counts": [_num(x) for x in hist["counts"]]}
        for key in ("top", "quantile_examples"):
            examples = [ex for ex in map(_example, m.get(key) or []) if ex is not None]
            if examples:
                entry[key] = examples
        fl = lens.get(fid)
        if isinstance(fl, dict):
            entry["lens"] = {k: _pairs(fl.get(k)) for k in ("top", "bottom", "neighbours") if fl.get(k)}
            if isinstance(fl.get("by_type"), dict):
                entry["lens"]["by_type"] = {str(t): _lens_type(v) for t, v in fl["by_type"].items() if isinstance(v, dict)}
            if isinstance(fl.get("layout"), dict):
                entry["layout"] = _clean(fl["layout"])
        feature_scores = {name: _clean(per[fid]) for name, per in scores.items()
                          if isinstance(per.get(fid), dict)}
        if feature_scores:
            entry["scores"] = feature_scores
            entry["headline"] = {}
            for name, fields in feature_scores.items():
                field = headline_field(name, fields)
                if field is not None:
                    entry["headline"][name] = [field, _num(fields[field])]
        # the steering stage's effects file is the source; the summary (written by score) copies it
        effect_row = effects.get(fid) if isinstance(effects.get(fid), dict) else s
        for key in ("steering_effect", "steering_kl"):
            value = _num(effect_row.get(key)) if effect_row else None
            if value is not None:
                entry[key] = value
        if s:
            entry["summary"] = {k: v for k, v in s.items() if k is not None and v not in (None, "")}
        if fid in steering:
            entry["steering"] = _steering_rows(steering[fid])
        features.append(entry)

    # "with full examples": as many top examples as the most any feature has (interpret.maxact.n_examples
    # unless no feature fired in that many windows)
    n_full = max((len(e.get("top") or []) for e in features), default=0)
    for entry in features:
        entry["full"] = n_full > 0 and len(entry.get("top") or []) >= n_full

    # label the neighbours so the page can show them without looking features up by id
    for entry in features:
        neighbours = entry.get("lens", {}).get("neighbours")
        if neighbours:
            entry["lens"]["neighbours"] = [[n[0], n[1], labels.get(n[0], "")] for n in neighbours]

    hookpoint = outputs.get("hookpoint") or ""
    return {
        "meta": {
            "title": title or f"saeforge · {hookpoint}",
            "hookpoint": hookpoint,
            "layer": _clean(outputs.get("layer")),
            "d_sae": _clean(outputs.get("d_sae")),
            "n_tokens": _clean(outputs.get("n_tokens")),
            "scorers": sorted(scores),
            "n_features": len(features),
            "n_full_examples": n_full,
            "not_applicable": _clean(outputs.get("not_applicable") or {}),
        },
        "features": features,
    }


# ------------------------------------------------------------------------------------ rendering


def dumps_for_script(data: Any) -> str:
    """JSON that is safe inside ``<script type="application/json">``.

    ``<``, ``>`` and ``&`` only ever occur inside JSON strings, where ``\\u003c`` etc. mean the
    same characters, so no string can end the script element or open a comment; U+2028/2029
    are escaped for old JavaScript parsers.
    """
    try:
        text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError):  # NaN/inf or odd types: clean a copy (slower, rarely needed)
        text = json.dumps(_clean(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _JSON_ESCAPE_RE.sub(lambda m: _JSON_ESCAPES[m.group(0)], text)


def _template() -> str:
    text = resources.files("saeforge.report").joinpath("templates/dashboard.html").read_text("utf-8")
    return text.replace("\r\n", "\n")  # the browser hashes the script with LF line ends


def render_dashboard(data: dict[str, Any]) -> str:
    """The page for ``data`` (from :func:`build_dashboard_data`) as one HTML string."""
    template = _template()
    match = _APP_SCRIPT_RE.search(template)
    if match is None:
        raise RuntimeError("dashboard template lacks <script id=\"saeforge-app\">")
    digest = base64.b64encode(hashlib.sha256(match.group(1).encode("utf-8")).digest()).decode()
    head, sep, tail = template.partition(DATA_PLACEHOLDER)
    if not sep:
        raise RuntimeError(f"dashboard template lacks {DATA_PLACEHOLDER}")
    head = head.replace(CSP_HASH_PLACEHOLDER, f"sha256-{digest}")
    return head + dumps_for_script(data) + tail


def write_dashboard(interpret_dir: Path, out_path: Path | None = None, title: str | None = None) -> Path:
    """Write ``dashboard.html`` for one interpret directory and return its path.

    The file is written to a temporary name beside ``out_path`` and renamed, so a reader never
    sees half a page. Default ``out_path``: ``interpret_dir / "dashboard.html"``.
    """
    interpret_dir = Path(interpret_dir)
    out_path = Path(out_path) if out_path is not None else interpret_dir / "dashboard.html"
    data = build_dashboard_data(load_interpret_outputs(interpret_dir), title)
    html = render_dashboard(data)
    atomic_write_text(out_path, html)
    log.info("dashboard: wrote %s (%d features, %.1f MB)", out_path,
             len(data["features"]), len(html.encode("utf-8")) / 1e6)
    return out_path


def main(argv: list[str] | None = None) -> None:
    """``python -m saeforge.report.dashboard interpret/<hookpoint> [-o out.html] [--title T]``."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("interpret_dir", type=Path, help="an interpret/<hookpoint>/ directory")
    parser.add_argument("-o", "--out", type=Path, default=None, help="default: <interpret_dir>/dashboard.html")
    parser.add_argument("--title", default=None, help="page title")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(write_dashboard(args.interpret_dir, args.out, args.title))


if __name__ == "__main__":
    main()
