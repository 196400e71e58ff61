"""The dashboard of a LoRA SAE in a real Chromium: layout heatmap, per-type lens, "with full examples",
and stages shown as not applicable."""

from __future__ import annotations

import json
from pathlib import Path

from saeforge.report.dashboard import build_dashboard_data, load_interpret_outputs, write_dashboard
from tests.report.test_dashboard import _example, assert_clean, open_dashboard

TYPES = ["q", "k", "v", "o", "gate", "up", "down"]


def write_lora_dir(root: Path) -> Path:
    d = root / "interpret" / "lora"
    d.mkdir(parents=True)
    tokens = ["The", " cat", " sat", " on", " the", " mat"]
    features = {str(f): {"feature": f, "frequency": 0.01, "a_max": 2.0, "n_fired": 10,
                         "top": [_example(f, r, tokens, 2.0 - r / 10) for r in range(5 if f % 2 == 0 else 2)]}
                for f in range(6)}
    (d / "maxact.json").write_text(json.dumps({"hookpoint": "lora", "layer": "lora", "d_sae": 6, "features": features}))
    lens = {}
    for f in range(6):
        norms = [[0.0] * 7 for _ in range(2)]
        norms[1][6] = 3.0  # all of it in layer 1's down_proj, except a little q in layer 0
        norms[0][0] = 1.0
        by_type = {t: {"defined": False, "norm": 0.5, "note": f"not defined: the {t}_proj output does not enter the residual stream directly"}
                   for t in TYPES if t not in ("o", "down")}
        by_type["o"] = {"defined": True, "norm": 0.1, "top": [[" dog", 0.3]], "bottom": [[" cat", -0.2]]}
        by_type["down"] = {"defined": True, "norm": 2.0, "top": [[" mat", 1.5]], "bottom": [[" sat", -1.1]]}
        lens[str(f)] = {"top": [[" mat", 1.6]], "bottom": [[" sat", -1.2]], "neighbours": [[(f + 1) % 6, 0.4]],
                        "by_type": by_type, "layout": {"layers": [0, 1], "types": TYPES, "norms": norms,
                                                       "share": {**dict.fromkeys(TYPES, 0.0), "q": 0.1, "down": 0.9}}}
    (d / "logit_lens.json").write_text(json.dumps({"features": lens}))
    (d / "stages.json").write_text(json.dumps({
        "maxact": {"fingerprint": "a"}, "logit_lens": {"fingerprint": "b"},
        "steering": {"fingerprint": "c", "not_applicable": "the SAE's adapter folder is gone"}}))
    return d


def test_lora_dashboard_data(tmp_path):
    data = build_dashboard_data(load_interpret_outputs(write_lora_dir(tmp_path)))
    assert data["meta"]["not_applicable"] == {"steering": "the SAE's adapter folder is gone"}
    assert data["meta"]["n_full_examples"] == 5
    assert [f["full"] for f in data["features"]] == [True, False] * 3
    assert data["features"][0]["layout"]["norms"][1][6] == 3.0
    assert data["features"][0]["lens"]["by_type"]["q"]["defined"] is False


def test_layout_heatmap_lens_by_type_and_full_filter(chromium, tmp_path):
    page = open_dashboard(chromium, write_dashboard(write_lora_dir(tmp_path)), "#feature=2")
    page.wait_for("document.querySelector('#feature-detail')?.dataset.feature === '2'")
    text = page.evaluate("document.getElementById('detail').innerText")
    assert "LORA LAYOUT" in text.upper() and "down 90.0%" in text and "q 10.0%" in text
    cells = page.evaluate("""[...document.querySelectorAll('#layout-heatmap td.c')].map(
        c => [c.title, getComputedStyle(c).backgroundColor])""")
    assert len(cells) == 2 * 7
    alpha = {title: float(color.split(",")[3].rstrip(")")) if color.startswith("rgba") else 1.0 for title, color in cells}
    assert alpha["layer 1 · down: 3.0000"] > 0.99 and alpha["layer 0 · q: 1.0000"] < 0.5
    assert alpha["layer 0 · k: 0.0000"] < 0.1
    assert "not defined: the q_proj output" in text and " mat" in text
    banner = page.evaluate("document.getElementById('na').innerText")
    assert "steering: not applicable" in banner and "adapter folder is gone" in banner
    count = "document.getElementById('count').textContent"
    assert page.evaluate(count) == "6 of 6 features"
    page.evaluate("(() => { const e = document.getElementById('full'); e.checked = true; e.dispatchEvent(new Event('change')); })()")
    page.wait_for(f"{count}.startsWith('3 of')", timeout=5)
    assert page.evaluate("[...document.querySelectorAll('#list .item')].map(e => +e.dataset.id)") == [0, 2, 4]
    assert_clean(page)
