"""SAEModule trains with a plain Lightning Trainer on low-rank data."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from saeforge.config import SAESettings
from saeforge.sae.module import SAEModule, lr_factor, resolve_settings

D_IN, D_SAE, K = 16, 64, 4


def _low_rank(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(6, D_IN, generator=g)
    codes = torch.relu(torch.randn(n, 6, generator=g))
    return 3.0 * codes @ basis + 5.0 + 0.01 * torch.randn(n, D_IN, generator=g)


def _fit(module: SAEModule, data: torch.Tensor, steps: int) -> None:
    trainer = L.Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=128, shuffle=True))


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    data = _low_rank(4096, 0)
    module = SAEModule({"d_sae": D_SAE, "k": K, "warmup_steps": 5, "lr": 3e-3}, d_in=D_IN)
    module.initialize(data[:512])
    x = module.normalize(data[:512])
    with torch.no_grad():
        fvu0 = float(module.sae(x).fvu)
    _fit(module, data, 120)
    with torch.no_grad():
        fvu1 = float(module.sae(x).fvu)
    return module, fvu0, fvu1


def test_fvu_decreases_and_decoder_unit_norm(trained):
    module, fvu0, fvu1 = trained
    assert fvu1 < 0.5 * fvu0, (fvu0, fvu1)
    norms = module.sae.W_dec.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
    assert float(module.sae.threshold) > 0  # the EMA of min_kept moved


def test_input_scale_normalises_norm():
    data = _low_rank(1000, 1)
    module = SAEModule({"d_sae": D_SAE, "k": K}, d_in=D_IN)
    module.initialize(data)
    mean_norm = module.normalize(data).norm(dim=1).mean()
    torch.testing.assert_close(mean_norm, torch.tensor(D_IN**0.5), rtol=1e-4, atol=0)


def test_calibration_gives_l0_close_to_k(trained):
    module, _, _ = trained
    heldout = _low_rank(2048, 7)
    module.calibrate(heldout[i : i + 256] for i in range(0, 2048, 256))
    acts = module.sae.encode_inference(module.normalize(heldout))
    l0 = (acts > 0).sum(1).float().mean()
    assert abs(float(l0) - K) <= 0.02 * K, float(l0)
    # the exported raw-activation SAE gives the same reconstruction in raw space
    raw = module.export_sae()
    x_hat_raw = raw.decode(raw.encode_inference(heldout))
    x_hat = module.sae.decode(acts) / module.input_scale + module.input_mean
    torch.testing.assert_close(x_hat_raw, x_hat, atol=1e-3, rtol=1e-4)


def test_dead_latent_gets_auxk_gradient():
    torch.manual_seed(0)
    data = _low_rank(256, 2)
    module = SAEModule({"d_sae": D_SAE, "k": K, "dead_tokens": 100}, d_in=D_IN)
    module.initialize(data)
    module.tokens_since_fired[:8] = 1000  # latents 0..7 are dead
    loss = module.training_step(data)
    loss.backward()
    g = module.sae.W_enc.grad[:, :8]
    assert g.abs().sum() > 0
    # with no dead latents AuxK vanishes
    module.zero_grad()
    module.tokens_since_fired.zero_()
    out = module.sae(module.normalize(data), dead_mask=module.tokens_since_fired >= 100)
    assert float(out.auxk_loss) == 0.0


def test_state_lives_in_state_dict():
    module = SAEModule({"d_sae": D_SAE, "k": K}, d_in=D_IN)
    keys = set(module.state_dict())
    assert {"input_scale", "input_mean", "tokens_since_fired", "sae.threshold"} <= keys


def test_config_validation_and_lr_schedule():
    c = resolve_settings({"expansion_factor": 4, "k": 8}, d_in=10)
    assert c["d_sae"] == 40 and c["lr"] == pytest.approx(2e-4 / (40 / 2**14) ** 0.5)
    assert SAESettings(expansion_factor=4, k=8).resolve(10).d_sae == 40
    with pytest.raises(ValueError, match="unknown key sae.d_sea"):
        resolve_settings({"d_sea": 4}, d_in=10)
    with pytest.raises(ValueError, match="k must satisfy"):
        SAEModule({"d_sae": 8, "k": 9}, d_in=4)
    assert lr_factor(0, 10, 0.5, 100) == pytest.approx(0.1)
    assert lr_factor(20, 10, 0.5, 100) == 1.0
    assert lr_factor(75, 10, 0.5, 100) == pytest.approx(0.5)


def test_default_settings_recover_a_planted_dictionary():
    """Guards the training defaults: 32 unit features in 16 dims, 2 active per row (uniform
    magnitudes), 64 latents, default settings apart from sizes → ≥ 90% of the features have a
    decoder row at cosine > 0.9 (bench/fidelity.py is the full benchmark)."""
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(32, D_IN, generator=g), dim=1)
    n = 65536
    active = torch.rand(n, 32, generator=g).topk(2, dim=1).indices
    x = torch.zeros(n, 32).scatter_(1, active, 0.5 + torch.rand(n, 2, generator=g)) @ features
    L.seed_everything(0, verbose=False)
    module = SAEModule({"d_sae": 64, "k": 2}, d_in=D_IN)
    module.initialize(x[:8192])
    trainer = L.Trainer(accelerator="cpu", max_steps=500, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, gradient_clip_val=1.0)
    trainer.fit(module, DataLoader(list(x.split(256)), batch_size=None))
    decoder = torch.nn.functional.normalize(module.export_sae().W_dec, dim=1)
    best = (features @ decoder.t()).max(dim=1).values
    assert float((best > 0.9).float().mean()) >= 0.9, best.sort().values.tolist()
