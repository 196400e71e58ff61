"""On-disk response cache shared by every explainer client: one JSON file per request key."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

from saeforge.atomic import atomic_write_json
from saeforge.explainers.base import ChatParams, ChatResult, Message

log = logging.getLogger(__name__)


_LATER_FIELDS = {"repetition_penalty": 1.0, "stop": ()}
"""ChatParams fields added after the key format was set: left out of the key at these defaults,
so entries cached before they existed still hit."""


def request_key(model: str, messages: list[Message], params: ChatParams) -> str:
    """sha256 over (model, messages, params), canonical JSON."""
    fields = {k: v for k, v in dataclasses.asdict(params).items()
              if not (k in _LATER_FIELDS and v == _LATER_FIELDS[k])}
    payload = {"model": model, "messages": messages, "params": fields}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """Successful results stored as ``<root>/<key[:2]>/<key>.json``; errors are never stored.

    Files are written to a temp name and renamed, so a crash never leaves a half-written entry
    and concurrent writers of the same key are harmless.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"ResponseCache(root={str(self.root)!r})"

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> ChatResult | None:
        """The cached result (with ``cached=True``), or None on a miss or an unreadable entry."""
        path = self.path(key)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return ChatResult(text=data["text"], logprobs=data.get("logprobs"), cached=True)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable cache entry %s: %s", path, err)
            return None

    def put(self, key: str, result: ChatResult) -> None:
        """Store a successful result; errors are ignored (never cached)."""
        if result.status != "ok":
            return
        atomic_write_json(self.path(key), {"text": result.text, "logprobs": result.logprobs}, indent=None)
