"""Lightning checkpoints written through `saeforge.atomic`: each one (step checkpoints, last.ckpt) goes
to a temp name beside it, is fsynced and renamed, so a kill or a full disk mid-save leaves the previous
checkpoint in place and no truncated file under a checkpoint's name (a full disk: `DiskFullError`)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH

from saeforge.atomic import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic; pass it to the Trainer as `plugins=[AtomicCheckpointIO()]`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        # straight to the temp file (Lightning's own save serialises to memory first); torch's zip
        # writer keeps a write's OSError (ENOSPC) as its error's context, which atomic_path recognises
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            torch.save(checkpoint, handle)
