"""SAELens export loads in sae_lens; each import matches that library's own math."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saeforge.sae.formats import load_sae, write_saelens
from saeforge.sae.model import SAEConfig, SparseAutoencoder

D_IN, D_SAE = 12, 40


def _sae(architecture: str, k: float) -> SparseAutoencoder:
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=D_IN, d_sae=D_SAE, k=k, architecture=architecture))
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.2)
        sae.b_dec.normal_(0, 0.5)
        sae.W_dec.mul_(torch.rand(D_SAE, 1) + 0.5)  # not unit norm, as after folding
    sae.threshold = torch.tensor(0.3)
    return sae


def _x(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("architecture,k", [("batchtopk", 3.0), ("topk", 4)])
def test_export_loads_in_sae_lens(tmp_path, architecture, k):
    from sae_lens import SAE

    sae = _sae(architecture, k)
    sparsity = torch.log10(torch.rand(D_SAE))
    out = write_saelens(sae, tmp_path / "sae", hook_name="blocks.3.hook_resid_post", hook_layer=3,
                        model_name="tiny", provenance={"git_sha": "abc"}, sparsity=sparsity)
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == ("jumprelu" if architecture == "batchtopk" else "topk")
    assert int(cfg["metadata"]["sae_lens_version"].split(".")[0]) >= 6
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_resid_post" and cfg["saeforge"]["git_sha"] == "abc"
    weights = load_file(str(out / "sae_weights.safetensors"))
    expected = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if architecture == "batchtopk" else set())
    assert set(weights) == expected
    torch.testing.assert_close(load_file(str(out / "sparsity.safetensors"))["sparsity"], sparsity)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # temp dir renamed away

    theirs = SAE.load_from_disk(str(out))
    x = _x()
    acts = sae.encode_inference(x)
    assert (acts > 0).any()
    torch.testing.assert_close(theirs.encode(x), acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs.decode(acts), sae.decode(acts), atol=1e-5, rtol=0)

    back, info = load_sae(out)
    assert info["format"] == "saelens" and back.cfg.architecture == architecture
    torch.testing.assert_close(back.encode_inference(x), acts, atol=1e-6, rtol=0)


def test_overwrite_is_atomic_replace(tmp_path):
    sae = _sae("batchtopk", 3.0)
    write_saelens(sae, tmp_path / "s", hook_name="h")
    sae.threshold = torch.tensor(0.7)
    write_saelens(sae, tmp_path / "s", hook_name="h")
    assert float(load_file(str(tmp_path / "s" / "sae_weights.safetensors"))["threshold"][0]) == pytest.approx(0.7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_import_sae_lens_native(tmp_path, arch):
    from sae_lens import SAE
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

    torch.manual_seed(3)
    if arch == "standard":
        theirs = StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE))
    else:
        theirs = JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE))
        theirs.threshold.data = torch.rand(D_SAE) * 0.5  # per-latent thresholds
    theirs.b_enc.data.normal_(0, 0.3)
    theirs.b_dec.data.normal_(0, 0.3)
    theirs.save_model(tmp_path / "m")
    theirs = SAE.load_from_disk(str(tmp_path / "m"))
    ours, info = load_sae(tmp_path / "m")
    x = _x()
    acts = theirs.encode(x)
    torch.testing.assert_close(ours.encode_inference(x), acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.decode(acts), theirs.decode(acts), atol=1e-5, rtol=0)


def _weights(seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D_SAE, D_IN, generator=g) / 3, torch.randn(D_SAE, generator=g) * 0.2,
            torch.randn(D_SAE, D_IN, generator=g), torch.randn(D_IN, generator=g) * 0.3)


def test_import_sparsify(tmp_path):
    enc_w, enc_b, W_dec, b_dec = _weights(4)
    k = 5
    (tmp_path / "layers.3").mkdir()
    d = tmp_path / "layers.3"
    save_file({"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": W_dec, "b_dec": b_dec}, str(d / "sae.safetensors"))
    (d / "cfg.json").write_text(json.dumps({"expansion_factor": 32, "normalize_decoder": True, "num_latents": D_SAE, "k": k, "d_in": D_IN}))
    ours, info = load_sae(d)
    assert info["format"] == "sparsify"
    x = _x()
    # sparsify: pre = relu((x − b_dec) Wᵀ + b); top-k per row; x̂ = Σ top_acts·W_dec[top_idx] + b_dec
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    top_acts, top_idx = pre.topk(k, dim=1)
    x_hat = (top_acts[..., None] * W_dec[top_idx]).sum(1) + b_dec
    acts = ours.encode_inference(x)
    torch.testing.assert_close(acts.gather(1, top_idx), top_acts, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.decode(acts), x_hat, atol=1e-5, rtol=0)


def test_import_gemma_scope(tmp_path):
    enc_w, b_enc, W_dec, b_dec = _weights(5)
    W_enc = enc_w.T.contiguous()
    threshold = torch.rand(D_SAE) * 0.5
    np.savez(tmp_path / "params.npz", W_enc=W_enc.numpy(), b_enc=b_enc.numpy(), W_dec=W_dec.numpy(),
             b_dec=b_dec.numpy(), threshold=threshold.numpy())
    ours, info = load_sae(tmp_path / "params.npz")
    assert info["format"] == "gemma_scope" and ours.threshold.shape == (D_SAE,)
    x = _x()
    # Gemma Scope JumpReLU: pre = x·W_enc + b_enc (no b_dec subtraction); acts = (pre > θ)·relu(pre)
    pre = x @ W_enc + b_enc
    acts = (pre > threshold) * torch.relu(pre)
    torch.testing.assert_close(ours.encode_inference(x), acts, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.decode(acts), acts @ W_dec + b_dec, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["batchtopk", "topk", "standard"])
def test_import_dictionary_learning(tmp_path, variant):
    enc_w, enc_b, W_dec, b_dec = _weights(6)
    dec_w = W_dec.T.contiguous()  # nn.Linear(dict_size, activation_dim).weight is [D, F]
    x = _x()
    if variant == "standard":
        sd = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "bias": b_dec}
        f = torch.relu((x - b_dec) @ enc_w.T + enc_b)  # AutoEncoder.encode
    else:
        sd = {"encoder.weight": enc_w, "encoder.bias": enc_b, "decoder.weight": dec_w, "b_dec": b_dec,
              "k": torch.tensor(4, dtype=torch.int)}
        post_relu = torch.relu((x - b_dec) @ enc_w.T + enc_b)
        if variant == "batchtopk":  # BatchTopKSAE.encode(use_threshold=True)
            sd["threshold"] = torch.tensor(0.4)
            f = post_relu * (post_relu > 0.4)
        else:  # AutoEncoderTopK.encode: per-row top-k of post-ReLU acts
            v, i = post_relu.topk(4, dim=1)
            f = torch.zeros_like(post_relu).scatter_(1, i, v)
            (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoderTopK"}}))
    torch.save(sd, tmp_path / "ae.pt")
    ours, info = load_sae(tmp_path)
    assert info["format"] == "dictionary_learning"
    torch.testing.assert_close(ours.encode_inference(x), f, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.decode(f), f @ dec_w.T + b_dec, atol=1e-5, rtol=0)


def test_unknown_path_error_names_path_and_formats(tmp_path):
    with pytest.raises(ValueError, match="sae_weights.safetensors") as e:
        load_sae(tmp_path)
    assert str(tmp_path) in str(e.value)
