"""A planted API key must not reach any file a run writes, nor any message (issue 11, item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.faults.entry import interpret_args, run, train_args
from tests.interpret.chat_server import ScriptedChat

KEY = "sk-FAKE0123456789abcdefSECRET"


def answer(body: dict) -> str:
    prefill = body["messages"][-1]["content"] if body["messages"][-1]["role"] == "assistant" else ""
    reply = "LABEL: words near the feature\nDESCRIPTION: fires on a few tokens."
    return reply.removeprefix(prefill)


def hits(root: Path, needle: str) -> list[str]:
    """Every file under `root` that holds `needle` (plain bytes or inside a W&B record)."""
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes())


@pytest.mark.parametrize("script, override", [
    ("interpret.py", f"+explainer.api_key={KEY}"),
    ("interpret.py", f"explainer.api_key_env={KEY}"),
    ("interpret.py", f"explainer.api_key={KEY}"),
    ("train.py", f"+explainer.api_key={KEY}"),
    ("evaluate.py", f"+logger.token={KEY}"),
])
def test_secret_on_the_command_line_is_refused_before_anything_is_written(tmp_path, script, override):
    args = [script, f"ckpt={tmp_path / 'R'}", "logger=wandb", override] if script != "train.py" else \
        [a for a in train_args(tmp_path, "R") if a != "logger=none"] + ["logger=wandb", override]
    done = run(args, tmp_path, expect=None, WANDB_MODE="offline")
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "api_key_env" in lines[0], done.stderr[-2000:]
    assert KEY not in done.stdout + done.stderr and KEY[8:] not in done.stdout + done.stderr
    assert hits(tmp_path, KEY[3:]) == []


def test_key_pasted_into_api_key_env_in_a_config_is_refused_masked():
    from saeforge.config import ConfigError, ExplainerConfig

    with pytest.raises(ConfigError) as err:
        ExplainerConfig(kind="openai", base_url="http://x/v1", model="m", api_key_env=KEY)
    assert KEY not in str(err.value) and "sk-***" in str(err.value)
    ExplainerConfig(kind="openai", base_url="http://x/v1", model="m", api_key_env="OPENROUTER_API_KEY")


def test_argv_is_scrubbed_before_wandb(monkeypatch):
    import sys

    from saeforge.pipelines.run import scrub_argv

    monkeypatch.setattr(sys, "argv", ["interpret.py", f"+x.api_key={KEY}", "a=1", f"b=Bearer {KEY}", "run.dir=/tmp/r"])
    scrub_argv()
    assert sys.argv == ["interpret.py", "+x.api_key=sk-***", "a=1", "b=Bea***", "run.dir=/tmp/r"]


@pytest.mark.slow
def test_key_in_the_named_environment_variable_reaches_the_server_and_no_file(tmp_path):
    run(train_args(tmp_path, "R", "trainer.max_steps=4"), tmp_path)
    with ScriptedChat(answer) as server:
        args = [a for a in interpret_args(tmp_path, "R") if a != "logger=none"] + [
            "logger=wandb", "explainer=vllm", f"explainer.base_url={server.base_url}", "explainer.model=scripted",
            "explainer.max_retries=0", "explainer.api_key_env=SAEFORGE_TEST_EXPLAINER_KEY",
            f"explainer.cache_dir={tmp_path / 'llm-cache'}", "interpret.stages=[maxact,explain]",
            "interpret.max_latents=2"]
        run(args, tmp_path, SAEFORGE_TEST_EXPLAINER_KEY=KEY, WANDB_MODE="offline")
        assert server.seen and all(seen.authorization == f"Bearer {KEY}" for seen in server.seen)
    explanations = json.loads((tmp_path / "R" / "interpret" / "layers.2" / "explanations.json").read_text())
    assert "words near the feature" in json.dumps(explanations)
    assert list((tmp_path / "R").rglob("*.wandb")), "no W&B run file was written"
    assert hits(tmp_path, KEY) == [] and hits(tmp_path, KEY[3:]) == []
