"""train.py → interpret.py → evaluate.py through the real entry scripts (subprocess, Hydra overrides).

The explainer is a scripted OpenAI-compatible server on 127.0.0.1 (real sockets): it labels every
feature and answers detection/fuzz prompts by marking examples that contain the `<<` highlight.
"""

from __future__ import annotations

import csv
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.interpret.chat_server import ScriptedChat, example_lines

ROOT = Path(__file__).resolve().parents[1]
HP = "layers.2"


def answer(body: dict) -> str:
    """Continue the assistant prefill the client sends (vllm explainer config: prefill on)."""
    prefill = body["messages"][-1]["content"] if body["messages"][-1]["role"] == "assistant" else ""
    if "LABEL" in json.dumps(body["messages"]):
        reply = "LABEL: words near the feature\nDESCRIPTION: fires on a few tokens in the tiny corpus."
    else:
        lines = example_lines(body) or ["x"] * 5
        reply = "[" + ", ".join("1" if "<<" in line else "0" for line in lines) + "]"
    assert reply.startswith(prefill), (prefill, reply)
    return reply[len(prefill):]


def run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAEFORGE_CACHE": os.environ.get("SAEFORGE_TEST_CACHE", "/tmp/saeforge-test-cache")}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def train_args(tmp: Path) -> list[str]:
    return ["train.py", "model=tiny", "logger=none", f"run.dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}",
            f"data.hookpoint={HP}", "data.n_tokens=16384", "data.ctx_len=64", "data.batch_size=256",
            "data.shuffle_buffer=2048", "data.read_rows=1024", "sae.expansion_factor=4", "sae.k=8",
            "checkpoint_every_n_steps=20", "trainer.enable_progress_bar=false", "interpret_callback.every_n_steps=25"]


def interpret_args(tmp: Path, base_url: str, *extra: str) -> list[str]:
    return ["interpret.py", f"ckpt={tmp / 'run'}", "logger=none", "explainer=vllm", f"explainer.base_url={base_url}",
            "explainer.model=scripted", "explainer.max_retries=0", f"explainer.cache_dir={tmp / 'llm-cache'}",
            "interpret.max_latents=6", "interpret.n_tokens=4096", "interpret.steering.max_new_tokens=6",
            "interpret.score.scorers=[detection,fuzz]", "interpret.score.n_test=5", "interpret.score.n_negatives=5", *extra]


@pytest.mark.slow
def test_train_interpret_evaluate_end_to_end(tmp_path):
    run(train_args(tmp_path))
    steps = sorted((tmp_path / "run" / "interpret_steps").glob("step-*"))
    assert steps and (steps[0] / HP / "maxact.json").is_file() and (steps[0] / HP / "logit_lens.json").is_file()
    # the callback's table has one row per interpreted feature (interpret_callback overrides: max_latents=8)
    assert re.search(r"interpret callback at step \d+: 8 features", (tmp_path / "run" / "train.log").read_text())

    with ScriptedChat(answer) as server:
        run(interpret_args(tmp_path, server.base_url))
    out = tmp_path / "run" / "interpret" / HP
    maxact = json.loads((out / "maxact.json").read_text())
    assert len(maxact["features"]) == 6
    entry = next(iter(maxact["features"].values()))
    assert entry["top"] and len(entry["top"][0]["tokens"]) == len(entry["top"][0]["acts"])
    lens = json.loads((out / "logit_lens.json").read_text())["features"]
    assert set(lens) == set(maxact["features"]) and len(next(iter(lens.values()))["top"]) == 10
    steering_files = list((out / "steering").glob("generated_texts_layer_2_feature_*_prompt_*.json"))
    assert len(steering_files) == 6 * 2
    shape = json.loads(steering_files[0].read_text())
    texts = next(iter(next(iter(shape["2"].values())).values()))
    assert set(texts) == {"original", "-2.0", "-1.0", "1.0", "2.0"}
    explanations = json.loads((out / "explanations.json").read_text())["2"]
    assert all(e["status"] == "success" and e["label"] == "words near the feature" for e in explanations.values())
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert {"layer", "feature", "label", "steering_effect", "detection", "fuzz"} <= set(rows[0])
    assert len(rows) == 6 and all(0 <= float(r["detection"]) <= 1 for r in rows)
    assert (out / "dashboard.html").stat().st_size > 10_000

    done = run(["evaluate.py", f"ckpt={tmp_path / 'run'}", "logger=none", "evaluate.n_tokens=1024"])
    result = json.loads((tmp_path / "run" / "eval" / "evaluation.json").read_text())
    assert 0 < result["fvu"] < 1.5 and result["l0"] > 0 and result["ce_clean"] > 0 and "ce_loss_recovered" in result
    assert "ce_loss_recovered" in done.stdout

    (tmp_path / "run2").mkdir()
    run(["evaluate.py", f"compare=[{tmp_path / 'run'},{tmp_path / 'run'}]", "logger=none", f"run.dir={tmp_path / 'cmp'}"])
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5_000


@pytest.mark.slow
def test_killed_interpret_resumes_without_redoing_finished_features(tmp_path):
    run(train_args(tmp_path)[:-1] + ["interpret_callback.every_n_steps=0"])
    with ScriptedChat(answer) as server:
        args = interpret_args(tmp_path, server.base_url, "interpret.stages=[maxact,steering,explain]",
                              "interpret.max_latents=12", "interpret.steering.max_new_tokens=40", "interpret.steering.max_batch=5")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        steering = tmp_path / "run" / "interpret" / HP / "steering"
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and len(list(steering.glob("*.json"))) < 6:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = {p.name: p.stat().st_mtime_ns for p in steering.glob("generated_texts_*.json")}
        assert 0 < len(before) < 24, "the run was not interrupted mid-way"
        run(args)
    after = {p.name: p.stat().st_mtime_ns for p in steering.glob("generated_texts_*.json")}
    assert len(after) == 24
    complete_before = {n for n in before if n.replace("prompt_0", "prompt_1") in before and "prompt_0" in n}
    for name in complete_before:
        assert after[name] == before[name], f"{name} was regenerated"
    assert json.loads((tmp_path / "run" / "interpret" / HP / "explanations.json").read_text())["2"]
