"""Stage settings are frozen dataclasses built from Hydra mappings; these helpers give every stage
the same checks and the same error messages (naming the config section and the valid keys)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Any


def dataclass_kwargs(cls: type, cfg: Mapping[str, Any] | None, section: str, ignore: Iterable[str] = ()) -> dict[str, Any]:
    """`cfg` as keyword arguments of dataclass `cls`, keys in `ignore` dropped; unknown keys raise."""
    ignore = set(ignore)
    kwargs = {k: v for k, v in dict(cfg or {}).items() if k not in ignore}
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"unknown {section} keys {unknown}; valid keys are {sorted(known | ignore)}")
    return kwargs


def require_at_least(settings: Any, section: str, minimum: float, names: Iterable[str]) -> None:
    """Raise naming `section.name` when any of the named attributes is below `minimum`."""
    for name in names:
        value = getattr(settings, name)
        if value < minimum:
            raise ValueError(f"{section}.{name} must be >= {minimum}, got {value}")
