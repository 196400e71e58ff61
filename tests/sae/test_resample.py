"""Resampling moves dead and duplicate latents to the residual of the worst-reconstructed rows."""

import lightning as L
import torch
from torch.utils.data import DataLoader

from saeforge.sae.model import SAEConfig, SparseAutoencoder
from saeforge.sae.module import SAEModule, make_adam
from saeforge.sae.resample import count_fires_, pick_latents, resample_


def test_pick_latents_takes_latents_without_fires_and_later_duplicates():
    W = torch.eye(4, 3)[[0, 1, 2, 0]]  # latent 3 repeats latent 0; latent 1 dead
    W[3] += 0.01
    fires = torch.zeros(4, dtype=torch.long)
    count_fires_(fires, torch.tensor([0, 2, 3, 1, 0]), torch.tensor([1.0, 2.0, 3.0, 0.1, 0.5]), torch.tensor(0.2))
    assert fires.tolist() == [2, 0, 1, 1]  # latent 1's only kept value is below the threshold
    assert pick_latents(fires, W, 0.0, 1.0).tolist() == [1]
    assert pick_latents(fires, W, 0.0, 0.9).tolist() == [1, 3]
    assert pick_latents(fires, W, 1.5, 1.0).tolist() == [1, 2, 3]  # below 1.5 × the median (1)


def test_resample_moves_a_dead_latent_to_the_worst_residual_and_resets_its_adam_state():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=8, d_sae=6, k=2))
    opt = make_adam(sae.parameters(), 1e-3)
    x = torch.randn(32, 8)
    sae(x).mse.backward()
    opt.step()
    x_hat = x.clone()
    x_hat[7] -= 3 * torch.eye(8)[5]  # row 7 misses direction e5 entirely: the worst row
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    assert resample_(sae, opt, torch.tensor([4]), x, x_hat) == 1
    assert torch.allclose(sae.W_dec[4], torch.eye(8)[5])
    enc_norm = before["W_enc"][:, [0, 1, 2, 3, 5]].norm(dim=0).mean()
    assert torch.allclose(sae.W_enc[:, 4], torch.eye(8)[5] * enc_norm)
    assert float(sae.b_enc.detach()[4]) == 0.0
    others = [0, 1, 2, 3, 5]
    assert torch.equal(sae.W_dec[others], before["W_dec"][others])
    state = opt.state[sae.W_dec]
    assert float(state["exp_avg"][4].abs().sum()) == 0.0 and float(state["exp_avg_sq"][4].abs().sum()) == 0.0
    assert float(state["exp_avg_sq"][0].abs().sum()) > 0.0
    assert float(opt.state[sae.W_enc]["exp_avg"][:, 4].abs().sum()) == 0.0


def test_training_with_resampling_revives_a_dead_latent():
    """A latent that cannot fire (b_enc = -1e3) is moved by the first resampling and then fires."""
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(8, 8, generator=g), dim=1)
    n = 4096
    active = torch.rand(n, 8, generator=g).topk(2, dim=1).indices
    x = torch.zeros(n, 8).scatter_(1, active, 0.5 + torch.rand(n, 2, generator=g)) @ features
    L.seed_everything(0, verbose=False)
    module = SAEModule({"d_sae": 8, "k": 2, "resample_every": 10, "resample_until": 0.6, "warmup_steps": 5, "lr": 1e-2},
                       d_in=8)
    module.initialize(x[:1024])
    with torch.no_grad():
        module.sae.b_enc[3] = -1e3
    trainer = L.Trainer(accelerator="cpu", max_steps=40, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(list(x.split(128)), batch_size=None))
    assert float(module.sae.b_enc[3]) > -1.0
    assert int(module.resampled) >= 1  # the count the end-of-training line prints
    fires = module.sae.encode_inference(module.normalize(x[:1024])).gt(0).sum(0)
    assert int(fires[3]) > 0, fires.tolist()


def test_decoder_init_rows_points_every_latent_at_a_sample_row():
    torch.manual_seed(0)
    sample = torch.randn(256, 8) * 3 + 1
    module = SAEModule({"d_sae": 16, "k": 2, "decoder_init": "rows"}, d_in=8)
    module.initialize(sample)
    sae = module.sae
    rows = torch.nn.functional.normalize(module.normalize(sample) - sae.b_dec.detach(), dim=1)
    best = (torch.nn.functional.normalize(sae.W_dec.detach(), dim=1) @ rows.t()).max(dim=1).values
    assert torch.allclose(best, torch.ones(16), atol=1e-5)
    assert torch.allclose(sae.W_enc.detach(), sae.W_dec.detach().t())


def test_checkpoints_from_before_the_resampling_state_load_with_zero_counts():
    module = SAEModule({"d_sae": 8, "k": 2}, d_in=8)
    state = module.state_dict()
    old = {k: v for k, v in state.items() if k not in ("resample_fires", "resampled")}
    module.resample_fires.fill_(5)
    module.resampled.fill_(3)
    module.load_state_dict(old)  # strict: the hook supplies the missing keys
    assert int(module.resample_fires.sum()) == 0 and int(module.resampled) == 0
