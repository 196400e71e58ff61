"""Score stage: detection/fuzz against a scripted real HTTP server, embedding with the real MiniLM."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from saeforge.config import ExplainConfig, ScoreConfig
from saeforge.interpret import records as records_io
from saeforge.interpret.explain import example_key, explain_records, split_examples
from saeforge.interpret.prompts import load_prompts
from saeforge.interpret.score import (
    classification_metrics,
    derangement,
    load_embedder,
    parse_predictions,
    parse_probabilities,
    score_records,
)
from saeforge.explainers.base import ChatParams
from tests.interpret.chat_server import ScriptedChat, example_lines, last_user, make_maxact, records_of

PARAMS = ChatParams(max_tokens=32)


def explainer(body: dict) -> str:
    kind = "dog" if "<< dog>>" in last_user(body) else "cat"
    return f"LABEL: the word {kind}\nDESCRIPTION: fires on {kind}."


def oracle(body: dict) -> str:
    """Answers from the true labels: the explained word is in the example (detection) / marked (fuzz)."""
    word = re.search(r"Feature explanation: the word (\w+)", last_user(body)).group(1)
    fuzz = "marked" in body["messages"][0]["content"]
    hit = (lambda line: f"<< {word}>>" in line) if fuzz else (lambda line: f" {word} " in line)
    return "[" + ", ".join("1" if hit(line) else "0" for line in example_lines(body)) + "]"


def all_zero(body: dict) -> str:
    return "[" + ", ".join("0" for _ in example_lines(body)) + "]"


def explained(tmp_path: Path, maxact: dict) -> dict:
    """The explanations document of every feature of `maxact`."""
    with ScriptedChat(explainer) as server:
        records = explain_records(server.client(), records_of(maxact), None, load_prompts(), PARAMS, tmp_path,
                                  "layers.2", 2, ExplainConfig(n_shown=4))
    return records_io.explanations_json(records, 2)


def score(client, embedder, maxact: dict, expl: dict, features, out_dir: Path, cfg: ScoreConfig,
          prompts=None, params: ChatParams = PARAMS) -> dict:
    """Score on the records of a max-act document and an explanations document (with the steering
    effects of `out_dir`, as the pipeline reads them); returns `{scorer: {"<feature>": result}}`
    of the scored features (all explained ones when `features` is None)."""
    records = records_io.explanations_from_json(expl, 2, records_of(maxact))
    records_io.read_steering(out_dir, records, texts=False)
    score_records(client, embedder, records, features, prompts or load_prompts(), params, out_dir, "layers.2", 2, cfg)
    feats = features if features is not None else [f for f in records.ids() if records[f].explanation is not None]
    return {scorer: {str(f): records[f].scores[scorer] for f in feats if scorer in records[f].scores}
            for scorer in cfg.scorers}


def test_metrics_from_known_answers() -> None:
    m = classification_metrics([1, 1, 0, 0], [1, 0, 0, 1], [0.9, 0.4, 0.1, 0.6])
    assert m["balanced_accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5
    assert m["auc"] == 0.75
    m = classification_metrics([1, 1, 0, 0, 1], [1, 1, 0, None, 1])
    assert m["balanced_accuracy"] == 1.0 and m["n"] == 4 and m["n_unparsed"] == 1
    assert parse_predictions("Sure: [1, 0, 1]", 3) == [1, 0, 1]
    assert parse_predictions("[1, 0]", 3) is None and parse_predictions("1 0 1", 3) == [1, 0, 1]
    lp = [{"token": "[", "logprob": 0.0, "top": {}}, {"token": "1", "logprob": -0.1, "top": {"1": -0.1, "0": -2.4}},
          {"token": ",", "logprob": 0.0, "top": {}}, {"token": " 0", "logprob": -0.2, "top": {" 0": -0.2, " 1": -1.7}}]
    probs = parse_probabilities(lp, 2)
    assert probs[0] > 0.85 and probs[1] < 0.25
    assert parse_probabilities([{"token": "[1,0]", "logprob": 0.0, "top": {}}], 2) is None
    d = derangement([3, 5, 7, 9], seed=1)
    assert sorted(d) == sorted(d.values()) == [3, 5, 7, 9] and all(k != v for k, v in d.items())


def test_oracle_scores_one_all_zero_scores_half(tmp_path: Path) -> None:
    maxact = make_maxact({0: "dog", 1: "cat", 2: "dog"})
    expl = explained(tmp_path, maxact)
    prompts = load_prompts()
    with ScriptedChat(oracle) as server:
        res = score(server.client(), None, maxact, expl, None, tmp_path,
                    ScoreConfig(scorers=["detection", "fuzz"], seed=0, n_test=6, n_negatives=6), prompts)
    n_requests = len(server.requests)
    for scorer in ("detection", "fuzz"):
        for f in ("0", "1", "2"):
            r = res[scorer][f]
            assert r["balanced_accuracy"] == 1.0 and r["precision"] == 1.0 and r["recall"] == 1.0 and r["f1"] == 1.0
            assert r["n"] == 12 and r["auc"] == 1.0
            assert r["baseline"] is not None and r["baseline"]["feature"] != int(f)
    # the baseline of a dog feature explained as "cat" (the only other label) cannot be perfect
    assert res["detection"]["0"]["baseline"]["balanced_accuracy"] < 1.0 or expl["2"]["1"]["label"] == "the word dog"
    # batches of 5 examples, own + baseline explanation on the same batches: ceil(12/5) * 2 per feature
    assert n_requests == 2 * 3 * 3 * 2
    bodies = server.requests
    assert all(len(example_lines(b)) <= 5 for b in bodies) and all(b["logprobs"] for b in bodies)

    with ScriptedChat(all_zero) as server:
        res0 = score(server.client(), None, maxact, expl, None, tmp_path,
                     ScoreConfig(scorers=["detection"], seed=0, n_test=6, n_negatives=6), prompts)
    r = res0["detection"]["0"]
    assert r["balanced_accuracy"] == 0.5 and r["recall"] == 0.0 and r["precision"] == 0.0 and r["f1"] == 0.0

    # files: per-scorer json, delphi-style per-latent txt, summary.csv
    det = json.loads((tmp_path / "scores" / "detection.json").read_text())
    assert det.pop("format_version") == 1
    assert set(det) == {"0", "1", "2"} and det["0"]["balanced_accuracy"] == 0.5  # the rerun replaced it
    fuzz = json.loads((tmp_path / "scores" / "fuzz.json").read_text())
    assert fuzz["1"]["balanced_accuracy"] == 1.0 and "baseline" in fuzz["1"]
    rows = json.loads((tmp_path / "scores" / "fuzz" / "layers.2_latent_1.txt").read_text())
    assert len(rows) == 12 and {"text", "activating", "prediction", "probability", "correct"} <= set(rows[0])
    assert any("<<" in r["text"] for r in rows if not r["activating"])  # wrongly marked negatives
    with (tmp_path / "summary.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert table[0].keys() >= {"layer", "feature", "label", "steering_effect", "detection", "fuzz", "embedding",
                               "steering_kl", "detection_baseline", "fuzz_baseline"}
    assert [(r["layer"], r["feature"]) for r in table] == [("2", "0"), ("2", "1"), ("2", "2")]
    assert table[0]["label"] == "the word dog" and table[0]["detection"] == "0.5" and table[0]["fuzz"] == "1"


def test_scored_examples_never_shown(tmp_path: Path) -> None:
    maxact = make_maxact({0: "dog", 1: "cat"})
    expl = explained(tmp_path, maxact)
    seen_texts: list[str] = []

    def script(body: dict) -> str:
        seen_texts.extend(example_lines(body))
        return all_zero(body)

    with ScriptedChat(script) as server:
        score(server.client(), None, maxact, expl, [0], tmp_path,
              ScoreConfig(scorers=["detection"], seed=0, n_test=100, n_negatives=100, baseline=False))
    entry = maxact["features"]["0"]
    shown = {tuple(k) for k in expl["2"]["0"]["split"]["shown"]}
    split = split_examples(entry, 0, shown=expl["2"]["0"]["split"]["shown"])
    scored = {example_key(e) for e in split.test} | {example_key(e) for e in split.non_activating}
    assert shown and not shown & scored
    assert len(seen_texts) == len(split.test) + len(split.non_activating) == len(scored)


def test_not_ok_features_are_not_scored(tmp_path: Path) -> None:
    maxact = make_maxact({0: "dog", 1: "cat"})
    expl = explained(tmp_path, maxact)
    expl["2"]["1"].update(status="parse_error", label="")
    with ScriptedChat(all_zero) as server:
        res = score(server.client(), None, maxact, expl, None, tmp_path, ScoreConfig(scorers=["detection"], seed=0))
    assert set(res["detection"]) == {"0"} and res["detection"]["0"]["baseline"] is None  # one ok feature: no baseline
    assert all("the word cat" not in last_user(b) for b in server.requests)
    with (tmp_path / "summary.csv").open() as fh:
        row1 = [r for r in csv.DictReader(fh) if r["feature"] == "1"][0]
    assert row1["label"] == "" and row1["detection"] == ""


def test_summary_merges_existing_columns_and_steering(tmp_path: Path) -> None:
    maxact = make_maxact({0: "dog", 1: "cat"})
    expl = explained(tmp_path, maxact)
    (tmp_path / "summary.csv").write_text("layer,feature,label,steering_effect,custom\n2,0,old,,keep-me\n2,9,x,,other\n")
    (tmp_path / "steering").mkdir()
    (tmp_path / "steering" / "effects.json").write_text(json.dumps({"0": {"steering_effect": 0.25, "steering_kl": 1.5}}))
    with ScriptedChat(oracle) as server:
        score(server.client(), None, maxact, expl, None, tmp_path, ScoreConfig(scorers=["detection"], seed=0, logprobs=False))
    with (tmp_path / "summary.csv").open() as fh:
        rows = {r["feature"]: r for r in csv.DictReader(fh)}
    assert rows["0"]["custom"] == "keep-me" and rows["9"]["custom"] == "other"
    assert rows["0"]["label"] == "the word dog" and rows["0"]["steering_effect"] == "0.25" and rows["0"]["steering_kl"] == "1.5"
    assert rows["0"]["detection"] == "1" and rows["0"]["detection_baseline"] != ""
    assert "auc" not in json.loads((tmp_path / "scores" / "detection.json").read_text())["0"]


@pytest.fixture(scope="module")
def minilm():
    return load_embedder()


def test_embedding_auroc_with_real_minilm(tmp_path: Path, minilm) -> None:
    dog = ["My dog loves to fetch the ball", "The puppy barked at the mailman", "She walked her dog in the rain",
           "Dogs wag their tails when happy"]
    cat = ["The cat slept on the warm windowsill", "A kitten chased the yarn", "Cats purr when they are content",
           "The cat knocked the cup off the table"]

    def ex(i: int, text: str, hot: bool) -> dict:
        toks = [w if j == 0 else " " + w for j, w in enumerate(text.split())]
        acts = [1.0 if hot and j == 1 else 0.0 for j in range(len(toks))]
        return {"activation": max(acts), "tokens": toks, "token_ids": list(range(len(toks))), "acts": acts,
                "max_pos": 1, "seq": i, "start": 0}

    entry = {"a_max": 1.0, "top": [ex(i, t, True) for i, t in enumerate(dog)], "quantile_examples": [],
             "non_activating": [{k: v for k, v in ex(10 + i, t, False).items() if k in ("tokens", "token_ids", "seq", "start")}
                                for i, t in enumerate(cat)]}
    maxact = {"features": {"0": entry, "1": entry}}
    expl = {"2": {"0": {"status": "ok", "label": "dogs", "split": {"shown": []}},
                  "1": {"status": "ok", "label": "cats", "split": {"shown": []}}}}
    res = score(None, minilm, maxact, expl, None, tmp_path, ScoreConfig(scorers=["embedding"], seed=0))
    assert res["embedding"]["0"]["auc"] > 0.5 and res["embedding"]["0"]["n"] == 8
    assert res["embedding"]["0"]["baseline"]["auc"] < 0.5  # "cats" ranks the cat sentences higher
    with (tmp_path / "summary.csv").open() as fh:
        rows = {r["feature"]: r for r in csv.DictReader(fh)}
    assert float(rows["0"]["embedding"]) > 0.5 and rows["0"]["embedding_baseline"] != ""


# ------------------------------------------------------------------------------ real vLLM (slow)
@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    from saeforge.explainers.vllm_server import VLLMServer, default_vllm_venv
    from saeforge.lm.hf_folder import write_smollm2_hf_folder

    venv = default_vllm_venv()
    if not (venv / "bin" / "python").exists():
        pytest.fail(f"no vLLM venv at {venv}: run `make vllm` (scripts/setup_vllm_venv.sh) first")
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    server = VLLMServer(write_smollm2_hf_folder(), log_path=log_path, startup_timeout_s=300)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_label_and_detect_two_features_with_real_vllm(tmp_path: Path, vllm_server) -> None:
    from saeforge.explainers.openai_compat import OpenAICompatClient

    client = OpenAICompatClient(vllm_server.base_url, "smollm2", max_in_flight=8, max_retries=1, timeout_s=300)
    maxact = make_maxact({0: "dog", 1: "cat"}, n_top=4, n_quant=4, n_non=4)
    records = explain_records(client, records_of(maxact), [0, 1], load_prompts(), ChatParams(max_tokens=64), tmp_path,
                              "layers.2", 2, ExplainConfig(n_shown=4))
    expl = records_io.explanations_json(records, 2)
    entries = expl["2"]
    assert {e["status"] for e in entries.values()} <= {"success", "generic", "parse_error"}, entries  # no request failed
    for e in entries.values():
        assert (e["status"] in ("success", "generic")) == bool(e["label"])
    if not any(e["status"] == "success" for e in entries.values()):  # a 135M model may miss the format: score a given label
        entries["0"].update(status="success", label="the word dog")
    res = score(client, None, maxact, expl, None, tmp_path,
                ScoreConfig(scorers=["detection"], seed=0, n_test=5, n_negatives=5), params=ChatParams(max_tokens=32))
    scored = res["detection"]
    assert scored and all(r["n"] + r["n_unparsed"] == 8 and r["n_errors"] == 0 for r in scored.values())  # 4 + 4
    assert (tmp_path / "summary.csv").is_file() and (tmp_path / "scores" / "detection.json").is_file()
    print({f: (entries[f]["status"], entries[f]["label"], entries[f].get("interpretation"), scored.get(f)) for f in entries})


def test_prefill_bracket_is_sent_and_parsed(tmp_path: Path) -> None:
    maxact = make_maxact({0: "dog", 1: "cat"})
    expl = explained(tmp_path, maxact)

    def continuation(body: dict) -> str:  # continues the prefill "[" of the scorer prompts
        assert body["messages"][-1] == {"role": "assistant", "content": "["} and body["continue_final_message"]
        return oracle(body).removeprefix("[")

    with ScriptedChat(continuation) as server:
        res = score(server.client(prefill=True), None, maxact, expl, None, tmp_path,
                    ScoreConfig(scorers=["detection", "fuzz"], seed=0, n_test=6, n_negatives=6))
    for scorer in ("detection", "fuzz"):
        r = res[scorer]["0"]
        assert r["balanced_accuracy"] == 1.0 and r["n_unparsed"] == 0 and r["auc"] == 1.0
