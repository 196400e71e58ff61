"""records.py: the only reader/writer of the interpretation outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from saeforge.interpret import records as R
from saeforge.interpret.records import Explanation, FeatureRecord, LogitLens, Records, Steering

SRC = Path(__file__).resolve().parents[2] / "src" / "saeforge"
HOOK = "layers.3"


def example(f: int, r: int, bucket: int | None = None) -> dict:
    ex = {"activation": 1.5 - r / 10, "tokens": ["The", " cat", " sat"], "token_ids": [1, 2, 3],
          "acts": [0.0, 1.5 - r / 10, 0.25], "max_pos": 1, "seq": f * 10 + r, "start": 4}
    return ex if bucket is None else {"bucket": bucket, **ex}


def make_records() -> Records:
    recs = Records(hookpoint=HOOK, layer=3, d_sae=64, n_tokens=4096, ctx_len=32, quantile_levels=[0.1, 0.5, 0.9])
    for f in (2, 7, 11):
        rec = recs.get(f)
        rec.set_maxact({"frequency": f / 100, "a_max": 1.5, "n_fired": f * 3, "quantiles": [0.1, 0.5, 1.2],
                        "histogram": {"edges": [0.0, 0.75, 1.5], "counts": [5, 2]},
                        "top": [example(f, r) for r in range(3)],
                        "quantile_examples": [example(f, r, bucket=b) for b in range(2) for r in range(2)],
                        "non_activating": [{"tokens": ["a", "b"], "token_ids": [4, 5], "seq": 3, "start": 1}]})
        rec.logit_lens = LogitLens([[" cat", 1.25], [" dog", 0.5]], [[" the", -0.75]], [[f + 1, 0.5]])
        rec.steering = Steering({"Once upon": {"original": "a time", "-2.0": "nothing", "2.0": "cats cats"},
                                 "The weather": {"original": "is fine", "-2.0": "x", "2.0": "cats"}},
                                measured=True, effect=0.5 + f / 100, kl=0.25 if f != 11 else None, effect_dedup=0.75)
        rec.explanation = Explanation(label=f"cats {f}" if f != 11 else "", interpretation="cat words",
                                      status="success" if f != 11 else "parse_error", source="maxact", layer=3,
                                      extra={"raw": "LABEL: cats", "split": {"seed": 0, "shown": [[1, 4]]}})
        if f != 11:
            rec.scores = {"detection": {"balanced_accuracy": 0.75, "n": 10, "baseline": {"balanced_accuracy": 0.5, "feature": 7}},
                          "embedding": {"auc": 0.875, "n": 10, "baseline": {"auc": 0.5, "n": 10, "feature": 2}}}
    return recs


def write_all(recs: Records, out: Path) -> None:
    R.write_maxact(out, recs)
    R.write_logit_lens(out, recs)
    for f, rec in recs.features.items():
        for p, (prompt, texts) in enumerate(rec.steering.texts.items()):
            R.write_steering_texts(out, recs.layer, f, p, prompt, texts)
    R.write_effects(out, recs)
    R.write_explanations(out, recs, recs.layer, HOOK, recs.ids())
    for scorer in ("detection", "embedding"):
        results = {f: {**r.scores[scorer], "examples": [{"text": "x", "activating": True}]}
                   for f, r in recs.features.items() if scorer in r.scores}
        R.write_scores(out, scorer, HOOK, recs.ids(), results)
    R.write_summary(out, recs, recs.ids(), ["detection", "fuzz", "embedding"])


def test_round_trip(tmp_path: Path) -> None:
    recs = make_records()
    write_all(recs, tmp_path)
    back = R.load_records(tmp_path, strict=True)
    assert back == recs
    assert R.read_steering_texts(tmp_path, 3, 7) == recs[7].steering.texts
    assert R.steering_texts_complete(tmp_path, 3, 7, 2) and not R.steering_texts_complete(tmp_path, 3, 7, 3)
    assert json.loads((tmp_path / R.EXPLANATIONS_DIR / f"{HOOK}_latent_2.txt").read_text()) == "cats 2"
    assert not (tmp_path / R.EXPLANATIONS_DIR / f"{HOOK}_latent_11.txt").exists()  # only ok labels
    assert json.loads((tmp_path / R.SCORES_DIR / "detection" / f"{HOOK}_latent_7.txt").read_text())[0]["text"] == "x"
    assert not list(tmp_path.rglob(".*tmp"))  # every write went through saeforge.atomic


def test_summary_rows_and_columns(tmp_path: Path) -> None:
    recs = make_records()
    write_all(recs, tmp_path)
    with (tmp_path / R.SUMMARY).open(newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert reader.fieldnames == R.SUMMARY_COLUMNS + R.EXTRA_COLUMNS + R.DESCRIPTION_COLUMNS
    assert reader.fieldnames[:4] == ["layer", "feature", "label", "steering_effect"]  # the steering workflow's order
    assert [(r["layer"], r["feature"]) for r in rows] == [("3", "2"), ("3", "7"), ("3", "11")]
    assert rows[0]["label"] == "cats 2" and rows[0]["detection"] == "0.75" and rows[0]["embedding"] == "0.875"
    assert rows[0]["steering_effect"] == "0.52" and rows[0]["steering_kl"] == "0.25" and rows[0]["fuzz"] == ""
    assert rows[0]["status"] == "success" and rows[0]["steering_effect_dedup"] == "0.75"
    assert rows[2]["label"] == "" and rows[2]["detection"] == "" and rows[2]["steering_kl"] == ""
    assert rows[2]["status"] == "parse_error"
    assert R.read_summary(tmp_path) == rows
    assert R.summary_by_feature(rows, 3)[7]["detection_baseline"] == "0.5"


def test_every_json_file_but_the_steering_texts_has_format_version(tmp_path: Path) -> None:
    write_all(make_records(), tmp_path)
    R.write_stages(tmp_path, {"maxact": {"fingerprint": "abc", "finished": "now"}})
    for path in tmp_path.rglob("*.json"):
        doc = json.loads(path.read_text())
        if path.name.startswith("generated_texts_"):
            assert "format_version" not in doc
            layer, = doc  # the seed shape: {layer: {feature: {prompt: {key: text}}}}
            (feature, by_prompt), = doc[layer].items()
            assert layer == "3" and all("original" in v for v in by_prompt.values())
        else:
            assert doc["format_version"] == R.FORMAT_VERSION, path
    assert R.read_stages(tmp_path) == {"maxact": {"fingerprint": "abc", "finished": "now"}}


def test_files_without_format_version_still_read(tmp_path: Path) -> None:
    recs = make_records()
    write_all(recs, tmp_path)
    for path in tmp_path.rglob("*.json"):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and "format_version" in doc:
            del doc["format_version"]
            path.write_text(json.dumps(doc))
    assert R.load_records(tmp_path, strict=True) == recs


def test_missing_files_give_empty_parts(tmp_path: Path) -> None:
    recs = R.load_records(tmp_path)
    assert recs.features == {} and recs.hookpoint is None and R.read_summary(tmp_path) == []
    with pytest.raises(FileNotFoundError, match="maxact stage"):
        R.read_maxact(tmp_path)


def test_scores_merge_keeps_other_features_and_drops_rescored_failures(tmp_path: Path) -> None:
    R.write_scores(tmp_path, "fuzz", HOOK, [1, 2], {1: {"balanced_accuracy": 1.0, "examples": []},
                                                    2: {"balanced_accuracy": 0.5, "examples": []}})
    recs = Records(layer=3)
    R.write_scores(tmp_path, "fuzz", HOOK, [2], {}, recs)  # 2 rescored without a result: removed
    assert set(R.read_scores(tmp_path, ["fuzz"]).features) == {1}
    assert not (tmp_path / R.SCORES_DIR / "fuzz" / f"{HOOK}_latent_2.txt").exists()


def test_explanations_of_other_layers_are_kept(tmp_path: Path) -> None:
    (tmp_path / R.EXPLANATIONS).write_text(json.dumps({"5": {"1": {"feature_number": 1, "layer": 5, "label": "x",
                                                                    "status": "ok"}}}))
    recs = Records(layer=3)
    recs.get(4).explanation = Explanation(label="y", status="success", layer=3)
    R.write_explanations(tmp_path, recs, 3, HOOK, [4])
    doc = json.loads((tmp_path / R.EXPLANATIONS).read_text())
    assert set(doc) == {"format_version", "5", "3"} and doc["5"]["1"]["label"] == "x"
    assert R.read_explanations(tmp_path, 5).features[1].explanation.label == "x"


def test_feature_record_label_only_on_success() -> None:
    rec = FeatureRecord(1, explanation=Explanation(label="  dogs ", status="success"))
    assert rec.label == "dogs"
    for status in ("error", "generic"):
        rec.explanation.status = status
        assert rec.label == ""


def test_old_ok_status_reads_as_success() -> None:
    old = Explanation.from_json({"feature_number": 1, "layer": 3, "label": "dogs", "status": "ok"})
    assert old.status == "success" and old.ok and old.final
    assert Explanation.from_json({"label": "x", "status": "error"}).status == "error"


def test_steering_file_suffix_slot_and_readers_take_every_suffix(tmp_path: Path) -> None:
    path = R.write_steering_texts(tmp_path, 19, 6, 0, "p0", {"original": "a", "1.0": "b"}, suffix="0")
    assert path.name == "generated_texts_layer_19_feature_6_0_prompt_0.json"  # the seed's example name
    R.write_steering_texts(tmp_path, 19, 6, 1, "p1", {"original": "c"})
    assert R.steering_text_path(tmp_path, 19, 6, 1).name == "generated_texts_layer_19_feature_6_prompt_1.json"
    assert R.read_steering_texts(tmp_path, 19, 6) == {"p0": {"original": "a", "1.0": "b"}, "p1": {"original": "c"}}
    assert R.steering_texts_complete(tmp_path, 19, 6, 1, "0") and not R.steering_texts_complete(tmp_path, 19, 6, 2, "0")


def test_run_config_round_trip(tmp_path: Path) -> None:
    R.write_run_config(tmp_path, {"config": {"seed": 1}, "versions": {"torch": "x"}})
    assert R.read_run_config(tmp_path) == {"config": {"seed": 1}, "versions": {"torch": "x"}}
    assert json.loads((tmp_path / R.RUN_CONFIG).read_text())["format_version"] == R.FORMAT_VERSION


@pytest.mark.parametrize("name", [R.MAXACT, R.SUMMARY, "effects.json", "generated_texts_layer_", R.RUN_CONFIG])
def test_file_names_appear_in_one_source_file_only(name: str) -> None:
    """File names and nestings live in records.py; other modules use its constants (CI rule)."""
    hits = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if name in p.read_text(encoding="utf-8"))
    assert hits == ["interpret/records.py"], f"{name!r} appears in {hits}"


def test_example_json_keeps_fields_order_and_unknown_keys() -> None:
    for doc in (example(1, 0), example(1, 2, bucket=3), {"tokens": ["a"], "token_ids": [4], "seq": 3, "start": 1},
                {**example(2, 0), "note": "kept"}):
        back = R.Example.from_json(doc).to_json()
        assert back == doc and list(back) == list(doc)
    rec = make_records()[7]
    assert isinstance(rec.top[0], R.Example) and rec.top[0].activation == 1.5 and rec.quantile_examples[2].bucket == 1
