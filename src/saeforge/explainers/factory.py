"""Build an explainer client from the typed `explainer` settings (saeforge.config.ExplainerConfig)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from saeforge.config import EXPLAINER_KINDS as KINDS
from saeforge.config import ChatParamsConfig, ExplainerConfig, from_config
from saeforge.explainers.base import ChatParams, ExplainerClient


def explainer_settings(cfg: ExplainerConfig | Mapping[str, Any] | Any) -> ExplainerConfig:
    """Typed explainer settings from a DictConfig / dict (defaults fill missing keys, unknown keys raise)."""
    return from_config(ExplainerConfig, cfg, "explainer")


def make_client(cfg: ExplainerConfig | Mapping[str, Any] | Any, lm: tuple[Any, Any] | None = None) -> ExplainerClient:
    """An :class:`ExplainerClient` for ``cfg.kind``.

    ``kind: openai`` talks to ``cfg.base_url`` (vLLM, OpenRouter, OpenAI); ``kind: local`` wraps
    the already-loaded ``lm = (model, tokenizer)`` in-process.
    """
    s = explainer_settings(cfg)
    cache_dir = Path(str(s.cache_dir)).expanduser() if s.cache_dir else None
    if s.kind == "openai":
        from saeforge.explainers.openai_compat import OpenAICompatClient

        return OpenAICompatClient(base_url=str(s.base_url), model=str(s.model), api_key_env=s.api_key_env,
                                  max_in_flight=s.max_in_flight, max_retries=s.max_retries, timeout_s=float(s.timeout_s),
                                  cache_dir=cache_dir, prefill=s.prefill)
    from saeforge.explainers.local import LocalChatClient

    if lm is None:
        raise ValueError("explainer.kind=local needs the loaded (model, tokenizer) passed as lm")
    model, tokenizer = lm
    return LocalChatClient(model, tokenizer, max_batch=s.max_batch, cache_dir=cache_dir, name=s.model, prefill=s.prefill)


def chat_params(params: ChatParamsConfig) -> ChatParams:
    """The request-level ChatParams (frozen, hashable) of the `explainer.params` settings."""
    return ChatParams(temperature=params.temperature, top_p=params.top_p, max_tokens=params.max_tokens,
                      logprobs=params.logprobs, top_logprobs=params.top_logprobs, seed=params.seed,
                      repetition_penalty=params.repetition_penalty, stop=tuple(params.stop))


def make_chat_params(cfg: ExplainerConfig | Mapping[str, Any] | Any) -> ChatParams:
    """``ChatParams`` from the explainer settings' ``params``."""
    if isinstance(cfg, ExplainerConfig):
        return chat_params(cfg.params)
    node = cfg.get("params") if isinstance(cfg, Mapping) or hasattr(cfg, "get") else None
    return chat_params(from_config(ChatParamsConfig, node, "explainer.params"))


__all__ = ["KINDS", "chat_params", "explainer_settings", "make_chat_params", "make_client"]
