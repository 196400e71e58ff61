"""LoRA SAEs through interpretation: the callback, the default stages, LoRA-space steering, the
per-type logit lens and the layer label, on the tiny model with a rank-1 peft LoRA on all 7 types."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from saeforge.activations.lora import add_to_lora, with_adapter
from saeforge.interpret.logit_lens import lora_lens
from saeforge.interpret.steering import generate_steered, steering_kl
from saeforge.lm.loading import load_lm
from saeforge.sae.model import SAEConfig, SparseAutoencoder
from tests.conftest import compose_config

ROOT = Path(__file__).resolve().parents[2]
ALL_TYPES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(path: Path) -> Path:
    lm = load_lm(compose_config("train", ["model=tiny"]).model)
    torch.manual_seed(1)
    model = get_peft_model(lm.model, LoraConfig(r=1, lora_alpha=2, target_modules=ALL_TYPES, init_lora_weights=False))
    model.save_pretrained(path)
    return path


def run(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SAEFORGE_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    return make_adapter(tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, adapter):
    """A LoRA training run with the interpret callback every 5 steps (default callback stages)."""
    tmp = tmp_path_factory.mktemp("lora")
    done = run(["train.py", "model=tiny", "logger=none", f"run.dir={tmp / 'run'}", f"data.cache_dir={tmp / 'cache'}",
                "data=lora", f"data.lora.adapter={adapter}", "data.n_tokens=4096", "data.ctx_len=64",
                "data.batch_size=256", "data.shuffle_buffer=1024", "data.read_rows=1024", "sae.expansion_factor=4",
                "sae.k=4", "checkpoint_every_n_steps=8", "trainer.enable_progress_bar=false",
                "interpret_callback.every_n_steps=5"], tmp)
    return tmp, adapter, done


@pytest.fixture(scope="module")
def lora_lm(adapter):
    return with_adapter(load_lm(compose_config("train", ["model=tiny"]).model), adapter, None)


@pytest.mark.slow
def test_training_with_interpret_callback_finishes(lora_run):
    tmp, _, done = lora_run
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    steps = sorted((tmp / "run" / "interpret_steps").glob("step-*/lora"))
    assert steps, "the callback wrote nothing"
    lens = json.loads((steps[0] / "logit_lens.json").read_text())["features"]
    assert lens and all("by_type" in entry and "layout" in entry for entry in lens.values())
    assert "failed, training goes on" not in (tmp / "run" / "train.log").read_text()


@pytest.mark.slow
def test_callback_failure_is_logged_and_training_goes_on(tmp_path, lora_run):
    _, adapter, _ = lora_run
    (tmp_path / "empty.txt").write_text("\n")  # no prompts: steering raises at run time
    done = run(["train.py", "model=tiny", "logger=none", f"run.dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}",
                "data=lora", f"data.lora.adapter={adapter}", "data.n_tokens=2048", "data.ctx_len=64",
                "data.batch_size=256", "data.shuffle_buffer=1024", "data.read_rows=1024", "sae.expansion_factor=4",
                "sae.k=4", "trainer.enable_progress_bar=false", "interpret_callback.every_n_steps=3",
                "interpret_callback.overrides=['interpret.stages=[maxact,steering]','interpret.max_latents=2',"
                f"'interpret.steering.prompts_file={tmp_path / 'empty.txt'}','logger=none']"], tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    log = (tmp_path / "run" / "train.log").read_text()
    assert "interpret callback at step 3 failed, training goes on: ValueError" in log
    assert (tmp_path / "run" / "sae" / "lora" / "cfg.json").is_file()


@pytest.mark.slow
def test_default_stages_on_a_lora_run_and_layer_labels(lora_run, lora_lm):
    from saeforge.pipelines.interpret import interpret

    tmp, _, _ = lora_run
    cfg = compose_config("interpret", [f"ckpt={tmp / 'run'}", "logger=none", "interpret.max_latents=3",
                                       "interpret.n_tokens=1024", "interpret.steering.max_new_tokens=4",
                                       "interpret.steering.n_prompts=1", "interpret.score.n_test=2",
                                       "interpret.score.n_negatives=2", "explainer.params.max_tokens=8"])
    out = interpret(cfg, lm=lora_lm)
    assert out.name == "lora"
    stages = json.loads((out / "stages.json").read_text())
    assert {"maxact", "logit_lens", "steering", "explain", "score", "dashboard"} <= set(stages)
    assert not any("not_applicable" in entry for entry in stages.values() if isinstance(entry, dict))
    # the layer of a LoRA feature is "lora" everywhere, never None or blank
    assert json.loads((out / "maxact.json").read_text())["layer"] == "lora"
    explanations = json.loads((out / "explanations.json").read_text())
    assert "lora" in explanations and all(e["layer"] == "lora" for e in explanations["lora"].values())
    assert list((out / "steering").glob("generated_texts_layer_lora_feature_*_prompt_0.json"))
    with (out / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert rows and all(r["layer"] == "lora" for r in rows)
    assert "None" not in (out / "maxact.json").read_text()


def test_add_to_lora_adds_scaled_b_times_slice_to_the_module_output(lora_lm):
    sites = list(lora_lm.lora_sites)
    assert [(s.layer, s.kind) for s in sites[:7]] == [(0, k) for k in ("q", "k", "v", "o", "gate", "up", "down")]
    site = next(s for s in sites if (s.layer, s.kind) == (1, "down"))
    start = sites.index(site)  # rank 1: column index == site index
    peft_layer = lora_lm.model.base_model.model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 3, peft_layer.in_features)
    vec = torch.zeros(len(sites))
    vec[start] = 0.7
    with torch.no_grad():
        plain = peft_layer(x)
        with add_to_lora(sites, vec):
            steered = peft_layer(x)
    expected = site.scaling * 0.7 * site.up.weight[:, 0]
    torch.testing.assert_close(steered - plain, expected.expand_as(plain), atol=1e-5, rtol=1e-4)


def test_lora_steering_strength_zero_is_identical_and_nonzero_changes(lora_lm):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=len(lora_lm.lora_sites), d_sae=8, k=2))
    prompts = ["The quick brown fox", "Once upon a time"]
    run = generate_steered(lora_lm, sae, "lora", 3, 40.0, prompts, [0.0, 5.0])
    for prompt in prompts:
        assert run.texts[prompt]["0.0"] == run.texts[prompt]["original"]
    assert any(run.texts[p]["5.0"] != run.texts[p]["original"] for p in prompts)
    rows = [i for i, key in enumerate(run.row_keys) if key == "5.0"]
    kl = steering_kl(lora_lm, "lora", [run.row_prompts[i] for i in rows], [run.continuations[i] for i in rows],
                     run.vectors[rows])
    assert kl > 0
    zero = [i for i, key in enumerate(run.row_keys) if key == "0.0"]
    assert steering_kl(lora_lm, "lora", [run.row_prompts[i] for i in zero], [run.continuations[i] for i in zero],
                       run.vectors[zero]) == pytest.approx(0.0, abs=1e-6)


def test_lora_logit_lens_per_type_equals_brute_force(lora_lm):
    torch.manual_seed(0)
    sites = list(lora_lm.lora_sites)
    sae = SparseAutoencoder(SAEConfig(d_in=len(sites), d_sae=6, k=2))
    entry = lora_lens(lora_lm, sae, [2], top_n=5)["features"]["2"]
    w = sae.W_dec[2].detach()
    model = lora_lm.model.base_model.model
    gamma, W_U = model.model.norm.weight.detach(), model.lm_head.weight.detach()
    residual = {}
    for i, site in enumerate(sites):
        if site.kind in ("o", "down"):
            residual[site.kind] = residual.get(site.kind, 0) + site.scaling * site.up.weight[:, 0].detach() * w[i]
    for kind in ("o", "down"):
        logits = (residual[kind] * gamma) @ W_U.t()
        got = torch.tensor([v for _, v in entry["by_type"][kind]["top"]])
        torch.testing.assert_close(got, logits.topk(5).values, atol=1e-4, rtol=0)
        assert entry["by_type"][kind]["defined"] is True
    combined = ((residual["o"] + residual["down"]) * gamma) @ W_U.t()
    torch.testing.assert_close(torch.tensor([v for _, v in entry["top"]]), combined.topk(5).values, atol=1e-4, rtol=0)
    for kind in ("q", "k", "v", "gate", "up"):
        assert entry["by_type"][kind]["defined"] is False and "not defined" in entry["by_type"][kind]["note"]
        assert "top" not in entry["by_type"][kind]
    layout = entry["layout"]
    assert layout["types"] == ["q", "k", "v", "o", "gate", "up", "down"] and layout["layers"] == [0, 1, 2, 3]
    assert layout["norms"][1][3] == pytest.approx(abs(float(w[1 * 7 + 3])), abs=1e-4)
    assert sum(layout["share"].values()) == pytest.approx(1.0, abs=1e-3)
