"""make_client / make_chat_params from the shipped configs/explainer/*.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from saeforge.explainers import ChatParams, make_chat_params, make_client
from saeforge.explainers.local import LocalChatClient
from saeforge.explainers.openai_compat import OpenAICompatClient

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "explainer"


def load(name: str):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name=name)


@pytest.mark.parametrize("name", ["vllm", "openrouter", "openai"])
def test_remote_configs_build_openai_clients(name, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("OPENROUTER_API_KEY", "sk-or-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-oa-secret")
    cfg = load(name)
    client = make_client(cfg)
    assert isinstance(client, OpenAICompatClient)
    assert client.cache is not None and client.cache.root == tmp_path / "explainer"
    assert "secret" not in repr(client)
    assert make_chat_params(cfg) == ChatParams(max_tokens=128)
    assert client.supports_prefill is (name == "vllm")  # hosted APIs do not continue assistant messages


def test_chat_params_stop_and_penalty_from_config() -> None:
    params = make_chat_params({"params": {"stop": ["\n\n", "END"], "repetition_penalty": 1.2}})
    assert params.stop == ("\n\n", "END") and params.repetition_penalty == 1.2
    assert make_chat_params({"params": {"stop": "\n"}}).stop == ("\n",)
    hash(params)  # params group requests: they must stay hashable
    with pytest.raises(ValueError, match="stop"):
        ChatParams(stop=("",))


def test_local_config_needs_the_loaded_lm(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SAEFORGE_CACHE", str(tmp_path))
    cfg = load("local")
    with pytest.raises(ValueError, match="lm"):
        make_client(cfg)
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, eos_token_id=1))
    tokenizer = type("Tok", (), {"pad_token_id": None, "eos_token_id": 1})()
    client = make_client(cfg, lm=(model, tokenizer))
    assert isinstance(client, LocalChatClient) and client.max_batch == 8 and client.supports_prefill


def test_unknown_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="kind"):
        make_client({"kind": "carrier-pigeon"})
