"""Explain stage against a real local HTTP server speaking the chat-completions shape."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from saeforge.config import ExplainConfig
from saeforge.interpret import records as records_io
from saeforge.interpret.explain import example_key, explain_records, parse_reply, split_examples
from saeforge.interpret.prompts import load_prompts
from saeforge.explainers.base import ChatParams
from tests.interpret.chat_server import ScriptedChat, last_user, make_maxact, records_of

PARAMS = ChatParams(max_tokens=64)
SHOWN4 = ExplainConfig(n_shown=4)


def explain(client, records, features, out_dir, cfg=None, prompts=None) -> dict:
    """Run the stage on `records` and return this layer's explanations document (what the file holds)."""
    records = explain_records(client, records, features, prompts or load_prompts(), PARAMS, out_dir, "layers.2", 2, cfg)
    return records_io.explanations_json(records, 2)


def good(body: dict) -> str:
    text = last_user(body)
    kind = "dogs" if "<< dog>>" in text else "cats"
    return f"LABEL: mentions of {kind}\nDESCRIPTION: Fires on the word {kind[:-1]} in simple sentences."


def test_prompt_override_replaces_only_named(tmp_path: Path) -> None:
    default = load_prompts()
    override = tmp_path / "p.yaml"
    override.write_text('detection:\n  user: "Explanation: {explanation}\\n\\n{prompt}\\nANSWER NOW"\n')
    merged = load_prompts(override)
    assert merged["detection"].user.endswith("ANSWER NOW")
    assert merged["detection"].system == default["detection"].system  # key not named: kept
    assert merged["fuzz"] == default["fuzz"] and merged["explain_maxact"] == default["explain_maxact"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("detecton:\n  user: '{prompt} {explanation}'\n")
    with pytest.raises(ValueError, match="unknown prompt 'detecton'"):
        load_prompts(bad)
    bad.write_text("detection:\n  usr: x\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_prompts(bad)
    msgs = merged["detection"].messages("EX {x}", explanation="dogs")
    assert msgs[-1]["content"] == "Explanation: dogs\n\nEX {x}\nANSWER NOW"


def test_parse_reply_formats() -> None:
    assert parse_reply("LABEL: dogs\nDESCRIPTION: the word dog.", "maxact") == {"label": "dogs", "interpretation": "the word dog."}
    assert parse_reply("**Label:** Dogs\n**Description:** pets", "maxact")["label"] == "Dogs"
    assert parse_reply("thinking...\n[EXPLANATION]: The token er", "maxact")["label"] == "The token er"
    assert parse_reply("no format at all", "maxact") is None
    assert parse_reply("LABEL: ...", "maxact") is None  # a placeholder is not a label
    long = "LABEL: " + " ".join(["word"] * 40)
    assert parse_reply(long, "maxact") is None  # a rambling line is not cut into a label
    assert parse_reply("LABEL: " + " ".join(["word"] * 19), "maxact") is not None
    # the label is its line only; text after it (without a DESCRIPTION) does not join it
    assert parse_reply('LABEL: "the word dog"\nIt fires on dogs.', "maxact")["label"] == "the word dog"
    assert parse_reply("LABEL:\n  dogs\nDESCRIPTION: x", "maxact")["label"] == "dogs"
    s = parse_reply("SUMMARY: sea words\nDETAILED ANALYSIS: positive adds waves.", "steering")
    assert s == {"label": "sea words", "interpretation": "positive adds waves."}


def test_split_has_no_overlap_and_is_recorded() -> None:
    entry = make_maxact()["features"]["0"]
    split = split_examples(entry, 0, n_shown=6, seed=3)
    shown = {example_key(e) for e in split.shown}
    test = {example_key(e) for e in split.test}
    non = {example_key(e) for e in split.non_activating}
    assert len(split.shown) == 6 and shown and test
    assert not shown & test and not shown & non and not test & non
    assert len(test) == len(split.test)  # the duplicated top/quantile window appears once
    assert {e["kind"] for e in split.shown} == {"top", "quantile"}  # half from each group
    again = split_examples(entry, 0, shown=split.record(3)["shown"])  # what score.py does
    assert [example_key(e) for e in again.test] == [example_key(e) for e in split.test]
    assert split_examples(entry, 0, n_shown=6, seed=3).shown_keys == split.shown_keys  # deterministic


def test_explain_records_writes_and_resumes(tmp_path: Path) -> None:
    maxact = make_maxact()
    with ScriptedChat(good) as server:
        out = explain(server.client(), records_of(maxact), [0, 1], tmp_path, SHOWN4)
        assert len(server.requests) == 2
        doc = json.loads((tmp_path / "explanations.json").read_text())
        assert doc.pop("format_version") == 1 and doc == out
        e0, e1 = doc["2"]["0"], doc["2"]["1"]
        assert e0["status"] == "ok" and e0["label"] == "mentions of dogs" and e0["source"] == "maxact"
        assert e1["label"] == "mentions of cats" and e0["feature_number"] == 0 and e0["layer"] == 2
        assert "word dog" in e0["interpretation"] and len(e0["split"]["shown"]) == 4
        prompt = next(last_user(b) for b in server.requests if "dog" in last_user(b))
        assert "Example 1: The<< dog>> ran to the park" in prompt
        assert re.search(r'Activations: \(" dog", \d+\)', prompt)
        assert json.loads((tmp_path / "explanations" / "layers.2_latent_0.txt").read_text()) == "mentions of dogs"
        explain(server.client(), records_of(maxact), [0, 1], tmp_path)
        assert len(server.requests) == 2  # resumed: nothing asked again


def test_repair_retry_then_parse_error_and_error_status(tmp_path: Path) -> None:
    def script(body: dict) -> str | int:
        text = last_user(body)
        if "could not be read" in text:  # the repair turn
            return good({"messages": body["messages"][:2]}) if "<< dog>>" in body["messages"][1]["content"] else "still rambling"
        if "<< cat>>" in text:
            return "I think it is about animals, maybe."
        return 500 if "<< dog>>" not in text else "Sure! Here it is: dogs dogs"

    maxact = make_maxact({0: "dog", 1: "cat", 2: "dog"})
    for ex in maxact["features"]["2"]["top"] + maxact["features"]["2"]["quantile_examples"]:
        ex["tokens"] = ["X", " hound", "Y", "Z", "W", "V"]  # feature 2: its request gets a 500
    with ScriptedChat(script) as server:
        out = explain(server.client(), records_of(maxact), None, tmp_path, SHOWN4)
    by = out["2"]
    assert by["0"]["status"] == "ok" and by["0"]["repaired"] is True and by["0"]["label"] == "mentions of dogs"
    assert by["1"]["status"] == "parse_error" and by["1"]["label"] == "" and by["1"]["raw_repair"] == "still rambling"
    assert by["2"]["status"] == "error" and "500" in by["2"]["error"] and by["2"]["label"] == ""
    repair_msgs = [b for b in server.requests if "could not be read" in last_user(b)]
    assert len(repair_msgs) == 2  # one repair each for 0 and 1, none for the failed request
    assert repair_msgs[0]["messages"][-2]["role"] == "assistant"
    assert not (tmp_path / "explanations" / "layers.2_latent_1.txt").exists()


def test_steering_source(tmp_path: Path) -> None:
    steer = tmp_path / "steering"
    steer.mkdir()
    for p, prompt in enumerate(["Once upon a time", "The weather today", "Ignored third prompt"]):
        texts = {"original": "there was a king." + "x" * 400, "-2.0": "nothing.", "4.0": "waves waves sea."}
        (steer / f"generated_texts_layer_2_feature_5_prompt_{p}.json").write_text(json.dumps({"2": {"5": {prompt: texts}}}))
    seen: list[str] = []

    def script(body: dict) -> str:
        seen.append(last_user(body))
        return "SUMMARY: the sea\nDETAILED ANALYSIS: positive strengths add sea words."

    with ScriptedChat(script) as server:
        steered = records_io.read_steering(tmp_path, records_io.Records(layer=2))  # the steered texts
        out = explain(server.client(), steered, [5], tmp_path, ExplainConfig(source="steering"))
    entry = out["2"]["5"]
    assert entry["status"] == "ok" and entry["source"] == "steering" and entry["label"] == "the sea"
    assert "Once upon a time" in seen[0] and "The weather today" in seen[0] and "Ignored third" not in seen[0]
    assert seen[0].index("strength -2.0") < seen[0].index("strength 4.0")
    assert max(len(line) for line in seen[0].splitlines()) < 240  # snippets cut to 200 chars


def test_prefill_is_sent_and_parsed_with_the_reply(tmp_path: Path) -> None:
    def continuation(body: dict) -> str:  # a server that continues the prefill "LABEL:"
        return good(body).removeprefix("LABEL:")

    maxact = make_maxact()
    prompts = load_prompts()
    assert prompts["explain_maxact"].prefill == "LABEL:" and prompts["detection"].prefill == "["
    with ScriptedChat(continuation) as server:
        out = explain(server.client(prefill=True), records_of(maxact), [0], tmp_path, SHOWN4, prompts)
    body = server.requests[0]
    assert body["messages"][-1] == {"role": "assistant", "content": "LABEL:"}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    entry = out["2"]["0"]
    assert entry["status"] == "ok" and entry["label"] == "mentions of dogs"
    assert entry["raw"].startswith("LABEL: mentions of dogs")  # raw is prefill + reply

    with ScriptedChat(good) as server:  # hosted APIs: no prefill message, no vLLM extensions
        explain(server.client(prefill=False), records_of(maxact), [0], tmp_path / "off", SHOWN4, prompts)
    body = server.requests[0]
    assert body["messages"][-1]["role"] == "user" and "continue_final_message" not in body


def test_prefill_repair_turn_carries_the_whole_first_reply(tmp_path: Path) -> None:
    def script(body: dict) -> str:
        if "could not be read" in last_user(body):
            return " dogs\nDESCRIPTION: the word dog."
        return (' This feature is a feature called "Firing of the hand" which is a feature of the language model.'
                " It is a feature of the language model that is called")  # one 40-word line: no label

    with ScriptedChat(script) as server:
        out = explain(server.client(prefill=True), records_of(make_maxact()), [0], tmp_path, SHOWN4)
    first, repair = server.requests
    assert repair["messages"][-1] == {"role": "assistant", "content": "LABEL:"}
    history = repair["messages"][-3]
    assert history["role"] == "assistant" and history["content"].startswith("LABEL: This feature")
    assert [m["role"] for m in repair["messages"]].count("assistant") == 2  # the first prefill is not repeated
    entry = out["2"]["0"]
    assert entry["status"] == "ok" and entry["repaired"] is True and entry["label"] == "dogs"
