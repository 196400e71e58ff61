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
    assert parse_reply("LABEL: dogs\nDESCRIPTION: the word dog.", "maxact") == {"label": "dogs", "description": "the word dog."}
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
    assert s == {"label": "sea words", "description": "positive adds waves."}


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
        assert e0["status"] == "success" and e0["label"] == "mentions of dogs" and e0["source"] == "maxact"
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
    assert by["0"]["status"] == "success" and by["0"]["repaired"] is True and by["0"]["label"] == "mentions of dogs"
    assert by["1"]["status"] == "parse_error" and by["1"]["label"] == "" and by["1"]["repair_reply"] == "still rambling"
    assert by["1"]["interpretation"] == "I think it is about animals, maybe."  # the whole (first) reply
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
    assert entry["status"] == "success" and entry["source"] == "steering" and entry["label"] == "the sea"
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
    assert entry["status"] == "success" and entry["label"] == "mentions of dogs"
    # the whole reply (prefill + continuation) in `interpretation`, the parsed label and description beside it
    assert entry["interpretation"] == good(body) and entry["description"].startswith("Fires on the word dog")

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
    assert entry["status"] == "success" and entry["repaired"] is True and entry["label"] == "dogs"


NESTED = """\
explainers:
  default:
    system: |
      You study finance features.
      {prompt}
    system_contrastive: CONTRASTIVE SYSTEM
    system_single_token: SINGLE TOKEN SYSTEM
    cot: think step by step
  np_max_act:
    system_concise: be concise
scorers:
  detection:
    system: DETECTION SYSTEM
  fuzz:
    system: FUZZ SYSTEM
"""


def test_nested_prompt_schema_loads_like_the_flat_one(tmp_path: Path) -> None:
    default = load_prompts()
    nested = tmp_path / "nested.yaml"
    nested.write_text(NESTED)
    merged = load_prompts(nested)
    assert merged["explain_contrastive"].system == "CONTRASTIVE SYSTEM"
    assert merged["explain_single_token"].system == "SINGLE TOKEN SYSTEM"
    assert merged["detection"].system == "DETECTION SYSTEM" and merged["fuzz"].system == "FUZZ SYSTEM"
    assert merged["detection"].user == default["detection"].user and merged["explain_steering"] == default["explain_steering"]
    # delphi's system prompt carries {prompt}: the examples are shown once, in the system message
    msgs = merged["explain_maxact"].messages("EXAMPLES")
    assert msgs[0]["content"].startswith("You study finance features.\nEXAMPLES")
    assert "EXAMPLES" not in msgs[1]["content"] and "LABEL" in msgs[1]["content"]
    # the same override in the flat schema gives the same prompts
    flat = tmp_path / "flat.yaml"
    flat.write_text(json.dumps({"explain_contrastive": {"system": "CONTRASTIVE SYSTEM"},
                                "explain_single_token": {"system": "SINGLE TOKEN SYSTEM"},
                                "detection": {"system": "DETECTION SYSTEM"}, "fuzz": {"system": "FUZZ SYSTEM"},
                                "explain_maxact": {"system": "You study finance features.\n{prompt}\n"}}))
    assert load_prompts(flat) == merged
    nested.write_text("explainers:\n  default:\n    sytem: typo\n")
    with pytest.raises(ValueError, match="unknown prompt explainers.default.sytem"):
        load_prompts(nested)
    nested.write_text("scorers:\n  detecton:\n    system: typo\n")
    with pytest.raises(ValueError, match="unknown prompt 'detecton'"):
        load_prompts(nested)


def test_prompt_file_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from saeforge.interpret.prompts import PROMPT_FILE_ENV, resolve_prompt_file

    run_dir, env_file, cfg_file = tmp_path / "run", tmp_path / "env.yaml", tmp_path / "cfg.yaml"
    run_dir.mkdir()
    monkeypatch.delenv(PROMPT_FILE_ENV, raising=False)
    assert resolve_prompt_file(None, run_dir) == (None, "default")
    (run_dir / "prompts.yaml").write_text("fuzz:\n  system: RUN\n")
    assert resolve_prompt_file(None, run_dir) == (run_dir / "prompts.yaml", "run.dir")
    env_file.write_text("fuzz:\n  system: ENV\n")
    monkeypatch.setenv(PROMPT_FILE_ENV, str(env_file))
    assert resolve_prompt_file("", run_dir) == (env_file, PROMPT_FILE_ENV)
    assert resolve_prompt_file(str(cfg_file), run_dir) == (cfg_file, "prompts.override")
    monkeypatch.setenv(PROMPT_FILE_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(FileNotFoundError, match=PROMPT_FILE_ENV):
        resolve_prompt_file(None, run_dir)


@pytest.mark.parametrize("label", ["The Feature", "The LABEL", "The feature is a feature of the language model",
                                   "The {label}", "a pattern", "Find what the marked tokens and their contexts have in common"])
def test_generic_labels_get_status_generic(tmp_path: Path, label: str) -> None:
    with ScriptedChat(lambda body: f"LABEL: {label}\nDESCRIPTION: something.") as server:
        out = explain(server.client(), records_of(make_maxact({0: "dog"})), [0], tmp_path, SHOWN4)
    entry = out["2"]["0"]
    assert entry["status"] == "generic" and entry["label"] == label
    assert not (tmp_path / "explanations" / "layers.2_latent_0.txt").exists()  # not a label to use
    assert records_io.read_explanations(tmp_path, 2).features[0].label == ""  # never scored


def test_specific_labels_are_not_generic() -> None:
    from saeforge.interpret.describe import is_generic_label

    for label in ("mentions of dogs", "the words left and right", "feature flags in code"):
        assert not is_generic_label(label, load_prompts()["explain_maxact"].system)


def test_contrastive_strategy_shows_held_out_non_activating_examples(tmp_path: Path) -> None:
    maxact = make_maxact({0: "dog"})
    cfg = ExplainConfig(n_shown=4, strategy="contrastive", n_contrastive=3)
    with ScriptedChat(good) as server:
        out = explain(server.client(), records_of(maxact), [0], tmp_path, cfg)
    prompt = last_user(server.requests[0])
    assert server.requests[0]["messages"][0]["content"] == load_prompts()["explain_contrastive"].system
    assert prompt.index("Activating examples:") < prompt.index("Non-activating examples")
    non_part = prompt[prompt.index("Non-activating examples"):]
    assert non_part.count("Example ") == 3 and "<<" not in non_part and " cat" in non_part
    entry = out["2"]["0"]
    assert entry["status"] == "success" and entry["strategy"] == "contrastive"
    # the scorer's rebuilt split leaves the shown negatives out
    split = split_examples(maxact["features"]["0"], 0, shown=entry["split"]["shown"])
    assert len(split.shown_non_activating) == 3 and len(split.non_activating) == 8 - 3
    assert not {example_key(e) for e in split.shown_non_activating} & {example_key(e) for e in split.non_activating}


def test_single_token_strategy_lists_peak_tokens(tmp_path: Path) -> None:
    cfg = ExplainConfig(n_shown=4, strategy="single_token")
    with ScriptedChat(good) as server:
        out = explain(server.client(), records_of(make_maxact({0: "dog"})), [0], tmp_path, cfg)
    prompt = last_user(server.requests[0])
    assert server.requests[0]["messages"][0]["content"] == load_prompts()["explain_single_token"].system
    assert prompt.startswith("Tokens where the examples peak") and '"dog": 4, ' in prompt
    assert prompt.index('"dog": 4') < prompt.index("Example 1:")
    assert out["2"]["0"]["status"] == "success"
