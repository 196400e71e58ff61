"""A model's depth and width read cheaply (no weights loaded), so bad settings fail before any load.

tiny model: its config; a GGUF file: the `gguf` reader's metadata; a hub id or local HF folder:
AutoConfig; a LoRA capture: layers × captured types × rank from the adapter config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from saeforge.lm.hookpoints import LORA_MODULE_NAMES
from saeforge.paths import installed_package_folder


@dataclass(frozen=True)
class ModelDimensions:
    """What validation needs to know about a model."""

    n_layers: int
    """Decoder blocks (hookpoints layers.0 … layers.n_layers-1)."""
    d_model: int
    """Residual-stream width."""


def _gguf_dimensions(path: Path) -> ModelDimensions:
    from gguf import GGUFReader

    reader = GGUFReader(str(path), "r")
    arch_field = reader.fields["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()

    def value(key: str) -> int:
        f = reader.fields[f"{arch}.{key}"]
        return int(f.parts[f.data[0]][0])

    return ModelDimensions(value("block_count"), value("embedding_length"))


def model_dimensions(cfg: Mapping[str, Any]) -> ModelDimensions:
    """Depth and width of the model a `model` config names, without loading its weights."""
    tiny = cfg.get("tiny")
    if tiny is not None:
        return ModelDimensions(int(tiny.get("num_hidden_layers", 4)), int(tiny.get("hidden_size", 64)))
    gguf_file = cfg.get("gguf_file")
    if cfg.get("gguf_package"):
        folder = installed_package_folder(cfg["gguf_package"], "model.gguf_package names it; run `make setup`")
        return _gguf_dimensions(folder / str(gguf_file))
    name = str(cfg.get("name") or "")
    if not name:
        raise ValueError("model.name is empty: give a hub id, a local folder or a .gguf file")
    path = Path(os.path.expanduser(name))
    if path.suffix == ".gguf":
        return _gguf_dimensions(path)
    if gguf_file:
        return _gguf_dimensions(path / str(gguf_file))
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {"trust_remote_code": bool(cfg.get("trust_remote_code", False))}
    if cfg.get("revision"):
        kwargs["revision"] = cfg["revision"]
    try:
        config = AutoConfig.from_pretrained(name, **kwargs)
    except OSError as err:
        raise ValueError(f"model.name={name!r}: could not read its config ({str(err).splitlines()[0]})") from err
    text_cfg = getattr(config, "text_config", None) or config
    return ModelDimensions(int(text_cfg.num_hidden_layers), int(text_cfg.hidden_size))


def lora_width(adapter: str | os.PathLike[str], types: Sequence[str], n_layers: int) -> int:
    """d_in of the `lora` hookpoint: adapted layers × captured types × rank, from adapter_config.json."""

    cfg_path = Path(adapter).expanduser() / "adapter_config.json"
    if not cfg_path.is_file():
        raise ValueError(f"data.lora.adapter={str(adapter)!r}: no adapter_config.json in that folder")
    adapter_cfg = json.loads(cfg_path.read_text())
    targets = adapter_cfg.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    n_types = sum(1 for t in types if LORA_MODULE_NAMES.get(t) in targets) if targets else len(types)
    layers = adapter_cfg.get("layers_to_transform")
    n = len(layers) if isinstance(layers, list) else (1 if isinstance(layers, int) else n_layers)
    return n * n_types * int(adapter_cfg.get("r", 8))
