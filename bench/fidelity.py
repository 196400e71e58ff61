"""Planted-dictionary fidelity: does training recover a dictionary we know?

Each problem plants F = ratio·d unit features in d dimensions. A row is x = Σ a_j·f_j + noise over
its active features: about k of them (Poisson, at least 1), picked with Zipf-like frequencies;
magnitudes are heavy-tailed (log-normal, σ = 1) or uniform; in `correlated` problems features come
in pairs whose second member joins the first half of the time. The SAE has d_sae = F latents.

saeforge trains through the public path, `train.py data.path=<file.h5>` in a subprocess (any extra
overrides after `--ours`), and the exported SAE (what users load) is scored. SAELens trains its
BatchTopK SAE on the same rows in the same number of steps and batch size, with its own defaults
(the body of `SAETrainer._train_step`; inference = JumpReLU at its learned `topk_threshold`).

Printed per problem and trainer:
  MMCS    mean over true features of the best decoder cosine
  rec>.9  share of true features whose best decoder cosine is > 0.9
  FVU, L0 on held-out rows (inference mode)
  dead    latents that never fire on the held-out rows
  dup     live latents whose decoder cosine to another live latent is > 0.9 (all but one per group)

    python bench/fidelity.py                          # default set: 3 problems x 1500 steps x 1024 rows
    python bench/fidelity.py --problems all --steps 3000
    python bench/fidelity.py --ours sae.auxk_coef=0.1 # try a candidate setting
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Problem:
    d: int
    """Input dimension."""
    ratio: int
    """True features per input dimension (F = ratio·d = d_sae)."""
    k: int
    """Mean active features per row."""
    heavy: bool = True
    """Log-normal magnitudes (else uniform in [0.5, 1.5])."""
    correlated: bool = False
    """Features come in pairs: the second joins the first half of the time."""

    @property
    def n_features(self) -> int:
        return self.ratio * self.d


PROBLEMS = {
    "d64x4k4": Problem(64, 4, 4),
    "d128x2k8c": Problem(128, 2, 8, correlated=True),
    "d256x8k16": Problem(256, 8, 16),
    "d512x2k2c": Problem(512, 2, 2, heavy=False, correlated=True),
    "d128x8k4": Problem(128, 8, 4, correlated=True),
    "d512x4k16": Problem(512, 4, 16),
    "d32x2k2u": Problem(32, 2, 2, heavy=False),
    "d64x2k4u": Problem(64, 2, 4, heavy=False),
    "d64x4k4u": Problem(64, 4, 4, heavy=False),
    "d128x2k8": Problem(128, 2, 8),
}
DEFAULT = ["d64x4k4", "d128x2k8c", "d256x8k16"]


def plant(p: Problem, n_rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(dictionary [F, d] of unit rows, rows [n_rows, d]) for problem `p`."""
    g = torch.Generator().manual_seed(seed)
    F = p.n_features
    D = torch.nn.functional.normalize(torch.randn(F, p.d, generator=g), dim=1)
    freq = 1.0 / torch.arange(1, F + 1).float() ** 0.5  # Zipf-like: the rarest ~ 1/sqrt(F) of the most common
    freq = freq[torch.randperm(F, generator=g)]
    n_draw = torch.poisson(torch.full((n_rows,), float(p.k) / (1.5 if p.correlated else 1.0)), generator=g).clamp_min(1).long()
    width = int(n_draw.max())
    idx = _draw(freq, n_rows, width, g)
    present = torch.arange(width)[None, :] < n_draw[:, None]
    if p.heavy:
        mag = torch.exp(torch.randn(n_rows, width, generator=g))
    else:
        mag = 0.5 + torch.rand(n_rows, width, generator=g)
    codes = torch.zeros(n_rows, F)
    codes.scatter_(1, idx, mag * present)
    if p.correlated:  # feature 2i+1 joins feature 2i half of the time
        lead = codes[:, 0::2]
        join = (lead > 0) & (torch.rand(lead.shape, generator=g) < 0.5)
        follow = torch.exp(torch.randn(lead.shape, generator=g)) if p.heavy else 0.5 + torch.rand(lead.shape, generator=g)
        codes[:, 1::2] = torch.where(join, follow, codes[:, 1::2])
    x = codes @ D + 0.01 * torch.randn(n_rows, p.d, generator=g)
    return D, x


def _draw(freq: torch.Tensor, n_rows: int, width: int, g: torch.Generator) -> torch.Tensor:
    """multinomial without replacement, in row blocks (memory)."""
    out = []
    for start in range(0, n_rows, 8192):
        n = min(8192, n_rows - start)
        out.append(torch.multinomial(freq.expand(n, -1), width, generator=g))
    return torch.cat(out)


@torch.no_grad()
def score(D: torch.Tensor, W_dec: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, acts: torch.Tensor) -> dict[str, float]:
    """MMCS, recovered share, FVU, L0, dead and duplicate latents (see the module docstring)."""
    from saeforge.sae import metrics

    W = torch.nn.functional.normalize(W_dec.float(), dim=1)
    best = (D @ W.t()).max(dim=1).values
    live = acts.gt(0).any(dim=0)
    Wl = W[live]
    sim = Wl @ Wl.t()
    sim.fill_diagonal_(0)
    dup = int((sim.triu() > 0.9).any(dim=0).sum())
    return {"MMCS": float(best.mean()), "rec>.9": float((best > 0.9).float().mean()),
            "FVU": float(metrics.fvu(x, x_hat)), "L0": float(metrics.l0(acts)),
            "dead": float((~live).float().mean()), "dup": dup / W.shape[0]}


def run_ours(h5: str, p: Problem, steps: int, batch: int, run_dir: str, overrides: list[str], threads: int) -> tuple[object, float, str]:
    """train.py on the HDF5 file; returns (exported SAE, wall seconds, the last line train.py printed)."""
    from saeforge.sae.formats import load_sae

    cmd = [sys.executable, str(ROOT / "train.py"), f"data.path={h5}", "logger=none", f"run.dir={run_dir}",
           "trainer=cpu", "trainer.enable_progress_bar=false", f"trainer.max_steps={steps}",
           f"data.batch_size={batch}", f"data.shuffle_buffer={16 * batch}", f"data.read_rows={4 * batch}",
           "data.val_fraction=0.02", f"checkpoint_every_n_steps={steps}", f"sae.d_sae={p.n_features}",
           f"sae.k={p.k}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"train.py failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    weights = glob.glob(f"{run_dir}/sae/*/sae_weights.safetensors")
    sae, _ = load_sae(Path(weights[0]).parent)
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    return sae, wall, lines[-1] if lines else ""


def run_saelens(x_train: torch.Tensor, p: Problem, steps: int, batch: int, seed: int):
    """SAELens's BatchTopK SAE trained with its defaults (lr 3e-4, Adam(0.9, 0.999), clip 1.0, AuxK)."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    torch.manual_seed(seed)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=p.d, d_sae=p.n_features, k=float(p.k)))
    opt = torch.optim.Adam(sae.parameters(), lr=3e-4, betas=(0.9, 0.999))
    since_fired = torch.zeros(p.n_features)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(x_train.shape[0], generator=g)
    pos = 0
    sae.train()
    for step in range(steps):
        if pos + batch > order.numel():
            order, pos = torch.randperm(x_train.shape[0], generator=g), 0
        xb = x_train[order[pos:pos + batch]]
        pos += batch
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=xb, coefficients=sae.get_coefficients(), dead_neuron_mask=since_fired > 1000,
            n_training_steps=step, is_logging_step=False))
        with torch.no_grad():
            fired = out.feature_acts.bool().any(0)
            since_fired.add_(1)
            since_fired[fired] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return sae


@torch.no_grad()
def saelens_inference(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(acts, x_hat): JumpReLU at the learned topk_threshold, SAELens's inference conversion."""
    _, pre = sae.encode_with_hidden_pre(x)
    acts = pre.relu() * (pre > sae.topk_threshold)
    return acts, sae.decode(acts)


def fmt(name: str, trainer: str, s: dict[str, float], wall: float) -> str:
    return (f"{name:>11} {trainer:>9} {s['MMCS']:6.3f} {100 * s['rec>.9']:6.1f}% {s['FVU']:7.4f} {s['L0']:6.2f} "
            f"{100 * s['dead']:5.1f}% {100 * s['dup']:5.1f}% " + ("      –" if math.isnan(wall) else f"{wall:6.0f}s"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default=",".join(DEFAULT), help=f"comma list or 'all' ({', '.join(PROBLEMS)})")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=200_000, help="training rows (reused over epochs)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-saelens", action="store_true")
    ap.add_argument("--ours", nargs="*", default=[], help="extra train.py overrides for saeforge")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = list(PROBLEMS) if args.problems == "all" else args.problems.split(",")
    print(f"steps={args.steps} batch={args.batch} rows={args.rows} overrides={args.ours}")
    print(f"{'problem':>11} {'trainer':>9} {'MMCS':>6} {'rec>.9':>7} {'FVU':>7} {'L0':>6} {'dead':>6} {'dup':>6} {'wall':>7}")
    totals: dict[str, list[dict[str, float]]] = {}
    for name in names:
        p = PROBLEMS[name]
        for seed in range(args.seeds):
            D, x = plant(p, args.rows + 20_000, seed)
            x_train, x_test = x[:args.rows], x[args.rows:]
            with tempfile.TemporaryDirectory() as tmp:
                h5 = f"{tmp}/acts.h5"
                with h5py.File(h5, "w") as f:
                    f.create_dataset("activations", data=x_train.numpy(), chunks=(min(4096, args.rows), p.d))
                sae, wall, last = run_ours(h5, p, args.steps, args.batch, f"{tmp}/run", args.ours, args.threads)
            acts = sae.encode_inference(x_test)
            s = score(D, sae.W_dec, x_test, sae.decode(acts), acts)
            totals.setdefault("saeforge", []).append(s)
            print(fmt(f"{name}/{seed}", "saeforge", s, wall), flush=True)
            if not args.no_saelens:
                t0 = time.perf_counter()
                ref = run_saelens(x_train, p, args.steps, args.batch, seed)
                wall = time.perf_counter() - t0
                acts, x_hat = saelens_inference(ref, x_test)
                s = score(D, ref.W_dec, x_test, x_hat, acts)
                totals.setdefault("sae_lens", []).append(s)
                print(fmt(f"{name}/{seed}", "sae_lens", s, wall), flush=True)
    for trainer, rows in totals.items():
        mean = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
        print(fmt("mean", trainer, mean, math.nan))


if __name__ == "__main__":
    main()
