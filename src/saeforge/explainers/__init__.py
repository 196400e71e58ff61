"""Explainer clients behind one small interface: local transformers, OpenAI-compatible servers."""

from saeforge.explainers.base import ChatParams, ChatRequest, ChatResult, ExplainerClient, Message, TokenLogprob
from saeforge.explainers.factory import make_chat_params, make_client

__all__ = [
    "ChatParams",
    "ChatRequest",
    "ChatResult",
    "ExplainerClient",
    "Message",
    "TokenLogprob",
    "make_chat_params",
    "make_client",
]
