"""Stages that end with failed features are not "done": the real interpret pipeline on the tiny model.

An exported random TopK SAE at layers.2 of the tiny LM, windows packed from a small local text
file, and a scripted OpenAI-compatible explainer on 127.0.0.1 (tests/chat_completions_server.py)
or a closed port. Checks: a dead explainer fails fast with a summary naming the URL and the count
(nonzero exit of `python interpret.py`, `IncompleteStages` in-process, exit 0 with
`interpret.allow_partial=true`); a rerun asks only the failed features and completes; a steering
run killed between the texts and the effects file gets the same KL as an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from saeforge.interpret import records as records_io
from saeforge.pipelines.interpret import EXIT_INCOMPLETE, IncompleteStages, interpret
from saeforge.sae.formats import write_saelens
from saeforge.sae.model import SAEConfig, SparseAutoencoder
from tests.chat_completions_server import ChatCompletionsServer, Reply
from tests.conftest import ROOT, compose_config

HP = "layers.2"
LABEL = "LABEL: words near the feature\nDESCRIPTION: fires on a few tokens in the tiny corpus."
RAMBLING = "LABEL:" + " and so on" * 10  # a 30-word label: a parse error, also after the repair turn


def closed_port_url() -> str:
    with ChatCompletionsServer() as server:
        return server.base_url  # nothing listens there once the server is closed


def continuation(body: dict, full: str) -> str:
    """The reply after the assistant prefill the client sends (explainer=vllm: prefill on)."""
    last = body["messages"][-1]
    prefill = last["content"] if last["role"] == "assistant" else ""
    return full.removeprefix(prefill)


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=16, k=4, architecture="topk"))
    return write_saelens(sae, tmp_path_factory.mktemp("sae") / "sae", hook_name=HP, hook_layer=2, model_name="tiny-llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    words = ["the", "dog", "ran", "to", "the", "park", "while", "a", "cat", "sat", "on", "the", "mat", "and",
             "watched", "birds", "fly", "over", "old", "houses"]
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(60)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_cfg(tmp: Path, sae_dir: Path, corpus: Path, base_url: str, *extra: str):
    prompts = tmp / "prompts.txt"
    prompts.write_text("The dog ran to the park\nA cat sat on the mat\n", encoding="utf-8")
    cfg = compose_config("interpret", [
        f"ckpt={sae_dir}", "model=tiny", "corpus=files", f"corpus.data_files=[{corpus}]", "logger=none",
        f"run.dir={tmp / 'out'}", "explainer=vllm", f"explainer.base_url={base_url}", "explainer.model=scripted",
        "explainer.cache_dir=null", "interpret.max_latents=6", "interpret.n_tokens=2048", "interpret.ctx_len=32",
        f"interpret.steering.prompts_file={prompts}", "interpret.steering.max_new_tokens=4",
        "interpret.steering.strengths=[-1.0,2.0]", "interpret.score.scorers=[detection]", "interpret.score.n_test=5",
        "interpret.score.n_negatives=5", *extra,
    ])
    OmegaConf.resolve(cfg)
    return cfg


def stages_json(tmp: Path) -> dict:
    return records_io.read_stages(tmp / "out" / "interpret" / HP)


def explanations(tmp: Path) -> dict:
    return json.loads((tmp / "out" / "interpret" / HP / records_io.EXPLANATIONS).read_text())["2"]


def test_dead_explainer_raises_with_the_url_and_the_count_fast(tmp_path, sae_dir, corpus, tiny_lm):
    url = closed_port_url()
    cfg = make_cfg(tmp_path, sae_dir, corpus, url, "interpret.stages=[maxact,explain,score]")
    start = time.monotonic()
    with pytest.raises(IncompleteStages) as info:
        interpret(cfg, lm=tiny_lm)
    # default explainer.max_retries=5 (1 s backoff doubling): ~31 s of retries without the fail-fast
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert f"explain: 6/6 failed: {url}: server unreachable (connection refused)" in message, message
    record = stages_json(tmp_path)
    assert record["explain"]["complete"] is False
    failed = sorted(f for features in record["explain"]["failures"].values() for f in features)
    assert failed == sorted(int(f) for f in explanations(tmp_path))
    assert {e["status"] for e in explanations(tmp_path).values()} == {"error"}
    assert record["maxact"].get("complete", True) and "complete" not in record["score"]  # nothing to score: complete


def test_allow_partial_exits_normally_but_reports(tmp_path, sae_dir, corpus, tiny_lm, capsys):
    url = closed_port_url()
    cfg = make_cfg(tmp_path, sae_dir, corpus, url, "interpret.stages=[maxact,explain]", "interpret.allow_partial=true")
    out = interpret(cfg, lm=tiny_lm)
    printed = capsys.readouterr().out
    assert f"explain: 6/6 failed: {url}: server unreachable (connection refused)" in printed and "allow_partial" in printed
    assert out == tmp_path / "out" / "interpret" / HP
    record = stages_json(tmp_path)
    assert record["explain"]["complete"] is False
    for stage in ("maxact", "explain"):  # stamped when the stage began and when it (and its checks) ended
        started, finished = (datetime.fromisoformat(record[stage][k]).timestamp() for k in ("started", "finished"))
        written = (out / records_io.stage_output(stage)).stat().st_mtime
        assert started < finished and started - 0.05 <= written <= finished + 0.002, (stage, record[stage], written)
    assert record["maxact"]["finished"] <= record["explain"]["started"]


def test_rerun_asks_only_failed_features_and_completes(tmp_path, sae_dir, corpus, tiny_lm):
    phase = {"n": 1}

    def script(n: int, body: dict) -> Reply:
        repair = any(m["role"] == "assistant" and "and so on" in m["content"] for m in body["messages"])
        if phase["n"] == 1 and n in (0, 1):
            return Reply(500)  # request errors: retryable
        if repair or (phase["n"] == 1 and n == 2):
            return Reply(text=continuation(body, RAMBLING))  # parse_error after the repair: final
        return Reply(text=continuation(body, LABEL))

    with ChatCompletionsServer(script) as server:
        cfg = make_cfg(tmp_path, sae_dir, corpus, server.base_url, "interpret.stages=[maxact,explain]",
                       "explainer.max_retries=0")
        with pytest.raises(IncompleteStages, match=r"explain: 2/6 failed: .*HTTP 500"):
            interpret(cfg, lm=tiny_lm)
        first = explanations(tmp_path)
        assert sorted(e["status"] for e in first.values()) == ["error", "error", "parse_error", "success", "success", "success"]
        assert len(server.seen) == 7  # 6 features + 1 repair turn
        failed = {f for f, e in first.items() if e["status"] == "error"}

        phase["n"] = 2
        interpret(cfg, lm=tiny_lm)  # same settings, server healthy: completes, no exception
        assert len(server.seen) == 7 + 2  # only the two failed features are asked again
        second = explanations(tmp_path)
        assert {f for f, e in second.items() if e["status"] == "success"} == {f for f, e in first.items() if e["status"] == "success"} | failed
        assert [e for e in second.values() if e["status"] == "parse_error"] == [e for e in first.values() if e["status"] == "parse_error"]
        assert all(second[f] == first[f] for f in first if f not in failed)
        assert "complete" not in stages_json(tmp_path)["explain"]

        interpret(cfg, lm=tiny_lm)  # now up to date
        assert len(server.seen) == 9


def test_dead_explainer_exits_nonzero_from_the_entry_script(tmp_path, sae_dir, corpus):
    url = closed_port_url()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The dog ran to the park\n", encoding="utf-8")
    args = [sys.executable, "interpret.py", f"ckpt={sae_dir}", "model=tiny", "corpus=files",
            f"corpus.data_files=[{corpus}]", "logger=none", f"run.dir={tmp_path / 'out'}", "explainer=vllm",
            f"explainer.base_url={url}", "explainer.model=scripted", "explainer.cache_dir=null",
            "interpret.max_latents=6", "interpret.n_tokens=2048", "interpret.ctx_len=32",
            "interpret.stages=[maxact,explain]", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(args, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == EXIT_INCOMPLETE, (done.stdout + done.stderr)[-4000:]
    assert f"explain: 6/6 failed: {url}: server unreachable (connection refused)" in done.stdout, (done.stdout + done.stderr)[-4000:]


def test_steering_killed_before_the_effects_gets_the_same_kl(tmp_path, sae_dir, corpus, tiny_lm):
    cfg = make_cfg(tmp_path, sae_dir, corpus, closed_port_url(), "interpret.stages=[maxact,steering]")
    out = interpret(cfg, lm=tiny_lm)
    effects_path = out / records_io.EFFECTS
    uninterrupted = json.loads(effects_path.read_text())
    features = [k for k in uninterrupted if k.isdigit()]
    assert len(features) >= 2 and all(uninterrupted[f]["steering_kl"] is not None for f in features)
    texts = {p.name: p.read_text() for p in (out / records_io.STEERING_DIR).glob("generated_texts_*.json")}

    # the kill: the texts of the last feature are written, its effects entry and the stage's record are not
    killed = features[-1]
    effects = dict(uninterrupted)
    del effects[killed]
    effects_path.write_text(json.dumps(effects))
    record = records_io.read_stages(out)
    del record["steering"]
    records_io.write_stages(out, record)

    interpret(cfg, lm=tiny_lm)
    resumed = json.loads(effects_path.read_text())
    assert resumed[killed]["steering_kl"] == pytest.approx(uninterrupted[killed]["steering_kl"], rel=1e-5)
    assert set(resumed) == set(uninterrupted)
    for f in features:
        assert resumed[f] == pytest.approx(uninterrupted[f], rel=1e-5), f
    assert {p.name: p.read_text() for p in (out / records_io.STEERING_DIR).glob("generated_texts_*.json")} == texts


def scorer_reply(body: dict) -> str:
    from tests.interpret.chat_server import example_lines

    lines = example_lines(body) or ["x"]
    return continuation(body, "[" + ", ".join("1" if " dog" in line else "0" for line in lines) + "]")


def is_explain(body: dict) -> bool:
    return "LABEL" in json.dumps(body["messages"])


def scored(tmp: Path) -> list[int]:
    """Features with a detection result (its headline may be blank: one class absent on a random SAE)."""
    return records_io.read_scores(tmp / "out" / "interpret" / HP, ["detection"]).ids()


def labelled(n: int) -> str:
    return LABEL.replace("the feature", f"feature number {n}")  # distinct labels: distinct baseline requests


def test_score_waits_for_explain_to_complete(tmp_path, sae_dir, corpus, tiny_lm):
    phase = {"n": 1, "explain": 0}

    def script(n: int, body: dict) -> Reply:
        if is_explain(body):
            phase["explain"] += 1
            if phase["n"] == 1 and phase["explain"] <= 2:
                return Reply(500)
            return Reply(text=continuation(body, LABEL))
        return Reply(text=scorer_reply(body))

    with ChatCompletionsServer(script) as server:
        cfg = make_cfg(tmp_path, sae_dir, corpus, server.base_url, "interpret.stages=[maxact,explain,score]",
                       "explainer.max_retries=0")
        with pytest.raises(IncompleteStages, match=r"explain: 2/6 failed"):
            interpret(cfg, lm=tiny_lm)
        ok = [int(f) for f, e in explanations(tmp_path).items() if e["status"] == "success"]
        assert len(ok) == 4 and scored(tmp_path) == sorted(ok)  # the labelled features are scored
        phase["n"] = 2
        interpret(cfg, lm=tiny_lm)  # explain completes, so score (which read partial labels) reruns
    assert len(scored(tmp_path)) == 6
    record = stages_json(tmp_path)
    assert "complete" not in record["explain"] and "complete" not in record["score"]


def test_score_request_errors_are_retried(tmp_path, sae_dir, corpus, tiny_lm):
    phase = {"n": 1}
    failed: list[dict] = []

    def script(n: int, body: dict) -> Reply:
        if is_explain(body):
            return Reply(text=continuation(body, labelled(n)))
        if phase["n"] == 1 and n % 3 == 0:
            failed.append(body)
            return Reply(500)
        return Reply(text=scorer_reply(body))

    with ChatCompletionsServer(script) as server:
        cfg = make_cfg(tmp_path, sae_dir, corpus, server.base_url, "interpret.stages=[maxact,explain,score]",
                       "explainer.max_retries=0", f"explainer.cache_dir={tmp_path / 'llm-cache'}")
        with pytest.raises(IncompleteStages, match=r"score: \d/6 failed: detection: .*HTTP 500") as info:
            interpret(cfg, lm=tiny_lm)
        assert server.base_url in str(info.value)
        before = len(server.seen)
        phase["n"] = 2
        interpret(cfg, lm=tiny_lm)
        again = [seen.body for seen in server.seen[before:]]
        assert again and all(body in failed for body in again)  # the cache answers every batch that succeeded
    assert len(scored(tmp_path)) == 6 and "complete" not in stages_json(tmp_path)["score"]
    results = records_io.read_scores(tmp_path / "out" / "interpret" / HP, ["detection"])
    assert all(results[f].scores["detection"]["n_errors"] == 0 for f in results.ids())
