"""Where saeforge finds things on disk: the one cache-root rule and the one installed-package finder."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_CACHE_ROOT = ".cache/saeforge"


def cache_root(configured: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: `configured` when given, else $SAEFORGE_CACHE, else `.cache/saeforge` (relative to cwd)."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("SAEFORGE_CACHE", DEFAULT_CACHE_ROOT)).expanduser()


def installed_package_folder(package: str, purpose: str) -> Path:
    """Folder of an installed package, found without importing it (its __init__ may need extras).

    `purpose` completes the error message: what needs the package and how to install it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: {purpose}")
    return Path(list(spec.submodule_search_locations)[0])
