"""A tiny random Llama-style LM with an offline tokenizer, for fast tests."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINING_TEXT = (
    "The quick brown fox jumps over the lazy dog. Sherlock Holmes took his bottle from the corner "
    "of the mantelpiece. The history of the United States begins with the first settlers. "
    "Prince Andrew looked at the sky above Austerlitz. A surgeon must wash his hands before the "
    "operation. 0123456789 , . ; : ! ? ' \" ( ) - the of and to in a is that it was he for on "
)


def build_tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained in memory on a fixed text: deterministic and fully offline."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_lm(cfg: Mapping[str, Any], seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Random Llama with the given sizes (hidden_size, num_hidden_layers, ...), seeded."""
    tokenizer = build_tiny_tokenizer(int(cfg.get("vocab_size", 512)))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=int(cfg.get("hidden_size", 64)),
        intermediate_size=int(cfg.get("intermediate_size", 128)),
        num_hidden_layers=int(cfg.get("num_hidden_layers", 4)),
        num_attention_heads=int(cfg.get("num_attention_heads", 4)),
        num_key_value_heads=int(cfg.get("num_key_value_heads", 2)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
