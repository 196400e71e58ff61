"""Context managers that capture or modify the residual stream at hookpoints (plain HF forward hooks)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from saeforge.lm.hookpoints import Hookpoint, decoder_layers, resolve_hookpoint


class StopForward(Exception):
    """Raised by a hook after the deepest requested hookpoint so later layers never run."""


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value,index]


@contextmanager
def capture_residual(
    model: nn.Module, hookpoints: list[str], stop_after: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Fill a dict {hookpoint: [B, T, d]} during a forward; optionally stop after the deepest one.

    Use with `run_until_captured` so the StopForward exception is swallowed.
    """
    resolved: list[Hookpoint] = [resolve_hookpoint(model, h) for h in hookpoints]
    deepest = max(h.layer for h in resolved)
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for hook in resolved:

        def fn(_module: nn.Module, _inputs: object, output: object, hook: Hookpoint = hook) -> None:
            captured[hook.name] = _hidden(output).detach()
            if stop_after and hook.layer == deepest and len(captured) == len(resolved):
                raise StopForward

        handles.append(hook.module.register_forward_hook(fn))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def stop_after_layer(model: nn.Module, layer: int) -> Iterator[None]:
    """Raise StopForward after block `layer` (for captures that hook other modules, e.g. LoRA)."""

    def fn(*_: object) -> None:
        raise StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(fn)
    try:
        yield
    finally:
        handle.remove()


def run_until_captured(model: nn.Module, **inputs: torch.Tensor) -> None:
    """Run the model's base forward (no LM head) and swallow StopForward."""
    base = getattr(model, "base_model_prefix", None)
    body = getattr(model, base, model) if base else model
    try:
        with torch.inference_mode():
            body(**inputs, use_cache=False)
    except StopForward:
        pass


@contextmanager
def patch_residual(model: nn.Module, hookpoint: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the residual output h [B, T, d] of a block with fn(h) during forwards (steering, splicing)."""
    hook = resolve_hookpoint(model, hookpoint)

    def replace(_module: nn.Module, _inputs: object, output: object) -> object:
        patched = fn(_hidden(output))
        return (patched, *output[1:]) if isinstance(output, tuple) else patched  # type: ignore[index]

    handle = hook.module.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def add_to_residual(model: nn.Module, hookpoint: str, vectors: torch.Tensor) -> Iterator[None]:
    """Add `vectors` ([d] or [B, d], one per batch row) to the residual output of a block at every position."""

    def add(hidden: torch.Tensor) -> torch.Tensor:
        delta = vectors.to(hidden.dtype)
        return hidden + (delta[:, None, :] if delta.dim() == 2 else delta)

    with patch_residual(model, hookpoint, add):
        yield
