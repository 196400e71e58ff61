"""Logit lens and decoder-cosine neighbours equal a brute-force computation."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import GemmaConfig, GemmaForCausalLM, GPT2Config, GPT2LMHeadModel

from saeforge.config import LogitLensConfig
from saeforge.interpret import records as records_io
from saeforge.interpret.logit_lens import find_final_norm, final_norm_scale, lens_records, logit_lens
from saeforge.interpret.maxact import TokenDecoder
from saeforge.sae.model import SAEConfig, SparseAutoencoder


@pytest.fixture(scope="module")
def lm_and_sae(tiny_lm):
    lm = copy.copy(tiny_lm)
    lm.model = copy.deepcopy(tiny_lm.model)
    torch.manual_seed(0)
    with torch.no_grad():
        lm.model.model.norm.weight.copy_(torch.rand(64) + 0.5)  # a non-trivial γ
    sae = SparseAutoencoder(SAEConfig(d_in=64, d_sae=40, k=4))
    sae.init_from_sample(torch.randn(256, 64))
    return lm, sae


def test_logit_lens_equals_brute_force(lm_and_sae, tmp_path):
    lm, sae = lm_and_sae
    feats = [0, 7, 39]
    res = logit_lens(lm, sae, feats, top_n=6, n_neighbours=4, chunk_elements=1000)  # several chunks
    assert list(res["features"]) == ["0", "7", "39"]
    decode = TokenDecoder(lm.tokenizer)
    W_dec = sae.W_dec.detach()
    logits = (W_dec * lm.model.model.norm.weight) @ lm.model.lm_head.weight.t()
    cos = torch.nn.functional.cosine_similarity(W_dec[:, None], W_dec[None], dim=-1)
    for f in feats:
        entry = res["features"][str(f)]
        order = logits[f].argsort(descending=True)
        assert [t for t, _ in entry["top"]] == decode(order[:6].tolist())
        assert [t for t, _ in entry["bottom"]] == decode(order.flip(0)[:6].tolist())
        torch.testing.assert_close(torch.tensor([v for _, v in entry["top"]]), logits[f, order[:6]], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor([v for _, v in entry["bottom"]]), logits[f, order.flip(0)[:6]],
                                   atol=1e-4, rtol=0)
        c = cos[f].clone()
        c[f] = -2
        nb = c.argsort(descending=True)[:4]
        assert [i for i, _ in entry["neighbours"]] == nb.tolist()
        torch.testing.assert_close(torch.tensor([v for _, v in entry["neighbours"]]), c[nb], atol=1e-4, rtol=0)
    records = records_io.Records()
    for f in feats:
        records.get(f)
    lens_records(lm, sae, records, LogitLensConfig(top_n=6, n_neighbours=4))  # the stage: one chunk
    path = records_io.write_logit_lens(tmp_path / "out", records)
    doc = json.loads(path.read_text())
    assert doc.pop("format_version") == 1 and doc == logit_lens(lm, sae, feats, top_n=6, n_neighbours=4)
    assert len(logit_lens(lm, sae, None, top_n=2, n_neighbours=1)["features"]) == 40
    with pytest.raises(ValueError, match="features"):
        logit_lens(lm, sae, [40])


def test_final_norm_is_found_for_gpt2_and_gemma():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    assert find_final_norm(gpt2) is gpt2.transformer.ln_f
    gemma = GemmaForCausalLM(GemmaConfig(num_hidden_layers=2, hidden_size=16, intermediate_size=32,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, vocab_size=50))
    assert find_final_norm(gemma) is gemma.model.norm
    with torch.no_grad():
        gemma.model.norm.weight.fill_(0.25)
    torch.testing.assert_close(final_norm_scale(gemma, 16), torch.full((16,), 1.25))  # Gemma: 1 + weight
