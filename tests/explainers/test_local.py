"""LocalChatClient on a tiny random Llama and an in-memory tokenizer (no downloads)."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from saeforge.explainers.base import ChatParams, ExplainerClient
from saeforge.explainers.local import LocalChatClient

SENTENCES = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "features fire on words about animals",
    "explain what this feature detects",
    "the feature fires on the token cat",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant : {% endif %}"
)


@pytest.fixture(scope="module")
def tiny_lm() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"])
    tok.train_from_iterator(SENTENCES + ["user assistant system :"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


def _requests(params: ChatParams) -> list:
    prompts = ["the cat", "explain what this feature detects on the mat", "a dog", "the feature fires"]
    return [([{"role": "user", "content": p}], params) for p in prompts]


def test_batched_equals_one_by_one_greedy(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    params = ChatParams(temperature=0.0, max_tokens=8)
    client = LocalChatClient(model, tokenizer, max_batch=4)
    assert isinstance(client, ExplainerClient)
    requests = _requests(params)
    batched = asyncio.run(client.chat_many(requests, progress=False))
    singles = [asyncio.run(client.chat(m, p)) for m, p in requests]
    assert all(r.ok for r in batched)
    assert [r.text for r in batched] == [r.text for r in singles]
    assert any(r.text for r in batched)


def test_logprobs_when_asked(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    client = LocalChatClient(model, tokenizer, max_batch=2)
    params = ChatParams(max_tokens=5, logprobs=True, top_logprobs=3)
    results = asyncio.run(client.chat_many(_requests(params), progress=False))
    for result in results:
        assert result.logprobs, result
        for entry in result.logprobs:
            assert entry["logprob"] <= 0 and not math.isnan(entry["logprob"])
            assert len(entry["top"]) >= 1
            # greedy: the chosen token is the most likely one
            assert entry["logprob"] == pytest.approx(max(entry["top"].values()), abs=1e-5)
    plain = asyncio.run(client.chat(*_requests(ChatParams(max_tokens=5))[0]))
    assert plain.logprobs is None


def test_sampling_is_seeded_and_cache_is_used(tiny_lm, tmp_path) -> None:
    model, tokenizer = tiny_lm
    client = LocalChatClient(model, tokenizer, cache_dir=tmp_path)
    params = ChatParams(temperature=1.0, max_tokens=8, seed=123)
    requests = _requests(params)
    first = asyncio.run(client.chat_many(requests, progress=False))
    uncached = LocalChatClient(model, tokenizer)
    again = asyncio.run(uncached.chat_many(requests, progress=False))
    assert [r.text for r in first] == [r.text for r in again]
    assert not any(r.cached for r in first)
    cached = asyncio.run(client.chat_many(requests, progress=False))
    assert all(r.cached for r in cached)
    assert [r.text for r in cached] == [r.text for r in first]


def test_final_assistant_message_is_continued(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    client = LocalChatClient(model, tokenizer)
    assert client.supports_prefill
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "the feature fires"}]
    ids = client._prompt_ids(messages)
    text = tokenizer.decode(ids)
    assert text.rstrip().endswith("assistant : the feature fires"), text  # no </s>, no new turn
    plain = tokenizer.decode(LocalChatClient(model, tokenizer, prefill=False)._prompt_ids(messages))
    assert plain.rstrip().endswith("</s> <s> assistant :"), plain
    result = asyncio.run(client.chat(messages, ChatParams(max_tokens=4)))
    assert result.ok


def test_stop_strings_end_the_text(tiny_lm) -> None:
    model, tokenizer = tiny_lm
    client = LocalChatClient(model, tokenizer)
    messages = [{"role": "user", "content": "explain what this feature detects"}]
    full = asyncio.run(client.chat(messages, ChatParams(max_tokens=12))).text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[1]
    cut = asyncio.run(client.chat(messages, ChatParams(max_tokens=12, stop=(stop,), logprobs=True)))
    assert cut.text == full[: full.find(stop)] and stop not in cut.text
    assert len(cut.logprobs) < 12  # generation ended early, logprobs cut with the text
    penalised = asyncio.run(client.chat(messages, ChatParams(max_tokens=12, repetition_penalty=1.5)))
    assert penalised.ok


def test_a_tokenizer_without_chat_template_gets_a_plain_transcript(tiny_lm) -> None:
    import copy

    model, tokenizer = tiny_lm
    base = copy.deepcopy(tokenizer)
    base.chat_template = None  # like a base model's GGUF (gemma3-270m)
    client = LocalChatClient(model, base)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"},
                {"role": "assistant", "content": "LABEL:"}]
    def ids(text: str) -> list[int]:
        return base(text, add_special_tokens=False)["input_ids"]

    assert client._prompt_ids(messages) == ids("be brief\n\nUser: the cat\n\nAssistant: LABEL:")
    plain = LocalChatClient(model, base, prefill=False)._prompt_ids(messages[:2])
    assert plain == ids("be brief\n\nUser: the cat\n\nAssistant:")
    assert asyncio.run(client.chat(messages, ChatParams(max_tokens=4))).ok
