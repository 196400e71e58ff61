"""Hookpoint names → modules. `layers.N` is the residual stream output of decoder block N.

TransformerLens names (`blocks.N.hook_resid_post`) and HF module paths (`model.layers.N`) are
accepted as aliases and normalised to `layers.N`. The special name `lora` means the concatenated
LoRA A-activations (see `saeforge.activations.lora`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a module is needed, so name checks stay cheap
    from torch import nn

LORA_HOOKPOINT = "lora"
LORA_TYPE_ORDER = ("q", "k", "v", "o", "gate", "up", "down")
"""LoRA adapter types in the fixed order the `lora` hookpoint concatenates them per layer."""
LORA_MODULE_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
"""The module each LoRA type adapts (HF Llama-style names)."""
_PATTERNS = [
    re.compile(r"^layers\.(\d+)$"),
    re.compile(r"^blocks\.(\d+)\.hook_resid_post$"),
    re.compile(r"^(?:model\.)?(?:model\.|transformer\.|gpt_neox\.)?(?:layers|h)\.(\d+)$"),
]


@dataclass(frozen=True)
class Hookpoint:
    """A resolved residual hookpoint: canonical name, block index and the block module."""

    name: str
    layer: int
    module: nn.Module


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (Llama/Gemma `model.layers`, GPT-2 `transformer.h`, ...)."""
    from torch import nn

    config = getattr(model, "config", None)
    text_cfg = getattr(config, "text_config", None) or config
    n_layers = getattr(text_cfg, "num_hidden_layers", None)
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (n_layers is None or len(module) == n_layers):
            return module
    raise ValueError(f"could not find the decoder blocks of {type(model).__name__}")


def canonical_name(name: str) -> str:
    """Normalise an alias to `layers.N` (or `lora`); unknown shapes are returned unchanged."""
    if name == LORA_HOOKPOINT:
        return name
    for pattern in _PATTERNS:
        match = pattern.match(name)
        if match:
            return f"layers.{int(match.group(1))}"
    return name


def valid_hookpoints(n_layers: int) -> list[str]:
    return [f"layers.{i}" for i in range(n_layers)] + [LORA_HOOKPOINT]


def check_hookpoint(name: str, n_layers: int) -> str:
    """Canonical name, or a ValueError listing the valid ones (cheap: needs only the layer count)."""
    canonical = canonical_name(str(name))
    if canonical == LORA_HOOKPOINT:
        return canonical
    match = _PATTERNS[0].match(canonical)
    if not match or int(match.group(1)) >= n_layers:
        valid = valid_hookpoints(n_layers)
        raise ValueError(
            f"unknown hookpoint {name!r}; this model has {n_layers} blocks, valid hookpoints are "
            f"{valid[0]} … {valid[-2]} (aliases blocks.N.hook_resid_post), and {LORA_HOOKPOINT!r}"
        )
    return canonical


def resolve_hookpoint(model: nn.Module, name: str) -> Hookpoint:
    """Resolve a residual hookpoint on a loaded model."""
    layers = decoder_layers(model)
    canonical = check_hookpoint(name, len(layers))
    if canonical == LORA_HOOKPOINT:
        raise ValueError("the `lora` hookpoint is captured by saeforge.activations.lora, not as a block output")
    layer = int(canonical.split(".")[1])
    return Hookpoint(canonical, layer, layers[layer])


def hookpoint_layer(name: str) -> int | None:
    """Block index of a `layers.N` name (None for `lora`)."""
    canonical = canonical_name(name)
    return int(canonical.split(".")[1]) if canonical.startswith("layers.") else None


def layer_label(name: str) -> int | str:
    """The `layer` of an SAE's features in interpretation outputs (JSON keys, the summary CSV, steering file
    names): the block index N of `layers.N`; otherwise the canonical hookpoint name itself, so a `lora`
    feature (which spans every adapted layer) is labelled "lora", never None or blank."""
    layer = hookpoint_layer(name)
    return layer if layer is not None else canonical_name(name)
