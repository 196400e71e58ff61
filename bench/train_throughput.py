"""Training throughput: saeforge's SAE step vs SAELens 6.54's BatchTopK training step (CPU),
against the floor, and end to end through train.py.

Ours: exactly the step SAEModule runs (thread policy `step_threads` included), without Lightning's loop overhead — normalise, forward
(dense encoder GEMM + sparse decode / sparse encoder backward), mse + AuxK, backward, remove the
decoder-parallel gradient, Adam step, renormalise decoder rows, dead-latent + threshold update.
SAELens: `BatchTopKTrainingSAE.training_forward_pass(TrainStepInput(...))`, the firing statistics,
backward, clip_grad_norm_(1.0), Adam step — the body of SAELens's `SAETrainer._train_step`.
Floor: the encoder-forward GEMM + ReLU alone, ReLU((x − b_dec)·W_enc + b_enc): the one dense term
a sparse-aware step must pay. All run on the same in-memory random activations, fp32, same thread
count; steps alternate (ours, theirs, floor, ours, ...) so background load hits all equally.
End to end (--e2e): `train.py data.path=<HDF5 file>` at the same shape streams from disk for
--e2e-steps steps in the same run (a file of e2e-steps + 2 batches, so the run ends inside its first
epoch; shuffle buffer of 2 read chunks, so it reads and shuffles as it trains); its final line
reports its training tokens/s (first step included), which is set against the bench step's,
timed before and after it (goal: >= 0.85x).

    python bench/train_throughput.py            # quick: 2 warm-up + 4 timed steps each (< 2 min)
    python bench/train_throughput.py --steps 20 --batch 4096 --threads 2
"""

from __future__ import annotations

import argparse
import math
import time

import torch


def make_ours(d_in: int, d_sae: int, k: float, sample: torch.Tensor):
    from saeforge.sae.module import SAEModule, make_adam

    module = SAEModule({"d_sae": d_sae, "k": k, "architecture": "batchtopk"}, d_in=d_in)
    module.initialize(sample)
    opt = make_adam(module.sae.parameters(), float(module.c["lr"]))

    def step(batch: torch.Tensor) -> None:
        with module.step_threads():
            x = module.normalize(batch)
            out = module.sae(x, dead_mask=module.tokens_since_fired >= int(module.c["dead_tokens"]))
            (out.mse + out.auxk_loss).backward()
            module.on_before_optimizer_step(opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            module.sae.normalize_decoder_()
            module._update_state(out.latent_indices, out.min_kept, batch.shape[0])

    return step


def make_floor(d_in: int, d_sae: int):
    """The encoder GEMM + ReLU alone, at the SAE's shapes."""
    W_enc, b_enc, b_dec = torch.randn(d_in, d_sae) / d_in**0.5, torch.zeros(d_sae), torch.zeros(d_in)

    def step(batch: torch.Tensor) -> None:
        torch.addmm(b_enc, batch - b_dec, W_enc).relu_()

    return step


def make_saelens(d_in: int, d_sae: int, k: float):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    opt = torch.optim.Adam(sae.parameters(), lr=2e-4, betas=(0.9, 0.999))
    since_fired = torch.zeros(d_sae)
    n_steps = [0]

    def step(batch: torch.Tensor) -> None:
        sae.train()
        out = sae.training_forward_pass(step_input=TrainStepInput(
            sae_in=batch, coefficients=sae.get_coefficients(), dead_neuron_mask=since_fired > 1000,
            n_training_steps=n_steps[0], is_logging_step=False,
        ))
        with torch.no_grad():
            did_fire = out.feature_acts.bool().float().sum(-2).bool()
            since_fired.add_(1)
            since_fired[did_fire] = 0
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        n_steps[0] += 1

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--d-in", type=int, default=576)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=float, default=32)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=4, help="timed steps per implementation")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--n-batches", type=int, default=4, help="distinct in-memory batches to cycle")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                   help="also run train.py on an HDF5 file of this shape and compare its tokens/s")
    p.add_argument("--e2e-steps", type=int, default=24, help="optimizer steps of the train.py run")
    p.add_argument("--stream-rss", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure peak RSS while streaming files of 1x and 10x the shuffle buffer")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = [torch.randn(args.batch, args.d_in) * 3 + 1 for _ in range(args.n_batches)]
    impls = {"saeforge": make_ours(args.d_in, args.d_sae, args.k, data[0][:2048]),
             "sae_lens": make_saelens(args.d_in, args.d_sae, args.k),
             "floor": make_floor(args.d_in, args.d_sae)}
    elapsed = dict.fromkeys(impls, 0.0)
    for i in range(args.warmup + args.steps):
        for name, step in impls.items():
            t0 = time.perf_counter()
            step(data[i % len(data)])
            if i >= args.warmup:
                elapsed[name] += time.perf_counter() - t0
    tps = {name: args.steps * args.batch / t for name, t in elapsed.items()}
    print(f"d_in={args.d_in} d_sae={args.d_sae} k={args.k} batch={args.batch} fp32 "
          f"threads={args.threads} steps={args.steps}")
    for name, v in tps.items():
        print(f"{name:>9}: {v:10.0f} tokens/s")
    print(f"    ratio: {tps['saeforge'] / tps['sae_lens']:.2f}x (saeforge / sae_lens)")
    print(f"    ratio: {tps['saeforge'] / tps['floor']:.2f}x (saeforge / floor: encoder GEMM + ReLU alone)")
    if args.e2e:
        e2e = train_entry_tokens_per_s(args)
        # the bench step timed again right after train.py: the load of a shared machine drifts over minutes,
        # so the end-to-end figure is set against the mean of the step's tokens/s before and after it
        t0 = time.perf_counter()
        for i in range(args.steps):
            impls["saeforge"](data[i % len(data)])
        after = args.steps * args.batch / (time.perf_counter() - t0)
        step = (tps["saeforge"] + after) / 2
        print(f"end to end: train.py streaming from an HDF5 file {e2e:10.0f} tokens/s = "
              f"{e2e / step:.2f}x the bench step ({step:.0f}: {tps['saeforge']:.0f} before it, {after:.0f} after it)")
    if args.stream_rss:
        stream_rss(args.d_in)


def train_entry_tokens_per_s(args: argparse.Namespace) -> float:
    """`train.py` on a random HDF5 file of this shape, --e2e-steps steps; the tokens/s it prints at the end."""
    import os
    import re
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import h5py

    root = Path(__file__).resolve().parents[1]
    # e2e_steps + 2 training batches, so that the run ends inside its first epoch (as a long run does, most of the
    # time) rather than on the end-of-epoch validation; the held-out 2% rounds up to whole read chunks. A shuffle
    # buffer of 2 read chunks makes the run stream (read, shuffle, emit) as it trains instead of loading the whole
    # file before its first step.
    read_rows, buffer_rows = 16384, 32768
    n_train = -(-args.batch * (args.e2e_steps + 2) // read_rows)
    n_val = 1
    while n_val < math.ceil((n_train + n_val) * 0.02):
        n_val += 1
    rows = (n_train + n_val) * read_rows
    with tempfile.TemporaryDirectory() as tmp:
        with h5py.File(f"{tmp}/acts.h5", "w") as f:
            ds = f.create_dataset("activations", shape=(rows, args.d_in), dtype="f4", chunks=(4096, args.d_in))
            for start in range(0, rows, 16384):
                stop = min(rows, start + 16384)
                ds[start:stop] = (torch.randn(stop - start, args.d_in) * 3 + 1).numpy()
        cmd = [sys.executable, str(root / "train.py"), f"data.path={tmp}/acts.h5", "logger=none", f"run.dir={tmp}/run",
               "trainer=cpu", "trainer.enable_progress_bar=false", f"trainer.max_steps={args.e2e_steps}",
               f"data.batch_size={args.batch}", f"checkpoint_every_n_steps={10 * args.e2e_steps}",
               f"sae.d_sae={args.d_sae}", f"sae.k={args.k}", f"data.read_rows={read_rows}", f"data.shuffle_buffer={buffer_rows}", "data.val_fraction=0.02"]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(root / "src")}
        out = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=env)
    found = re.search(r"training ([\d,]+) tokens/s", out.stdout)
    if out.returncode != 0 or not found:
        raise SystemExit(f"train.py failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(found.group(1).replace(",", ""))


def _stream_peak_rss(path: str, buffer_rows: int) -> tuple[float, int]:
    """Run in a fresh process: stream one epoch of `path` through the DataModule; peak RSS in MiB."""
    import resource

    from saeforge.sae.datamodule import ActivationDataModule

    dm = ActivationDataModule({"batch_size": 4096, "shuffle_buffer": buffer_rows, "read_rows": 16384, "val_fraction": 0.02},
                              path, None, seed=0)
    dm.setup()
    batches = sum(1 for _ in dm.train_dataloader())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, batches


def stream_rss(d_in: int, buffer_rows: int = 65536) -> None:
    """Peak RSS while streaming HDF5 files of 1x and 10x the shuffle buffer (goal: flat)."""
    import concurrent.futures
    import multiprocessing
    import tempfile

    import h5py
    import numpy as np

    print(f"\nstreaming memory (shuffle buffer {buffer_rows} rows x d_in {d_in}, fp32 = {buffer_rows * d_in * 4 / 2**20:.0f} MiB):")
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (1, 10):
            rows = buffer_rows * factor
            path = f"{tmp}/acts_{factor}x.h5"
            with h5py.File(path, "w") as f:
                ds = f.create_dataset("activations", shape=(rows, d_in), dtype="f4", chunks=(4096, d_in))
                rng = np.random.default_rng(0)
                for start in range(0, rows, 65536):
                    stop = min(rows, start + 65536)
                    ds[start:stop] = rng.standard_normal((stop - start, d_in), dtype=np.float32)
            ctx = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                rss, batches = pool.submit(_stream_peak_rss, path, buffer_rows).result()
            print(f"  file {factor:>2}x buffer ({rows * d_in * 4 / 2**20:6.0f} MiB on disk): peak RSS {rss:6.0f} MiB, {batches} batches")


if __name__ == "__main__":
    main()
