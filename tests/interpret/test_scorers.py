"""simulation, surprisal and intruder scorers against the scripted chat server with known answers."""

from __future__ import annotations

import asyncio
import csv
import json
import re
from pathlib import Path

import pytest
import torch

from saeforge.config import ConfigError, ScoreConfig
from saeforge.explainers.base import ChatParams
from saeforge.interpret import records as records_io
from saeforge.interpret.prompts import load_prompts
from saeforge.report.dashboard import build_dashboard_data, load_interpret_outputs
from saeforge.interpret.score import (
    expected_activations,
    parse_activations,
    parse_intruder,
    pearson,
    score_records,
    surprisal_auc,
)
from tests.interpret.chat_server import ScriptedChat, example_lines, last_user, records_of

PARAMS = ChatParams(max_tokens=32)
KIND = {0: "dog", 1: "cat", 2: "dog"}


def window(seq: int, i: int, word: str, value: float | None) -> dict:
    """A 4-token window, distinct per (seq, i): "Ex <i> <word> ran"; the word carries `value`."""
    tokens = ["Ex", f" {seq}x{i}", f" {word}", " ran"]
    ex = {"tokens": tokens, "token_ids": list(range(4)), "seq": seq, "start": 0}
    if value is None:
        return ex
    acts = [0.0, 0.1 * i, value, 0.5 * value]  # varied, so only a simulator that knows them is perfect
    return {**ex, "activation": value, "acts": acts, "max_pos": 2}


def maxact(kinds: dict[int, str] = KIND, n: int = 6) -> dict:
    feats = {}
    for f, kind in kinds.items():
        other = "cat" if kind == "dog" else "dog"
        base = 1000 * (f + 1)
        feats[str(f)] = {"a_max": 10.0, "frequency": 0.01,
                         "top": [window(base + i, i, kind, 10.0 - i) for i in range(n)], "quantile_examples": [],
                         "non_activating": [window(base + 500 + i, i, other, None) for i in range(n)]}
    return {"hookpoint": "layers.2", "layer": 2, "d_sae": 16, "features": feats}


def explained(doc: dict, labels: dict[int, str] | None = None) -> records_io.Records:
    labels = labels or {f: f"the word {KIND[f]}" for f in map(int, doc["features"])}
    expl = {"2": {str(f): {"status": "ok", "label": label, "split": {"shown": []}} for f, label in labels.items()}}
    return records_io.explanations_from_json(expl, 2, records_of(doc))


def true_acts(doc: dict) -> dict[tuple[str, ...], list[float]]:
    out = {}
    for entry in doc["features"].values():
        for ex in entry["top"]:
            out[tuple(ex["tokens"])] = ex["acts"]
        for ex in entry["non_activating"]:
            out[tuple(ex["tokens"])] = [0.0] * len(ex["tokens"])
    return out


def token_lines(body: dict) -> tuple[str, ...]:
    return tuple(json.loads(t) for t in re.findall(r"^\d+ (\".*\")$", last_user(body), flags=re.MULTILINE))


def run(client, records, out: Path, cfg: ScoreConfig, features=None) -> dict:
    score_records(client, None, records, features, load_prompts(), PARAMS, out, "layers.2", 2, cfg)
    return {s: {f: records[f].scores.get(s) for f in records.ids()} for s in cfg.scorers}


# ------------------------------------------------------------------------------ parsing
def test_parsers_and_expected_values() -> None:
    assert parse_activations("[0, 3, 10]", 3) == [0, 3, 10] and parse_activations("[0, 11, 1]", 3) is None
    assert parse_activations("0 4 7", 3) == [0, 4, 7] and parse_activations("[1, 2]", 3) is None
    assert parse_activations("[0, 0, 7, 1, 1, 1, 1,", 3) == [0, 0, 7]  # cut off at max_tokens: the first n
    assert parse_activations("[0, 0, 7, 1]", 3) is None  # a closed list of the wrong length
    # one token per number: the expected value over the digit alternatives; "1"+"0" split: the parsed 10
    lp = [{"token": "[", "logprob": 0.0, "top": {}},
          {"token": "2", "logprob": -0.5, "top": {"2": -0.5, "4": -1.0, "x": -0.1}},
          {"token": ", ", "logprob": 0.0, "top": {}},
          {"token": "1", "logprob": -0.1, "top": {"1": -0.1, "9": -3.0}}, {"token": "0", "logprob": 0.0, "top": {}},
          {"token": "]", "logprob": 0.0, "top": {}}]
    ev = expected_activations(lp, [2, 10])
    p2, p4 = 2.718281828 ** -0.5, 2.718281828 ** -1.0
    assert ev[0] == pytest.approx((2 * p2 + 4 * p4) / (p2 + p4)) and ev[1] == 10.0
    assert expected_activations(lp, [3, 10]) is None  # generated numbers do not match the parse
    assert pearson([0, 1, 2], [0, 2, 4]) == pytest.approx(1.0) and pearson([0, 1, 2], [5, 5, 5]) == 0.0
    assert parse_intruder("The intruder is example 3.", 5) == 3 and parse_intruder("example 9", 5) is None
    # known losses: reductions [1, -1] (activating) vs [-0.5, 1]: 1 > -0.5, 1 = 1 (½), -1 loses twice
    assert surprisal_auc([True, True, False, False], [2, 2, 2, 2], [1, 3, 2.5, 1]) == 0.375
    assert ScoreConfig(scorers=["simulation", "surprisal", "intruder"]).scorers == ("simulation", "surprisal", "intruder")
    with pytest.raises(ConfigError, match="intruder_source"):
        ScoreConfig(intruder_source="random")


# ------------------------------------------------------------------------------ simulation
def test_simulation_perfect_scores_one_constant_scores_zero(tmp_path: Path) -> None:
    doc = maxact()
    acts = true_acts(doc)

    def perfect(body: dict) -> str:
        return "[" + ", ".join(str(round(a)) for a in acts[token_lines(body)]) + "]"

    def constant(body: dict) -> str:
        return "[" + ", ".join("0" for _ in token_lines(body)) + "]"

    cfg = ScoreConfig(scorers=["simulation"], seed=0, n_test=4, n_negatives=4)
    with ScriptedChat(perfect) as server:
        res = run(server.client(), explained(doc), tmp_path, cfg)["simulation"]
    bodies = server.requests
    assert len(bodies) == 3 * 8 * 2  # one request per example, own + baseline label
    assert all(b["logprobs"] and b["top_logprobs"] >= 11 for b in bodies)
    for f in (0, 1, 2):
        r = res[f]
        assert r["correlation"] > 0.99 and r["correlation_activating"] > 0.99, r
        assert r["n"] == 8 and r["n_tokens"] == 32 and r["n_unparsed"] == 0 and r["n_expected"] == 8
        assert r["baseline"]["feature"] != f
    with ScriptedChat(constant) as server:
        res0 = run(server.client(), explained(doc), tmp_path, cfg)["simulation"]
    assert all(res0[f]["correlation"] == pytest.approx(0.0, abs=1e-9) for f in (0, 1, 2))
    # outputs like detection/fuzz: scores json, per-latent txt, summary column + baseline
    sim = json.loads((tmp_path / "scores" / "simulation.json").read_text())
    assert set(sim) == {"format_version", "0", "1", "2"} and "examples" not in sim["0"]
    rows = json.loads((tmp_path / "scores" / "simulation" / "layers.2_latent_0.txt").read_text())
    assert len(rows) == 8 and {"tokens", "acts", "prediction", "expected"} <= set(rows[0])
    with (tmp_path / "summary.csv").open() as fh:
        table = {r["feature"]: r for r in csv.DictReader(fh)}
    assert float(table["0"]["simulation"]) == pytest.approx(0.0, abs=1e-9) and table["0"]["simulation_baseline"] != ""
    data = build_dashboard_data(load_interpret_outputs(tmp_path))
    assert all(f["headline"]["simulation"][0] == "correlation" for f in data["features"])

    with ScriptedChat(lambda body: "[1, 2") as server:  # unparseable: no headline, never a count
        run(server.client(), explained(doc), tmp_path, cfg)
    data = build_dashboard_data(load_interpret_outputs(tmp_path))
    assert all("simulation" not in f.get("headline", {}) for f in data["features"])


# ------------------------------------------------------------------------------ intruder
def oracle_intruder(body: dict) -> str:
    """The example whose animal word differs from the others'."""
    words = [re.search(r" (dog|cat) ", line).group(1) for line in example_lines(body)]
    odd = next(i for i, w in enumerate(words, 1) if words.count(w) == 1)
    return f" {odd}."


@pytest.mark.parametrize("source", ["non_activating", "other_feature"])
def test_intruder_oracle_finds_every_intruder(tmp_path: Path, source: str) -> None:
    doc = maxact({0: "dog", 1: "cat"})
    records = explained(doc)
    records[1].explanation.status = "parse_error"  # label-free: scored all the same
    cfg = ScoreConfig(scorers=["intruder"], seed=0, n_intruder=6, intruder_examples=3, intruder_source=source)
    with ScriptedChat(oracle_intruder) as server:
        res = run(server.client(), records, tmp_path, cfg)["intruder"]
    assert len(server.requests) == 2 * 6
    positions = set()
    for f in (0, 1):
        r = res[f]
        assert r["accuracy"] == 1.0 and r["chance"] == 0.25 and r["n"] == 6 and r["source"] == source
    rows = json.loads((tmp_path / "scores" / "intruder" / "layers.2_latent_1.txt").read_text())
    positions = {row["intruder"] for row in rows}
    assert len(positions) > 1 and all(row["correct"] for row in rows)
    with (tmp_path / "summary.csv").open() as fh:
        table = {r["feature"]: r for r in csv.DictReader(fh)}
    assert table["1"]["label"] == "" and table["1"]["intruder"] == "1" and table["1"]["intruder_chance"] == "0.25"
    data = build_dashboard_data(load_interpret_outputs(tmp_path))
    assert "intruder" in data["meta"]["scorers"]
    assert {f["id"]: f["headline"]["intruder"] for f in data["features"]} == {0: ["accuracy", 1.0], 1: ["accuracy", 1.0]}

    with ScriptedChat(lambda body: " 1") as server:  # always the first: about chance
        res1 = run(server.client(), explained(doc), tmp_path, cfg)["intruder"]
    assert 0.0 <= res1[0]["accuracy"] < 1.0


# ------------------------------------------------------------------------------ surprisal
def known_logprobs(prompt: str, offsets: list[int], tokens: list[str]) -> list[float]:
    """-1 per token; an animal word costs -3, or -0.5 when the context names it ("the word dog")."""
    named = re.search(r"example of: the word (\w+)", prompt)
    out = []
    for tok in tokens:
        word = tok.strip()
        if word in ("dog", "cat"):
            out.append(-0.5 if named and named.group(1) == word else -3.0)
        else:
            out.append(-1.0)
    return out


def test_surprisal_auc_from_known_losses(tmp_path: Path) -> None:
    doc = maxact({0: "dog", 1: "cat"})
    cfg = ScoreConfig(scorers=["surprisal"], seed=0, n_test=4, n_negatives=4)
    with ScriptedChat(lambda body: 400, prompt_logprobs=known_logprobs) as server:
        res = run(server.client(), explained(doc), tmp_path, cfg)["surprisal"]
    bodies = server.requests
    assert bodies and all(b["echo"] and b["logprobs"] == 0 and "prompt" in b for b in bodies)
    # one request per distinct (context, example): 16 examples × (plain, own label, baseline label)
    assert len(bodies) == 16 * 3
    r = res[0]
    assert r["auc"] == 1.0 and r["n"] == 8 and r["n_errors"] == 0
    assert r["reduction_activating"] == pytest.approx(2.5 / 4) and r["reduction_non_activating"] == 0.0
    assert r["baseline"]["auc"] == 0.0 and r["baseline"]["feature"] == 1  # "the word cat" helps the negatives only
    rows = json.loads((tmp_path / "scores" / "surprisal" / "layers.2_latent_0.txt").read_text())
    act = [row for row in rows if row["activating"]][0]
    assert act["loss_plain"] == pytest.approx((1 + 1 + 3 + 1) / 4) and act["loss_explained"] == pytest.approx(3.5 / 4)
    with (tmp_path / "summary.csv").open() as fh:
        table = {row["feature"]: row for row in csv.DictReader(fh)}
    assert table["0"]["surprisal"] == "1" and table["0"]["surprisal_baseline"] == "0"


def test_surprisal_without_prompt_logprobs_is_a_clear_error(tmp_path: Path) -> None:
    doc = maxact({0: "dog", 1: "cat"})
    cfg = ScoreConfig(scorers=["surprisal"], seed=0, n_test=2, n_negatives=2)
    with ScriptedChat(lambda body: 400) as server:  # chat-only: the completions endpoint answers 404
        res = run(server.client(), explained(doc), tmp_path, cfg)["surprisal"]
    assert res[0]["n"] == 0 and res[0]["n_errors"] == 4 and "echo + logprobs" in res[0]["error"]

    class ChatOnly:
        supports_prefill = False

        async def chat(self, messages, params): ...

        async def chat_many(self, requests, progress=True): ...

    with pytest.raises(ValueError, match="needs prompt logprobs.*explainer.kind=local"):
        run(ChatOnly(), explained(doc), tmp_path, cfg)


def test_local_client_continuation_logprobs_match_a_forward_pass() -> None:
    from saeforge.explainers.local import LocalChatClient
    from saeforge.lm.tiny import build_tiny_lm

    model, tok = build_tiny_lm({"num_hidden_layers": 2})
    model.eval()
    client = LocalChatClient(model, tok, max_batch=2)
    pairs = [("The history of", " the United States"), ("A surgeon must", " wash his hands"), ("The", " fox")]
    results = asyncio.run(client.continuation_logprobs_many(pairs, progress=False))
    for (context, cont), result in zip(pairs, results):
        ctx = tok(context)["input_ids"]
        ids = ctx + tok(cont, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = model(input_ids=torch.tensor([ids])).logits.float().log_softmax(-1)[0]
        want = [lp[i - 1, ids[i]].item() for i in range(len(ctx), len(ids))]
        assert result.ok and [t["logprob"] for t in result.logprobs] == pytest.approx(want, abs=1e-4)
        assert "".join(t["token"] for t in result.logprobs) == cont


def test_new_scorers_compose_from_the_command_line_and_surprisal_refuses_hosted_apis() -> None:
    from saeforge.pipelines.validate import validate_interpret
    from tests.conftest import compose_config

    cfg = compose_config("interpret", ["ckpt=x", "explainer=vllm", "interpret.score.scorers=[simulation,surprisal,intruder]",
                                       "interpret.score.intruder_source=other_feature"])
    settings = validate_interpret(cfg)
    assert settings.interpret.score.scorers == ("simulation", "surprisal", "intruder")
    with pytest.raises(ConfigError, match="surprisal needs prompt logprobs, which openrouter.ai"):
        validate_interpret(compose_config("interpret", ["ckpt=x", "explainer=openrouter", "interpret.score.scorers=[surprisal]"]))
    validate_interpret(compose_config("interpret", ["ckpt=x", "explainer=openrouter", "interpret.score.scorers=[intruder]"]))
