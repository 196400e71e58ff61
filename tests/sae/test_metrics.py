"""Each metric against its formula written out by hand."""

import math

import pytest
import torch

from saeforge.sae import metrics


def test_reconstruction_metrics():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 5.0]])
    # errors: row0 (0,1), row1 (0,1) → Σ‖x − x̂‖² = 2; mean x = (2,4) → Σ‖x − mean‖² = 1+4+1+4 = 10
    assert float(metrics.mse(x, x_hat)) == pytest.approx(2 / 4)
    assert float(metrics.fvu(x, x_hat)) == pytest.approx(0.2)
    cos0 = (1 * 1 + 2 * 1) / (math.sqrt(5) * math.sqrt(2))
    cos1 = (9 + 30) / (math.sqrt(45) * math.sqrt(34))
    assert float(metrics.cosine_similarity(x, x_hat)) == pytest.approx((cos0 + cos1) / 2)
    assert float(metrics.fvu(x, x)) == 0.0


def test_sparsity_metrics():
    acts = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 3.0]])
    assert float(metrics.l0(acts)) == pytest.approx(1.5)
    counts = torch.tensor([0, 5, 50, 0])
    assert float(metrics.dead_fraction(counts)) == 0.5
    assert float(metrics.dense_fraction(counts, n_tokens=100, threshold=0.1)) == 0.25
