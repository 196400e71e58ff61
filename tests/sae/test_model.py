"""SparseAutoencoder math: selection, AuxK, decoder constraint, init, folding, calibration."""

import pytest
import torch

from saeforge.sae.model import (
    SAEConfig, SparseAutoencoder, calibrate_threshold, geometric_median,
)


def _sae(arch="batchtopk", k=4.0, d_in=8, d_sae=32) -> SparseAutoencoder:
    torch.manual_seed(0)
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, architecture=arch))


@pytest.mark.parametrize("kwargs,match", [
    ({"k": 0}, "k must satisfy"), ({"k": 32}, "k must satisfy"),
    ({"k": 2.5, "architecture": "topk"}, "integer k"), ({"k": 2, "architecture": "x"}, "architecture"),
    ({"k": 2, "k_aux": 0}, "k_aux"),
])
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAEConfig(d_in=8, d_sae=32, **kwargs)
    assert SAEConfig(d_in=8, d_sae=32, k=2).k_aux == 4


def test_batch_topk_keeps_k_times_batch_and_topk_keeps_k_per_row():
    x = torch.randn(50, 8)
    out = _sae("batchtopk", 2.5)(x)
    assert out.latent_acts.numel() == round(2.5 * 50) and float(out.l0) == pytest.approx(2.5)
    assert torch.all(out.latent_acts > 0) and float(out.min_kept) == float(out.latent_acts.min())
    out = _sae("topk", 3)(x)
    assert torch.equal(torch.bincount(out.row_indices, minlength=50), torch.full((50,), 3))


def test_forward_reconstruction_matches_dense_math():
    sae = _sae("topk", 3)
    x = torch.randn(20, 8)
    out = sae(x)
    acts = sae.encode_inference(x)
    torch.testing.assert_close(out.sae_out, sae.decode(acts), atol=1e-5, rtol=0)
    assert float(out.fvu) == pytest.approx(float(((x - out.sae_out) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()), rel=1e-5)


def test_auxk_zero_without_dead_and_trains_only_dead_columns():
    sae = _sae()
    x = torch.randn(64, 8)
    assert float(sae(x, dead_mask=torch.zeros(32, dtype=torch.bool)).auxk_loss) == 0.0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:5] = True
    out = sae(x, dead_mask=dead)
    assert float(out.auxk_loss) > 0
    out.auxk_loss.backward()
    assert sae.W_enc.grad[:, :5].abs().sum() > 0
    assert sae.W_enc.grad[:, 5:].abs().sum() == 0  # residual target is detached


def test_decoder_constraint():
    sae = _sae()
    sae(torch.randn(32, 8)).mse.backward()
    sae.remove_parallel_grads_()
    dots = (sae.W_dec.grad * sae.W_dec).sum(1)
    assert dots.abs().max() < 1e-6
    with torch.no_grad():
        sae.W_dec.mul_(3.0)
    sae.normalize_decoder_()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_init_from_sample_and_geometric_median():
    sample = torch.randn(200, 8) + 5.0
    sample[:5] += 1000.0  # outliers move the mean, not the median
    sae = _sae()
    sae.init_from_sample(sample, "geometric_median")
    torch.testing.assert_close(sae.W_enc, sae.W_dec.t())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    assert (sae.b_dec - 5.0).abs().max() < 0.5
    assert (geometric_median(sample) - sample[5:].mean(0)).norm() < 0.5
    sae.init_from_sample(sample, "mean")
    torch.testing.assert_close(sae.b_dec, sample.mean(0))


@pytest.mark.parametrize("arch,k", [("batchtopk", 3.0), ("topk", 3)])
def test_fold_input_normalization(arch, k):
    sae = _sae(arch, k)
    sae.threshold = torch.tensor(0.2)
    raw = torch.randn(40, 8) * 7 + 3
    mean, scale = raw.mean(0), 0.3
    folded = sae.fold_input_normalization(scale, mean)
    xn = (raw - mean) * scale
    acts = sae.encode_inference(xn)
    torch.testing.assert_close(folded.encode_inference(raw), acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(folded.decode(acts), sae.decode(acts) / scale + mean, atol=1e-4, rtol=1e-5)


def test_calibrate_threshold_hits_k():
    sae = _sae("batchtopk", 4.0)
    batches = [torch.randn(100, 8) for _ in range(5)]
    t = calibrate_threshold(sae, batches)
    assert float(sae.threshold) == t > 0
    l0 = torch.cat([(sae.encode_inference(b) > 0).sum(1) for b in batches]).float().mean()
    assert abs(float(l0) - 4.0) <= 0.02 * 4.0


def test_calibrate_threshold_is_exact_when_a_row_has_more_than_8k_latents_above_it():
    import warnings

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=256, k=2.0))
    rows = torch.randn(300, 16)
    rows[:3] *= 30  # three rows whose pre-activations dwarf everyone else's
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = calibrate_threshold(sae, lambda: (rows[i : i + 100] for i in range(0, 300, 100)))
    pre = sae.pre_acts(rows)
    assert int((pre > t).sum(1).max()) > 16  # the case the 8k pool alone gets wrong
    assert int((pre > t).sum()) == round(2.0 * 300)


def test_batch_topk_sampled_path_equals_a_full_topk_on_heavy_tailed_rows():
    from saeforge.sae.model import select_batch_topk

    gen = torch.Generator().manual_seed(3)
    scale = torch.rand(512, 1, generator=gen).pow(4) * 50  # a few rows with huge activations
    pre = torch.relu(torch.randn(512, 4096, generator=gen) * scale)
    n_keep = 32 * 512
    rows, cols, vals = select_batch_topk(pre, n_keep)
    expected = pre.reshape(-1).topk(n_keep).values
    assert torch.equal(vals.sort().values, expected.sort().values)
    assert torch.equal(pre[rows, cols], vals)
    flat = rows * 4096 + cols
    assert torch.equal(flat, flat.sort().values)  # row-major


@pytest.mark.parametrize("architecture, k", [("topk", 8), ("batchtopk", 8), ("jumprelu", None)])
def test_encode_inference_sparse_is_the_nonzeros_of_encode_inference(architecture, k):
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=64, k=k, architecture=architecture))
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.threshold = torch.rand(64) * 0.5 if architecture == "jumprelu" else torch.tensor(0.3)
    x = torch.randn(50, 16)
    dense = sae.encode_inference(x)
    rows, cols, vals = sae.encode_inference_sparse(x)
    assert torch.equal(torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, dense.shape).to_dense(), dense)
    assert bool((rows[1:] > rows[:-1]).logical_or((rows[1:] == rows[:-1]) & (cols[1:] > cols[:-1])).all())  # row-major
