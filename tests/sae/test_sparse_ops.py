"""The sparse fast path equals the plain dense math (forward and gradients, float64)."""

import pytest
import torch

from saeforge.sae.model import (
    SAEConfig, SparseAutoencoder, dense_decode, dense_encode_gather, select_batch_topk,
)
from saeforge.sae.sparse_ops import sparse_decode, sparse_encode_gather

ATOL = 1e-10


def _setup(seed: int = 0, B: int = 16, d: int = 12, m: int = 40):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    W_enc = torch.randn(d, m, generator=g, dtype=torch.float64)
    b_enc = torch.randn(m, generator=g, dtype=torch.float64) * 0.1
    b_dec = torch.randn(d, generator=g, dtype=torch.float64) * 0.1
    W_dec = torch.randn(m, d, generator=g, dtype=torch.float64)
    pre = torch.relu((x - b_dec) @ W_enc + b_enc)
    rows, cols, _ = select_batch_topk(pre, 5 * B)
    return x, W_enc, b_enc, b_dec, W_dec, pre, rows, cols


def test_decode_matches_dense():
    x, W_enc, b_enc, b_dec, W_dec, pre, rows, cols = _setup()
    grads = []
    for fn in (sparse_decode, dense_decode):
        vals = pre[rows, cols].clone().requires_grad_(True)
        W = W_dec.clone().requires_grad_(True)
        out = fn(rows, cols, vals, W, x.shape[0])
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), vals.grad, W.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


def test_encode_gather_matches_dense():
    x, W_enc, b_enc, b_dec, W_dec, pre, rows, cols = _setup(1)
    results = []
    for fn in (sparse_encode_gather, dense_encode_gather):
        params = [t.clone().requires_grad_(True) for t in (x, W_enc, b_enc, b_dec)]
        vals = fn(*params, rows, cols, pre[rows, cols])
        (vals * torch.arange(vals.numel(), dtype=vals.dtype)).sum().backward()
        results.append([vals.detach()] + [p.grad for p in params])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.parametrize("architecture,k", [("batchtopk", 3.5), ("topk", 4)])
def test_sae_forward_backward_fast_equals_plain(architecture, k):
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=10, d_sae=48, k=k, architecture=architecture, k_aux=6)
    base = SparseAutoencoder(cfg).double()
    x = torch.randn(32, 10, dtype=torch.float64)
    with torch.no_grad():
        base.b_enc.normal_(0, 0.1)
        base.b_dec.normal_(0, 0.1)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[::5] = True
    outs = []
    for sparse in (True, False):
        sae = SparseAutoencoder(cfg, sparse_kernels=sparse).double()
        sae.load_state_dict(base.state_dict())
        out = sae(x, dead_mask=dead)
        (out.mse + out.auxk_loss).backward()
        assert out.auxk_loss > 0
        outs.append((out, {n: p.grad for n, p in sae.named_parameters()}))
    (o1, g1), (o2, g2) = outs
    for name in ("sae_out", "latent_acts", "fvu", "mse", "auxk_loss", "min_kept", "l0"):
        torch.testing.assert_close(getattr(o1, name), getattr(o2, name), atol=ATOL, rtol=0)
    assert torch.equal(o1.latent_indices, o2.latent_indices)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], atol=ATOL, rtol=0, msg=n)


def test_select_batch_topk_is_exact_with_skewed_rows():
    torch.manual_seed(0)
    pre = torch.rand(8, 50)
    pre[0] += 10.0  # row 0 holds far more than its share of the top entries
    rows, cols, vals = select_batch_topk(pre, 40)
    expected = pre.flatten().topk(40).values.sort().values
    torch.testing.assert_close(vals.sort().values, expected)
    assert (rows == 0).sum() == 40
    assert torch.all(rows[1:] >= rows[:-1])


def test_sparse_path_runs_under_bf16_autocast_like_the_dense_path():
    """Mixed precision (trainer precision bf16-mixed): the encoder GEMM gives bf16 values while the
    weights stay float32; the sparse kernels must accept that and give the dense path's gradients."""
    torch.manual_seed(0)
    cfg = SAEConfig(d_in=32, d_sae=128, k=4.0, architecture="batchtopk", k_aux=8)
    base = SparseAutoencoder(cfg)
    x = torch.randn(64, 32)
    dead = torch.zeros(128, dtype=torch.bool)
    dead[::7] = True
    grads = []
    for sparse in (True, False):
        sae = SparseAutoencoder(cfg, sparse_kernels=sparse)
        sae.load_state_dict(base.state_dict())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sae(x, dead_mask=dead)
            (out.mse + out.auxk_loss).backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in sae.parameters())
        grads.append({n: p.grad for n, p in sae.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=2e-2, rtol=2e-2, msg=n)


def test_transpose_order_is_a_stable_sort_by_column():
    from saeforge.sae.sparse_ops import transpose_order

    gen = torch.Generator().manual_seed(4)
    flat = torch.randperm(64 * 300, generator=gen)[:2000].sort().values
    rows, cols = flat // 300, flat % 300
    perm = transpose_order(rows, cols, 64, 300)
    assert torch.equal(perm, torch.from_numpy(cols.numpy()).sort(stable=True).indices)
    key = cols[perm] * 64 + rows[perm]
    assert torch.equal(key, key.sort().values)  # column-major, rows ascending within a column


@pytest.mark.parametrize("threshold", [0.0, 0.5, 3.0])
def test_training_forward_on_raw_preacts_matches_relu_selection_and_inference_l0(threshold):
    """The training forward skips the ReLU pass and counts the inference L0 among the batch-TopK
    candidates when the threshold lies above them: both must equal the plain definitions."""
    from saeforge.sae.model import select_batch_topk

    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=16, d_sae=2048, k=6.0))  # 512 x 2048 entries: the sampled path
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)  # plenty of negative pre-activations
        sae.threshold.fill_(threshold)
    x = torch.randn(512, 16)
    out = sae(x)
    pre = sae.pre_acts(x)  # with its ReLU
    rows, cols, vals = select_batch_topk(pre, 6 * 512)
    assert torch.equal(out.row_indices, rows) and torch.equal(out.latent_indices, cols)
    assert torch.equal(out.latent_acts.detach(), vals)
    assert out.l0_inference.item() == torch.count_nonzero(pre > threshold).item() / 512


def test_serial_cpu_runs_one_thread_and_dense_cpu_lends_the_threads_back():
    from saeforge.sae.sparse_ops import dense_cpu, serial_cpu

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    t = torch.zeros(1)
    try:
        with dense_cpu(t):
            assert torch.get_num_threads() == 2  # outside serial_cpu: nothing to lend back
        with serial_cpu(t):
            assert torch.get_num_threads() == 1
            with serial_cpu(t), dense_cpu(t):
                assert torch.get_num_threads() == 2
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_serial_cpu_leaves_many_threads_alone():
    from saeforge.sae.sparse_ops import SERIAL_MAX_THREADS, serial_cpu

    before = torch.get_num_threads()
    torch.set_num_threads(SERIAL_MAX_THREADS + 4)
    try:
        with serial_cpu(torch.zeros(1)):
            assert torch.get_num_threads() == SERIAL_MAX_THREADS + 4
    finally:
        torch.set_num_threads(before)
