"""Train SAEModule on fixed global batches, single-process or DDP; write the final state (for tests).

    python ddp_equivalence_script.py OUT.safetensors WORLD ARCH

Rank r of W gets rows [r·B/W, (r+1)·B/W) of every global batch, so DDP sees the same global
batches as a single process.
"""

import sys

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader, IterableDataset

from saeforge.sae.module import SAEModule

STEPS, GLOBAL_BATCH, D_IN = int(__import__("os").environ.get("DDP_TEST_STEPS", 12)), 128, 16


class Slices(IterableDataset):
    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return self.data.shape[0]

    def __iter__(self):
        rank, world = 0, 1
        if torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        per = GLOBAL_BATCH // world
        for batch in self.data:
            yield batch[rank * per : (rank + 1) * per]


def main() -> None:
    out, world, arch = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(6, D_IN, generator=gen)
    data = (torch.randn(STEPS, GLOBAL_BATCH, 6, generator=gen) @ basis) + 0.05 * torch.randn(STEPS, GLOBAL_BATCH, D_IN, generator=gen)
    torch.manual_seed(1)
    # AuxK off: its loss is normalised by each rank's residual variance, the one per-rank quantity.
    # DDP_TEST_RESAMPLE=N: resample every N steps (the worst rows then come from the global batch)
    resample = int(__import__("os").environ.get("DDP_TEST_RESAMPLE", 0))
    module = SAEModule({"architecture": arch, "d_sae": 64, "k": 4, "warmup_steps": 0, "auxk_coef": 0.0,
                        "resample_every": resample, "resample_until": 1.0, "resample_min_fires": 0.5}, D_IN)
    module.initialize(data.reshape(-1, D_IN))
    init_w_dec = module.sae.W_dec.detach().clone()
    trainer = L.Trainer(accelerator="cpu", devices=world, strategy="ddp" if world > 1 else "auto", max_steps=STEPS,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, DataLoader(Slices(data), batch_size=None))
    if trainer.is_global_zero:
        save_file({**{k: v.contiguous() for k, v in module.state_dict().items()}, "init.W_dec": init_w_dec}, out)


if __name__ == "__main__":
    main()
