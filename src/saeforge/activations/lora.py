"""Capture the scalar activations between A and B of LoRA adapters (the `lora` hookpoint).

For every decoder layer (ascending) and every adapted module type in `LORA_TYPE_ORDER` order
that the config selects, the output of `lora_A` (rank r) is taken; the per-token vector is the
concatenation in that fixed order, so d_in = n_layers × n_types × r and column block
(layer, type) starts at (layer_index * n_types + type_index) * r.
"""

from __future__ import annotations

import dataclasses
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from saeforge.lm.capture import run_until_captured, stop_after_layer
from saeforge.lm.hookpoints import LORA_MODULE_NAMES, LORA_TYPE_ORDER
from saeforge.lm.loading import LoadedLM

_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class LoraSite:
    """One captured lora_A: its layer, type and module."""

    layer: int
    kind: str
    rank: int
    module: nn.Module
    """The lora_A linear (its output is the captured rank-r vector)."""
    up: nn.Module | None = None
    """The lora_B linear (rank r → the adapted module's output width)."""
    scaling: float = 1.0
    """peft's scaling of lora_B's output (lora_alpha / r, or / sqrt(r) with rsLoRA)."""


def attach_adapter(model: nn.Module, adapter: str | Path) -> nn.Module:
    """Wrap `model` with a peft LoRA adapter from a folder; clear errors for a missing/mismatched one."""
    from peft import PeftModel

    path = Path(adapter).expanduser()
    cfg_path = path / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"data.lora.adapter={str(adapter)!r}: no adapter_config.json in that folder")
    adapter_cfg = json.loads(cfg_path.read_text())
    if adapter_cfg.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{cfg_path}: peft_type={adapter_cfg.get('peft_type')!r}, expected LORA")
    try:
        return PeftModel.from_pretrained(model, str(path)).eval()
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"LoRA adapter {path} does not match the model ({type(model).__name__}): {err}") from err


def with_adapter(lm: LoadedLM, adapter: str | Path, types: Sequence[str] | None) -> LoadedLM:
    """`lm` with the peft adapter attached and its `lora_sites` set (what interpreting a `lora` SAE needs)."""
    model = attach_adapter(lm.model, adapter)
    sites = lora_sites(model, list(types or LORA_TYPE_ORDER))
    return dataclasses.replace(lm, model=model, lora_sites=tuple(sites))


def lora_sites(model: nn.Module, types: Sequence[str]) -> list[LoraSite]:
    """All lora_A modules for the selected types, in the documented order (layer, then type order)."""
    unknown = set(types) - set(LORA_TYPE_ORDER)
    if unknown:
        raise ValueError(f"data.lora.types has unknown entries {sorted(unknown)}; allowed {list(LORA_TYPE_ORDER)}")
    found: dict[tuple[int, str], LoraSite] = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or not len(lora_a):
            continue
        match = _LAYER_RE.search(name + ".")
        kind = next((k for k, v in LORA_MODULE_NAMES.items() if name.endswith(v)), None)
        if match is None or kind is None or kind not in types:
            continue
        adapter_name, linear = next(iter(lora_a.items()))
        lora_b = getattr(module, "lora_B", None)
        up = lora_b[adapter_name] if isinstance(lora_b, nn.ModuleDict) and adapter_name in lora_b else None
        scaling = float((getattr(module, "scaling", None) or {}).get(adapter_name, 1.0))
        found[(int(match.group(1)), kind)] = LoraSite(int(match.group(1)), kind, linear.out_features, linear, up, scaling)
    if not found:
        raise ValueError(f"the adapter adapts none of the selected module types {list(types)}")
    order = {k: i for i, k in enumerate(LORA_TYPE_ORDER)}
    layers = sorted({layer for layer, _ in found})
    kinds = sorted({kind for _, kind in found}, key=order.__getitem__)
    missing = [(layer, kind) for layer in layers for kind in kinds if (layer, kind) not in found]
    if missing:
        raise ValueError(f"the adapter does not adapt every selected module in every layer; missing {missing[:5]}")
    return [found[(layer, kind)] for layer in layers for kind in kinds]


@contextmanager
def capture_lora(sites: list[LoraSite]) -> Iterator[list[torch.Tensor]]:
    """Collect each site's lora_A output [B, T, r] in site order; concatenate with `torch.cat(out, -1)`."""
    outputs: list[torch.Tensor | None] = [None] * len(sites)
    handles = []
    for i, site in enumerate(sites):

        def fn(_m: nn.Module, _i: object, out: torch.Tensor, i: int = i) -> None:
            outputs[i] = out.detach()

        handles.append(site.module.register_forward_hook(fn))
    try:
        yield outputs  # type: ignore[misc]
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def add_to_lora(sites: list[LoraSite], vectors: torch.Tensor) -> Iterator[None]:
    """Add `vectors` ([d_in] or [B, d_in] in the lora hookpoint's column order) to the lora_A outputs
    at every position: site i gets its rank-r slice, so lora_B sees A·x + slice (steering)."""
    handles, start = [], 0
    for site in sites:
        part = vectors[..., start : start + site.rank]
        start += site.rank

        def fn(_m: nn.Module, _i: object, out: torch.Tensor, part: torch.Tensor = part) -> torch.Tensor:
            delta = part.to(device=out.device, dtype=out.dtype)
            return out + (delta[:, None, :] if delta.dim() == 2 and out.dim() == 3 else delta)

        handles.append(site.module.register_forward_hook(fn))
    if start != vectors.shape[-1]:
        for handle in handles:
            handle.remove()
        raise ValueError(f"LoRA steering vector has width {vectors.shape[-1]}, the adapter's sites sum to {start}")
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def lora_activations(model: nn.Module, sites: list[LoraSite], input_ids: torch.Tensor) -> torch.Tensor:
    """The `lora` hookpoint's vectors [B, T, d_in] for `input_ids` (forward stopped after the deepest site)."""
    with capture_lora(sites) as out, stop_after_layer(model, max(s.layer for s in sites)):
        run_until_captured(model, input_ids=input_ids)
    return torch.cat(out, dim=-1)


def check_layout(sites: list[LoraSite], recorded: list[dict[str, Any]] | None, where: str) -> None:
    """ValueError when the adapter's sites differ from a store's recorded `lora_layout`."""
    if recorded is not None and [dict(r) for r in recorded] != layout(sites):
        raise ValueError(f"{where}: the recorded lora_layout does not match the adapter's modules "
                         f"(recorded {len(recorded)} sites, adapter {len(sites)}); pass the adapter the store was built with")


def layout(sites: list[LoraSite]) -> list[dict[str, int | str]]:
    """The column layout recorded in the manifest: [{layer, type, rank, start}, ...]."""
    rows, start = [], 0
    for site in sites:
        rows.append({"layer": site.layer, "type": site.kind, "rank": site.rank, "start": start})
        start += site.rank
    return rows
