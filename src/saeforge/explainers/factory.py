"""Build an explainer client from the Hydra ``explainer`` config group node."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saeforge.explainers.base import ChatParams, ExplainerClient

KINDS = ("local", "openai")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _cache_dir(cfg: Any) -> Path | None:
    value = _get(cfg, "cache_dir")
    return Path(str(value)).expanduser() if value else None


def make_client(cfg: Any, lm: tuple[Any, Any] | None = None) -> ExplainerClient:
    """An :class:`ExplainerClient` for ``cfg.kind``.

    ``kind: openai`` talks to ``cfg.base_url`` (vLLM, OpenRouter, OpenAI); ``kind: local`` wraps
    the already-loaded ``lm = (model, tokenizer)`` in-process.
    """
    kind = _get(cfg, "kind")
    if kind == "openai":
        from saeforge.explainers.openai_compat import OpenAICompatClient

        for key in ("base_url", "model"):
            if not _get(cfg, key):
                raise ValueError(f"explainer.{key} is required for kind=openai")
        return OpenAICompatClient(
            base_url=str(_get(cfg, "base_url")),
            model=str(_get(cfg, "model")),
            api_key_env=_get(cfg, "api_key_env"),
            max_in_flight=int(_get(cfg, "max_in_flight", 32)),
            max_retries=int(_get(cfg, "max_retries", 5)),
            timeout_s=float(_get(cfg, "timeout_s", 120.0)),
            cache_dir=_cache_dir(cfg),
            prefill=bool(_get(cfg, "prefill", False)),
        )
    if kind == "local":
        from saeforge.explainers.local import LocalChatClient

        if lm is None:
            raise ValueError("explainer.kind=local needs the loaded (model, tokenizer) passed as lm")
        model, tokenizer = lm
        return LocalChatClient(
            model,
            tokenizer,
            max_batch=int(_get(cfg, "max_batch", 8)),
            cache_dir=_cache_dir(cfg),
            name=_get(cfg, "model"),
            prefill=bool(_get(cfg, "prefill", True)),
        )
    raise ValueError(f"explainer.kind must be one of {KINDS}, got {kind!r}")


def make_chat_params(cfg: Any) -> ChatParams:
    """``ChatParams`` from the explainer node's ``params`` sub-node (defaults where absent)."""
    node = _get(cfg, "params") or {}
    fields = ("temperature", "top_p", "max_tokens", "logprobs", "top_logprobs", "seed", "repetition_penalty", "stop")
    values = {k: _get(node, k) for k in fields if _get(node, k) is not None}
    if "stop" in values:
        values["stop"] = (values["stop"],) if isinstance(values["stop"], str) else tuple(str(s) for s in values["stop"])
    return ChatParams(**values)
