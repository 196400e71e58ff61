"""The training fingerprint: every setting that changes the trained weights, so a rerun resumes only its own run.

A training run records `training_fingerprint(config)` in `run_config.yaml` and in every checkpoint. A rerun
into the same `run.dir` computes its own; where they differ it is refused (`fingerprint_changes` names each
key with its old and new value) instead of resuming weights trained under other settings.

In the fingerprint: `model.*` and `corpus.*` (which rows exist; left out for a user file, `data.path`, with
the `data` settings of a store, `STORE_ONLY`), `data.*`, `sae.*`, `seed`, and the `trainer` settings of the optimisation (precision, clipping,
accumulation, ...) with the number of ranks (each rank reads its own rows, so the rows of a step change
with it). Left out, so they may change on resume: `RESUMABLE` below, plus everything outside those
groups (logger, interpret_callback, checkpoint_every_n_steps, ckpt_path, overwrite, run, extract_only).
"""

from __future__ import annotations

from typing import Any, Mapping

RESUMABLE: dict[str, str] = {
    "trainer.max_steps": "extends (or shortens) a run",
    "trainer.max_epochs": "extends a run",
    "trainer.max_time": "extends a run",
    "trainer.accelerator": "where the same steps run",
    "trainer.strategy": "how ranks communicate (the number of ranks is fingerprinted)",
    "trainer.enable_progress_bar": "logging",
    "trainer.enable_model_summary": "logging",
    "trainer.log_every_n_steps": "logging",
    "trainer.val_check_interval": "validation only reads",
    "trainer.check_val_every_n_epoch": "validation only reads",
    "trainer.num_sanity_val_steps": "validation only reads",
    "trainer.limit_val_batches": "validation only reads",
    "trainer.profiler": "measurement",
    "trainer.enable_checkpointing": "when checkpoints are written",
    "trainer.default_root_dir": "where outputs go",
    "model.device": "where the model runs (the activation store is the same)",
    "data.cache_dir": "where the activation store lives",
    "data.extract_batch_size": "the same windows, batched differently",
    "data.extract_devices": "the same store, built by more processes",
    "data.verify": "checks the store, changes no row",
    "data.prefetch_batches": "the same batches, read ahead",
    "data.num_workers": "the same batches (tested)",
}
"""Settings that may differ on resume, with why (the README lists them)."""

GROUPS = ("model", "corpus", "data", "sae", "trainer")
STORE_ONLY = ("data.hookpoint", "data.hookpoints", "data.n_tokens", "data.ctx_len", "data.prepend_bos", "data.format",
              "data.store_dtype", "data.shard_tokens", "data.lora")
"""`data` settings that select the rows of an activation store: not in a user file's fingerprint (its rows are
the file's; `data.hookpoint` only names its export)."""


def training_fingerprint(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The result-changing settings of a training config, flat and sorted: `{"sae.k": 32, "seed": 0, ...}`.

    `settings`: plain, resolved groups `model`, `corpus`, `data`, `sae`, `trainer` (as the Trainer gets
    them, `precision: auto` resolved, `devices` the number of ranks per node) and `seed`.
    """
    user_file = bool((settings.get("data") or {}).get("path"))
    out: dict[str, Any] = {"seed": settings.get("seed")}
    for group in GROUPS:
        if user_file and group in ("model", "corpus"):
            continue  # a user file's rows do not depend on a model or corpus
        # one level deep: `data.lora` is one value whether it is null or a dict
        out.update({f"{group}.{key}": value for key, value in (settings.get(group) or {}).items()})
    out = {k: v for k, v in out.items() if k not in RESUMABLE and not (user_file and k in STORE_ONLY)}
    return dict(sorted(out.items()))


def fingerprint_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """`key: old → new` for every fingerprinted key whose value differs.

    A `trainer` key given on one side only is a change (`<unset>`); any other key found on one side only
    is a setting of another saeforge version, not a change of this run's settings.
    """
    missing = "<unset>"
    keys = sorted(k for k in set(old) | set(new) if k not in RESUMABLE and ((k in old and k in new) or k.startswith("trainer.")))
    return [f"{k}: {old.get(k, missing)!r} → {new.get(k, missing)!r}" for k in keys if old.get(k, missing) != new.get(k, missing)]
