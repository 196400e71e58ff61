"""dashboard.html: loader, escaping, and the page itself in a real headless Chromium."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

import pytest

from saeforge.report.dashboard import (
    build_dashboard_data,
    dumps_for_script,
    load_interpret_outputs,
    write_dashboard,
)

SCRIPT_ATTACK = "<script>window.__pwned=1</script>"
IMG_ATTACK = '<img src=x onerror="window.__pwned2=1">'
BREAKOUT_ATTACK = "</script><script>window.__pwned3=1</script><!--"
SVG_ATTACK = "<svg onload=window.__pwned4=1>"
ENTITY_TEXT = "&lt;b&gt; stays &amp; literal"
LINE_SEP = "a\u2028b\u2029c"
HOSTILE = [SCRIPT_ATTACK, IMG_ATTACK, BREAKOUT_ATTACK, SVG_ATTACK]
PWNED = "[window.__pwned, window.__pwned2, window.__pwned3, window.__pwned4]"

N_FEATURES = 30
LAYER = 8


def _example(fid: int, rank: int, tokens: list[str], act: float, bucket: int | None = None) -> dict:
    acts = [0.0] * len(tokens)
    max_pos = (fid + rank) % len(tokens)
    acts[max_pos] = act
    if max_pos > 0:
        acts[max_pos - 1] = act / 3
    ex = {"activation": act, "tokens": tokens, "token_ids": list(range(len(tokens))), "acts": acts,
          "max_pos": max_pos, "seq": rank, "start": 0}
    if bucket is not None:
        ex["bucket"] = bucket
    return ex


def write_interpret_dir(root: Path, n_features: int = N_FEATURES, n_examples: int = 5,
                        hostile: bool = True, full: bool = True) -> Path:
    """Synthetic outputs of every interpret stage for one hookpoint (hostile strings included)."""
    d = root / "interpret" / "layers.8"
    (d / "scores").mkdir(parents=True)
    (d / "steering").mkdir()
    words = ["The", " cat", " sat", " on", " the", " mat", ".", "\n", " It", " purred", " softly", "!"]
    features = {}
    for f in range(n_features):
        tokens = [words[(f + i) % len(words)] for i in range(len(words))]
        if hostile and f == 12:
            tokens = ["The", " cat", SCRIPT_ATTACK, IMG_ATTACK, " sat", BREAKOUT_ATTACK, SVG_ATTACK,
                      LINE_SEP, ENTITY_TEXT, " purred"]
        a_max = 1.0 + (f % 7) / 2
        features[str(f)] = {
            "feature": f, "frequency": (f + 1) / 1000, "a_max": a_max, "n_fired": (f + 1) * 200,
            "quantiles": [a_max * q for q in (0.1, 0.25, 0.5, 0.75, 0.9)],
            "histogram": {"edges": [a_max * i / 10 for i in range(11)],
                          "counts": [100 // (i + 1) + f for i in range(10)]},
            "top": [_example(f, r, tokens, a_max * (1 - r / 10)) for r in range(n_examples)],
            "quantile_examples": [_example(f, r, tokens, a_max * (b + 1) / 5, bucket=b)
                                  for b in range(3) for r in range(2)] if full else [],
        }
    (d / "maxact.json").write_text(json.dumps({
        "hookpoint": "layers.8", "layer": LAYER, "d_sae": 4608, "n_tokens": 200_000, "features": features}))
    if not full:
        return d
    lens = {str(f): {"top": [[" cat", 1.23], [" kitten", 0.9], [SCRIPT_ATTACK if hostile else " dog", 0.5]],
                     "bottom": [[" the", -0.9], [IMG_ATTACK if hostile else " a", -0.4]],
                     "neighbours": [[(f + 1) % n_features, 0.83], [(f + 2) % n_features, 0.5]]}
            for f in range(n_features)}
    (d / "logit_lens.json").write_text(json.dumps({"features": lens}))
    expl = {str(f): {"feature_number": f, "layer": LAYER, "status": "ok",
                     "label": f"cats and mats {f}", "interpretation": f"Fires on cat words near mats ({f})."}
            for f in range(0, n_features, 2)}
    if hostile:
        expl["12"]["label"] = f"cats {IMG_ATTACK} {SCRIPT_ATTACK}"
        expl["12"]["interpretation"] = f"{BREAKOUT_ATTACK} {ENTITY_TEXT} {LINE_SEP}"
    expl["99"] = {"feature_number": 99, "layer": LAYER, "status": "ok", "label": "explained only",
                  "interpretation": "no maxact for this one"}
    (d / "explanations.json").write_text(json.dumps({str(LAYER): expl}))
    for scorer, field in (("detection", "balanced_accuracy"), ("fuzz", "balanced_accuracy"), ("embedding", "auc")):
        scores = {str(f): {field: 0.5 + (f % 10) / 20, "f1": 0.6, "precision": 0.7, "n": 40,
                           "baseline": {field: 0.25, "n": 40, "feature": (f + 1) % n_features}}
                  for f in range(n_features)}
        (d / "scores" / f"{scorer}.json").write_text(json.dumps(scores))
    prompt = f"Tell me about {SCRIPT_ATTACK if hostile else 'cats'}"
    steering = {str(LAYER): {"12": {prompt: {"original": "Cats are pets.", "-2.0": "Dogs bark loudly.",
                                             "1.0": f"Cats cats cats {IMG_ATTACK if hostile else ''}"}}}}
    (d / "steering" / f"generated_texts_layer_{LAYER}_feature_12_prompt_0.json").write_text(json.dumps(steering))
    (d / "steering" / "effects.json").write_text(json.dumps({"12": {"steering_effect": 0.42, "steering_kl": 1.5}}))
    (d / "summary.csv").write_text(
        "layer,feature,label,steering_effect,detection\n"
        + "".join(f"{LAYER},{f},,{f / 10},0.7\n" for f in range(n_features)))
    return d


@pytest.fixture(scope="module")
def interpret_dir(tmp_path_factory) -> Path:
    return write_interpret_dir(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def dashboard(interpret_dir) -> Path:
    return write_dashboard(interpret_dir)


def open_dashboard(chromium, path: Path, fragment: str = ""):
    page = chromium.open(path.resolve().as_uri() + fragment)
    page.wait_for("document.documentElement.getAttribute('data-ready') === '1'")
    return page


def assert_clean(page) -> None:
    errors = page.console_errors()
    assert not errors, f"console errors: {errors}"
    remote = [u for u in page.requested_urls() if not u.startswith(("file:", "data:", "about:"))]
    assert not remote, f"the dashboard made network requests: {remote}"


# ------------------------------------------------------------------------------- no browser


def test_load_interpret_outputs(interpret_dir):
    out = load_interpret_outputs(interpret_dir)
    assert out["hookpoint"] == "layers.8" and out["layer"] == LAYER and out["d_sae"] == 4608
    assert sorted(out["maxact"]) == list(range(N_FEATURES))
    assert out["explanations"][99]["label"] == "explained only"
    assert set(out["scores"]) == {"detection", "fuzz", "embedding"}
    assert out["summary"][3]["steering_effect"] == "0.3"
    assert list(out["steering"]) == [12]


def test_build_data_headlines_and_union_of_features(interpret_dir):
    data = build_dashboard_data(load_interpret_outputs(interpret_dir))
    by_id = {f["id"]: f for f in data["features"]}
    assert set(by_id) == set(range(N_FEATURES)) | {99}
    f3 = by_id[3]
    assert f3["headline"]["detection"][0] == "balanced_accuracy"
    assert f3["headline"]["embedding"][0] == "auc"
    assert f3["steering_effect"] == pytest.approx(0.3)
    # the steering stage's effects.json wins over summary.csv's copy (1.2 there)
    assert (by_id[12]["steering_effect"], by_id[12]["steering_kl"]) == (pytest.approx(0.42), pytest.approx(1.5))
    assert by_id[12]["steering"][0]["outputs"][0][0] == "original"
    assert [o[0] for o in by_id[12]["steering"][0]["outputs"]] == ["original", "-2.0", "1.0"]
    assert by_id[0]["lens"]["neighbours"][1] == [2, 0.5, "cats and mats 2"]
    assert "top" not in by_id[99] and by_id[99]["label"] == "explained only"


def test_top_tokens_shown_and_generic_labels_not_shown_as_labels(tmp_path):
    d = write_interpret_dir(tmp_path)
    expl = json.loads((d / "explanations.json").read_text())
    expl[str(LAYER)]["2"].update(status="generic", label="The Feature", description="says nothing")
    (d / "explanations.json").write_text(json.dumps(expl))
    (d / "summary.csv").write_text("layer,feature,label,steering_effect,top_tokens\n"
                                   f"{LAYER},0,,0.1,act: left ×7 | lens: Left\n{LAYER},2,,0.2,act: right ×3\n")
    by_id = {f["id"]: f for f in build_dashboard_data(load_interpret_outputs(d))["features"]}
    assert by_id[0]["top_tokens"] == "act: left ×7 | lens: Left" and by_id[0]["label"] == "cats and mats 0"
    assert by_id[2]["label"] == "" and by_id[2]["status"] == "generic" and by_id[2]["top_tokens"] == "act: right ×3"
    assert by_id[2]["interpretation"] == "says nothing"  # the description, not the whole reply
    assert "top_tokens" not in by_id[1]


def test_missing_directory_contents_load_empty(tmp_path):
    out = load_interpret_outputs(tmp_path)
    assert out["maxact"] == {} and out["scores"] == {} and out["hookpoint"] == tmp_path.name


def test_json_blob_cannot_close_its_script_element():
    data = {"s": HOSTILE + [LINE_SEP, ENTITY_TEXT], "x": float("nan")}
    text = dumps_for_script(data)
    for ch in "<>&\u2028\u2029":
        assert ch not in text
    assert json.loads(text) == {"s": data["s"], "x": None}


def test_write_dashboard_is_atomic_and_self_contained(interpret_dir, tmp_path):
    out = write_dashboard(interpret_dir, tmp_path / "sub" / "dash.html", title="My run")
    assert out == tmp_path / "sub" / "dash.html"
    assert [p.name for p in out.parent.iterdir()] == ["dash.html"]  # no temp file left behind
    html = out.read_text(encoding="utf-8")
    assert "__SAEFORGE_" not in html
    for needle in ("http://", "https://", "<link rel=\"stylesheet\"", "<script src"):
        assert needle not in html.replace("http://www.w3.org/2000/svg", "")
    assert html.count("<script") == 2  # the JSON blob and the app, nothing smuggled in
    assert "<img" not in html
    assert write_dashboard(interpret_dir) == interpret_dir / "dashboard.html"


# ---------------------------------------------------------------------------------- browser


def test_feature_renders_with_examples(chromium, dashboard):
    page = open_dashboard(chromium, dashboard, "#feature=3")
    page.wait_for("document.querySelector('#feature-detail')?.dataset.feature === '3'")
    text = page.evaluate("document.getElementById('detail').innerText")
    assert "Feature 3" in text and "cats and mats" not in text.split("\n")[1]  # odd ids have no label
    assert " purred" in text and " softly" in text  # example tokens
    for heading in ("Top activations", "Examples across quantiles", "Logit lens", "Scores",
                    "Nearest features", "Activation histogram"):
        assert heading.lower() in text.lower(), heading
    # each scorer's deranged-explanation baseline is a row of numbers, not a JSON blob
    rows = page.evaluate("[...document.querySelectorAll('#detail table tr')].map(r => r.innerText)")
    baseline = [r for r in rows if r.startswith("detection baseline (#4's label)")]
    assert len(baseline) == 1 and "0.250" in baseline[0] and "{" not in "".join(rows), rows
    n_bars = page.evaluate("document.querySelectorAll('#detail svg.hist rect.b').length")
    assert n_bars == 10
    # heat shading with the value on hover
    shaded = page.evaluate("""[...document.querySelectorAll('#detail .ex span.t.max')].map(
        s => [s.style.backgroundColor, s.title])""")
    assert len(shaded) == 5 + 6 and all(bg.startswith("rgba(") for bg, _ in shaded)
    assert all(title.split()[-1].replace(".", "").isdigit() for _, title in shaded)
    # the list shows scorer headlines; the first rows are rendered, not all features
    assert page.evaluate("document.querySelectorAll('#list .item').length") <= N_FEATURES + 1
    assert "detection 0.65" in page.evaluate("document.querySelector('#list .item[data-id=\"3\"]').innerText")
    # navigation through a nearest-feature link
    page.evaluate("document.querySelector('#detail .nb a').click()")
    page.wait_for("document.querySelector('#feature-detail')?.dataset.feature === '4'")
    assert "cats and mats 4" in page.evaluate("document.getElementById('detail').innerText")
    assert_clean(page)


def test_steering_and_missing_sections(chromium, dashboard):
    page = open_dashboard(chromium, dashboard, "#feature=12")
    text = page.evaluate("document.getElementById('detail').innerText")
    assert "Dogs bark loudly." in text and "Cats are pets." in text and "steering effect" in text.lower() and "steering kl" in text.lower()
    page.evaluate("location.hash = 'feature=99'")
    page.wait_for("document.querySelector('#feature-detail')?.dataset.feature === '99'")
    text = page.evaluate("document.getElementById('detail').innerText")
    assert "explained only" in text and "Top activations" not in text
    page.evaluate("location.hash = 'feature=123456'")
    page.wait_for("document.querySelector('#feature-detail')?.dataset.feature === '123456'")
    assert "not in the data" in page.evaluate("document.getElementById('detail').innerText")
    assert_clean(page)


def test_hostile_text_stays_inert(chromium, dashboard):
    page = open_dashboard(chromium, dashboard, "#feature=12")
    page.wait_for("document.querySelector('#feature-detail')?.dataset.feature === '12'")
    time.sleep(0.3)  # give any onerror / onload a chance to fire
    assert page.evaluate(PWNED) == [None, None, None, None]
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.evaluate("document.querySelectorAll('script').length") == 2
    assert page.evaluate("document.querySelectorAll('svg').length") == 1  # only our histogram
    assert page.evaluate("document.querySelectorAll('[onerror],[onload]').length") == 0
    text = page.evaluate("document.body.textContent")
    for attack in HOSTILE + [ENTITY_TEXT]:
        assert attack in text, attack  # shown as text
    # and in the list, the label is text too
    assert IMG_ATTACK in page.evaluate("document.querySelector('#list .item[data-id=\"12\"]').textContent")
    assert_clean(page)


def test_filters(chromium, dashboard):
    page = open_dashboard(chromium, dashboard)
    count = "document.getElementById('count').textContent"
    assert page.evaluate(count) == f"{N_FEATURES + 1} of {N_FEATURES + 1} features"

    def set_value(id_, value, event="input"):
        page.evaluate(f"""(() => {{ const e = document.getElementById({json.dumps(id_)});
            if (e.type === 'checkbox') e.checked = {json.dumps(bool(value))}; else e.value = {json.dumps(value)};
            e.dispatchEvent(new Event({json.dumps(event)})); }})()""")

    set_value("q", "MATS 1")  # every term, any case: labels "cats and mats 10", 14, 16, 18
    page.wait_for(f"{count}.startsWith('4 of')", timeout=5)
    ids = page.evaluate("[...document.querySelectorAll('#list .item')].map(e => +e.dataset.id)")
    assert ids == [10, 14, 16, 18]
    set_value("q", "#7")
    page.wait_for(f"{count}.startsWith('1 of')", timeout=5)
    set_value("q", "")
    set_value("fmin", "1")  # frequency (f+1)/1000 >= 1 %  -> f >= 9
    set_value("fmax", "2")  # <= 2 %                         -> f <= 19
    page.wait_for(f"{count}.startsWith('11 of')", timeout=5)
    set_value("fmin", "")
    set_value("fmax", "")
    set_value("scorer", "detection", "change")
    set_value("smin", "0.9")  # 0.5 + (f % 10) / 20 >= 0.9 -> f % 10 in 8, 9
    page.wait_for(f"{count}.startsWith('6 of')", timeout=5)
    set_value("smin", "")
    set_value("labelled", True, "change")
    page.wait_for(f"{count}.startsWith('16 of')", timeout=5)
    set_value("labelled", False, "change")
    set_value("sort", "steer", "change")
    page.wait_for("document.querySelector('#list .item').dataset.id === '29'", timeout=5)
    assert_clean(page)


def _png_size_and_variety(path: Path) -> tuple[int, int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", raw[16:24])
    idat, pos = b"", 8
    while pos < len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        if kind == b"IDAT":
            idat += raw[pos + 8:pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


def test_screenshot(chromium, dashboard, tmp_path):
    page = open_dashboard(chromium, dashboard, "#feature=12")
    page.wait_for("document.querySelector('#feature-detail')?.dataset.feature === '12'")
    shot = page.screenshot(tmp_path / "dashboard.png")
    width, height, variety = _png_size_and_variety(shot)
    assert (width, height) == (1400, 900)
    assert shot.stat().st_size > 20_000 and variety > 100, "screenshot looks blank"
    assert_clean(page)


def test_empty_directory_renders(chromium, tmp_path):
    page = open_dashboard(chromium, write_dashboard(tmp_path))
    assert "No features" in page.evaluate("document.getElementById('detail').innerText")
    assert_clean(page)


def test_16k_features_first_view_is_fast(chromium, tmp_path):
    n = 16_384
    d = write_interpret_dir(tmp_path, n_features=n, n_examples=2, hostile=False, full=False)
    path = write_dashboard(d)
    start = time.monotonic()
    page = chromium.open(path.resolve().as_uri())
    page.wait_for("document.documentElement.getAttribute('data-ready') === '1'", timeout=60)
    elapsed = time.monotonic() - start
    assert elapsed < 15, f"first view took {elapsed:.1f} s"
    assert page.evaluate("document.getElementById('count').textContent") == "16,384 of 16,384 features"
    assert page.evaluate("document.querySelectorAll('#list .item').length") < 100  # virtual list
    page.evaluate("document.getElementById('list').scrollTop = 1e9")
    page.wait_for("!!document.querySelector('#list .item[data-id=\"16383\"]')")
    page.evaluate("location.hash = 'feature=16000'")
    page.wait_for("document.querySelector('#feature-detail')?.dataset.feature === '16000'", timeout=10)
    assert_clean(page)


def test_command_line(interpret_dir, tmp_path, capsys):
    from saeforge.report.dashboard import main

    main([str(interpret_dir), "-o", str(tmp_path / "d.html"), "--title", "CLI run"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "d.html")
    assert "CLI run" in (tmp_path / "d.html").read_text(encoding="utf-8")


def test_non_activating_examples_show_their_source(chromium, tmp_path):
    d = write_interpret_dir(tmp_path, n_features=2, hostile=False, full=False)
    doc = json.loads((d / "maxact.json").read_text())
    doc["features"]["1"]["non_activating"] = [
        {"tokens": [" the", " harbour", SCRIPT_ATTACK], "token_ids": [1, 2, 3], "seq": 4, "start": 1,
         "source": "neighbours", "neighbour": 0, "cosine": 0.8123},
        {"tokens": [" a", " field"], "token_ids": [4, 5], "seq": 9, "start": 2, "source": "random"}]
    (d / "maxact.json").write_text(json.dumps(doc))
    page = open_dashboard(chromium, write_dashboard(d), "#feature=1")
    page.wait_for("document.querySelector('#feature-detail')?.dataset.feature === '1'")
    text = page.evaluate("document.getElementById('detail').innerText")
    assert "non-activating examples" in text.lower() and "from feature 0 (cosine 0.812)" in text
    assert "neighbours" in text and "random" in text and "harbour" in text and "field" in text
    assert page.evaluate(PWNED) == [None, None, None, None]
    assert_clean(page)
