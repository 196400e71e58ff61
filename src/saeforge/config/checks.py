"""Building typed settings from config mappings, with one-line errors that name the full key.

This module and `schema.py` are the bottom layer of saeforge: they import nothing else from it
(except `saeforge.paths`), so every other package can take its settings types from here.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad setting. `str(err)` is one line that names the full key (e.g. `data.batch_size`)."""


def require(ok: bool, key: str, message: str) -> None:
    """Raise ConfigError(`key message`) unless `ok`."""
    if not ok:
        raise ConfigError(f"{key} {message}")


def require_at_least(settings: Any, section: str, minimum: float, names: Iterable[str]) -> None:
    """Raise naming `section.name` when any of the named attributes is below `minimum`."""
    for name in names:
        value = getattr(settings, name)
        if value is None or value < minimum:
            raise ConfigError(f"{section}.{name} must be >= {minimum}, got {value}")


def _plain(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover
        return node
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def _dataclass_of(annotation: Any) -> type | None:
    """The dataclass inside `X` / `Optional[X]`, else None."""
    if dataclasses.is_dataclass(annotation):
        return annotation  # type: ignore[return-value]
    for arg in typing.get_args(annotation):
        if dataclasses.is_dataclass(arg):
            return arg  # type: ignore[return-value]
    return None


def from_config(cls: type[T], node: Mapping[str, Any] | Any | None, section: str, ignore: Iterable[str] = ()) -> T:
    """`node` (DictConfig, dict or None) as dataclass `cls`: defaults fill missing keys, unknown keys raise
    ConfigError naming `section.key` and the allowed keys; nested dataclass fields are built the same way."""
    if isinstance(node, cls):
        return node
    try:
        given = _plain(node)
    except Exception as err:  # omegaconf: a missing mandatory value (???) or a failed interpolation
        key = getattr(err, "full_key", None) or section
        raise ConfigError(f"{key}: {str(err).splitlines()[0]}") from err
    if dataclasses.is_dataclass(given):
        given = dataclasses.asdict(given)
    given = dict(given or {})
    for key in ignore:
        given.pop(key, None)
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(given) - set(known))
    prefix = f"{section}." if section else ""
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]}; allowed keys{' of ' + section if section else ''}: {', '.join(known)}")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # defaults that interpolate (${oc.env:...}) resolve on their own
        if f.init and f.name not in given:
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if _has_interpolation(default):
                kwargs[f.name] = _resolve_alone(default)
    for name, value in given.items():
        inner = _dataclass_of(hints.get(name))
        if inner is not None and isinstance(value, Mapping):
            value = from_config(inner, value, f"{prefix}{name}")
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{section or 'config'}: {err}") from err


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, str):
        return "${" in value
    return isinstance(value, list) and any(_has_interpolation(v) for v in value)


def _resolve_alone(value: Any) -> Any:
    """An interpolating default resolved without the rest of the config (None when it needs it)."""
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.create({"v": value}), resolve=True)["v"]
    except Exception:
        return None


def schema_keys(cls: type) -> dict[str, Any]:
    """field name → nested dataclass (or None) of a schema dataclass."""
    hints = typing.get_type_hints(cls)
    return {f.name: _dataclass_of(hints.get(f.name)) for f in dataclasses.fields(cls)}


def check_key_path(root: type, path: str, open_sections: Mapping[str, Any] = {}) -> None:
    """Raise ConfigError when the dotted `path` is not a key of the `root` schema.

    `open_sections` maps a top-level section to a callable checking its keys itself (e.g. `trainer`).
    """
    parts = path.split(".")
    if parts[0] in open_sections and len(parts) > 1:
        open_sections[parts[0]](parts[1])
        return
    cls: type | None = root
    for depth, part in enumerate(parts):
        if cls is None:
            return  # a free-form value (list/dict): nothing to check below it
        keys = schema_keys(cls)
        if part not in keys:
            where = ".".join(parts[:depth])
            allowed = ", ".join(keys)
            raise ConfigError(f"unknown key {'.'.join(parts[: depth + 1])}; allowed keys{' of ' + where if where else ''}: {allowed}")
        cls = keys[part]


_TRAINER_ARGS: list[str] | None = None


def trainer_arguments() -> list[str]:
    """The parameters of lightning.Trainer.__init__ (without `self`).

    Read from Lightning's source with `ast` (importing lightning takes seconds); the same list as
    `inspect.signature(lightning.Trainer.__init__)`, which is the fallback when the source is unreadable.
    """
    global _TRAINER_ARGS
    if _TRAINER_ARGS is None:
        _TRAINER_ARGS = _trainer_arguments_from_source() or _trainer_arguments_from_signature()
    return _TRAINER_ARGS


def _trainer_arguments_from_source() -> list[str] | None:
    import ast

    from saeforge.paths import installed_package_folder

    try:
        source = installed_package_folder("lightning", "training needs it") / "pytorch" / "trainer" / "trainer.py"
        tree = ast.parse(source.read_text())
    except (OSError, SyntaxError, ImportError):  # FileNotFoundError (not installed) is an OSError
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    args = item.args
                    names = [a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]]
                    return [n for n in names if n != "self"]
    return None


def _trainer_arguments_from_signature() -> list[str]:
    import inspect

    import lightning

    return [p for p in inspect.signature(lightning.Trainer.__init__).parameters if p != "self"]


def check_trainer_key(key: str) -> None:
    """A `trainer.*` key must be a lightning.Trainer argument (the group is passed through)."""
    params = trainer_arguments()
    if key not in params:
        raise ConfigError(f"unknown key trainer.{key}; allowed keys of trainer (lightning.Trainer arguments): {', '.join(params)}")


GROUPS = ("model", "corpus", "data", "sae", "trainer", "logger", "explainer")
"""Config groups: `group=option` selects a YAML file, `group.key=value` overrides a key."""


def check_overrides(overrides: Iterable[str], root: type) -> None:
    """Check the key of every command-line override against the `root` schema (one-line ConfigError).

    Runs before Hydra composes anything: `+data.batchsize=16` (which Hydra would add silently) fails here.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    for override in parsed:
        key = override.key_or_group
        if key.startswith("hydra") or override.is_delete():
            continue
        if "." not in key and key in GROUPS and not override.is_add():
            continue  # a group selection: Hydra checks the option name
        check_key_path(root, key, {"trainer": check_trainer_key})


SECRET_KEY_PATTERN = r"(api[_-]?key|token|secret|password|authorization)$"
"""A setting whose last key component matches this holds a secret (`explainer.api_key`, `auth_token`)."""
_SECRET_KEY = re.compile(SECRET_KEY_PATTERN, re.IGNORECASE)
_KEY_PREFIX = re.compile(r"^\s*(sk-|sk_|bearer\s|ghp_|hf_[A-Za-z0-9]{20}|xox[abp]-)", re.IGNORECASE)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
SECRET_HINT = ("secrets are not accepted on the command line (they would be written to the run's files); "
               "put the key in an environment variable and name that variable with explainer.api_key_env=VAR_NAME")


def mask(value: str) -> str:
    """What may be printed of a value that could be a secret: its first 3 characters, then ***."""
    return f"{str(value)[:3]}***"


def looks_like_key(value: str) -> bool:
    """A value shaped like an API key or token: an sk-/Bearer/hf_/ghp_… prefix."""
    return bool(_KEY_PREFIX.match(str(value).strip().strip("'\"")))


def _high_entropy(value: str) -> bool:
    """A long mixed-case-and-digits (or long hex) string: a key, not an environment-variable name."""
    value = str(value)
    mixed = len(value) >= 20 and all(any(test(c) for c in value) for test in (str.islower, str.isupper, str.isdigit))
    return mixed or bool(re.fullmatch(r"[0-9a-f]{32,}", value))


def check_env_name(key: str, value: str | None) -> None:
    """`*_env` settings name an environment variable; a key pasted there is refused without echoing it."""
    if value is None or value == "":
        return
    if looks_like_key(value) or _high_entropy(value) or not ENV_NAME.fullmatch(str(value)):
        raise ConfigError(f"{key}={mask(value)}: must be the NAME of an environment variable (like OPENAI_API_KEY), "
                          "not the key itself; put the key in that variable")


def check_secret_overrides(overrides: Iterable[str]) -> None:
    """Refuse command-line overrides that carry a secret, before Hydra writes them anywhere.

    A key that names a secret (`+explainer.api_key=...`, `...token=...`), a value shaped like a key, or a
    `*_env` value that is not an environment-variable name. The message never holds the value.
    """
    for arg in overrides:
        key, sep, value = str(arg).partition("=")
        key = key.lstrip("+~").strip()
        leaf = key.rsplit(".", 1)[-1].split("@", 1)[0]
        if not sep:
            continue
        if _SECRET_KEY.search(leaf) and value.strip() not in ("", "null"):
            raise ConfigError(f"{key}: {SECRET_HINT}")
        if leaf.endswith("_env"):
            check_env_name(key, value.strip().strip("'\"") if value.strip() not in ("", "null") else None)
        elif looks_like_key(value):
            raise ConfigError(f"{key}={mask(value)}: the value looks like an API key; {SECRET_HINT}")
