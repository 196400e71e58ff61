"""Drop-in outputs for the steering workflow, through the real interpret pipeline on the tiny model.

`stages=[maxact,steering,explain]` leaves a summary CSV whose first columns are the steering
workflow's `layer,feature,label,steering_effect`; labels are `status: success` with the whole reply
in `interpretation`; `stages=[steering,explain]` labels from the steered texts; every run writes
`run_config.json` (resolved config, effective prompts, versions) without the API key.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

import pytest

from saeforge.interpret import records as records_io
from saeforge.pipelines.interpret import interpret
from tests.faults.test_incomplete_stages import HP, continuation, corpus, make_cfg, sae_dir  # noqa: F401 (fixtures)
from tests.interpret.chat_server import ScriptedChat

SECRET = "sk-test-0123456789abcdefghijklmnopqrstuv"


def reply(body: dict) -> str:
    text = json.dumps(body["messages"])
    full = ("SUMMARY: steered towards birds\nDETAILED ANALYSIS: positive strengths add birds." if "DETAILED ANALYSIS" in text
            else "LABEL: words near the feature\nDESCRIPTION: fires on a few tokens.")
    return continuation(body, full)


def demo_module():
    spec = importlib.util.spec_from_file_location("demo", Path(__file__).resolve().parents[2] / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_steering_workflow_outputs(tmp_path, sae_dir, corpus, tiny_lm, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("SAEFORGE_TEST_KEY", SECRET)
    nested = tmp_path / "out" / "prompts.yaml"  # discovered in run.dir, nested (delphi) schema
    nested.parent.mkdir(parents=True)
    nested.write_text("scorers:\n  detection:\n    system: RUN DIR DETECTION PROMPT\n")
    with ScriptedChat(reply) as server:
        cfg = make_cfg(tmp_path, sae_dir, corpus, server.base_url, "interpret.stages=[maxact,steering,explain]",
                       "explainer.api_key_env=SAEFORGE_TEST_KEY", "interpret.steering.file_suffix=run1")
        out = interpret(cfg, lm=tiny_lm)
        rows = records_io.read_summary(out)
        assert rows and list(rows[0])[:4] == ["layer", "feature", "label", "steering_effect"]
        assert all(r["layer"] == "2" and r["label"] == "words near the feature" and r["status"] == "success" for r in rows)
        assert all(re.fullmatch(r"\d\.\d{1,3}", r["steering_effect"]) and r["steering_effect_dedup"] for r in rows)
        assert all(r["top_tokens"].startswith("act: ") for r in rows)
        assert len(list((out / records_io.STEERING_DIR).glob("*_feature_*_run1_prompt_0.json"))) == len(rows)
        doc = json.loads((out / records_io.EXPLANATIONS).read_text())["2"]
        entry = next(iter(doc.values()))
        assert entry["interpretation"] == "LABEL: words near the feature\nDESCRIPTION: fires on a few tokens."
        assert entry["label"] == "words near the feature" and entry["source"] == "maxact"

        demo_module().print_feature_table(out)  # the demo's table, on this small run
        table = capsys.readouterr().out
        assert "top tokens" in table and f"{len(rows)}/{len(rows)} with a top-token description" in table
        assert all(r["top_tokens"][:30] in table for r in rows)
        assert "plumbing" in table and "explainer=vllm" in table and "explainer=openai" in table

        text = (out / records_io.RUN_CONFIG).read_text()
        assert SECRET not in text
        run = json.loads(text)
        assert run["config"]["explainer"]["api_key_env"] == "SAEFORGE_TEST_KEY"  # the name, never the value
        assert run["prompt_file"] == str(nested) and run["prompt_file_origin"] == "run.dir"
        assert run["prompts"]["detection"]["system"] == "RUN DIR DETECTION PROMPT"
        assert run["versions"]["torch"] and run["stages"] == ["maxact", "steering", "explain"]

        # the steering workflow: steering and explain without maxact → labels come from the steered texts
        cfg = make_cfg(tmp_path, sae_dir, corpus, server.base_url, "interpret.stages=[steering,explain]",
                       "interpret.steering.file_suffix=run1")
        interpret(cfg, lm=tiny_lm)
        doc = json.loads((out / records_io.EXPLANATIONS).read_text())["2"]
        assert {e["source"] for e in doc.values()} == {"steering"}
        assert {e["label"] for e in doc.values()} == {"steered towards birds"}
        assert all(e["interpretation"].startswith("SUMMARY: steered towards birds\nDETAILED ANALYSIS:") for e in doc.values())
        assert {r["label"] for r in records_io.read_summary(out)} == {"steered towards birds"}
    assert os.environ["SAEFORGE_TEST_KEY"] == SECRET


def test_bad_prompt_file_fails_validation_before_any_load(tmp_path, monkeypatch):
    from saeforge.config import ConfigError
    from saeforge.pipelines.validate import validate_interpret
    from tests.conftest import compose_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("explainers:\n  default:\n    sytem: typo\n")
    monkeypatch.setenv("PROMPT_CONFIG_FILE", str(bad))
    cfg = compose_config("interpret", [f"ckpt={tmp_path / 'nowhere'}", "logger=none"])
    with pytest.raises(ConfigError, match="prompts: .*unknown prompt explainers.default.sytem"):
        validate_interpret(cfg)
    monkeypatch.setenv("PROMPT_CONFIG_FILE", str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="PROMPT_CONFIG_FILE=.*missing.yaml: no such prompt file"):
        validate_interpret(cfg)
