"""Check an activation store's shards against its manifest before anything trains on them.

- Every open: each shard file's header (rows, width) must match the manifest's row counts and d_in.
- Hashes: each shard's `sha256` (recorded as it was written, see store.py) is checked on the
  first use of a hookpoint after the manifest was written, then `verified.json` records that (atomically)
  so later opens skip the read; `always=True` (`data.verify=true`) checks them on every open.
- Stores written before hashes existed still open: their hash check is skipped, with one log line.
A mismatch raises `CorruptStoreError` naming the shard and how to rebuild (`overwrite=[cache]`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from saeforge.activations.store import MANIFEST, VERIFIED, sha256_file, sha256_h5_rows
from saeforge.atomic import atomic_write_json

log = logging.getLogger(__name__)

_told_unhashed: set[str] = set()
"""Stores (folder, hookpoint) already logged as having no hashes, so the line appears once."""


class CorruptStoreError(ValueError):
    """A store's shard does not match its manifest."""


def corrupt(root: Path, shard: Path | str, what: str) -> CorruptStoreError:
    return CorruptStoreError(
        f"activation store shard {shard} is corrupt: {what}. Rebuild the store with overwrite=[cache] "
        f"(it is {root}; the same config recreates it)"
    )


def check_shapes(root: Path, manifest: dict[str, Any], hookpoint: str, shapes: dict[Path, tuple[int, int]]) -> None:
    """Rows and width of each shard file (from its header) against the manifest."""
    d_in = manifest.get("d_in", {}).get(hookpoint)
    expected: dict[Path, int] = {}
    for shard in manifest["shards"][hookpoint]:
        expected[root / shard["path"]] = expected.get(root / shard["path"], 0) + int(shard["rows"])
    for path, (rows, width) in shapes.items():
        if rows != expected[path]:
            raise corrupt(root, path, f"it holds {rows} rows, the manifest says {expected[path]}")
        if d_in is not None and width != int(d_in):
            raise corrupt(root, path, f"its rows are {width} wide, the manifest says d_in={d_in}")


def _verified_path(root: Path) -> Path:
    return root / VERIFIED


def _read_verified(root: Path, manifest_hash: str) -> dict[str, Any]:
    """verified.json when it belongs to this manifest, else {}."""
    try:
        data = json.loads(_verified_path(root).read_text())
    except (OSError, ValueError):
        return {}
    return data if data.get("manifest_sha256") == manifest_hash else {}


def verify_hashes(root: Path, manifest: dict[str, Any], hookpoint: str, always: bool = False) -> bool:
    """Check every shard's sha256 of `hookpoint` (see the module docstring); True when it read them."""
    shards = manifest["shards"][hookpoint]
    if not shards or any("sha256" not in s for s in shards):
        key = f"{root}:{hookpoint}"
        if key not in _told_unhashed:
            _told_unhashed.add(key)
            log.info("activation store %s (%s) has no shard hashes (written by an older version): "
                     "checking row counts only; rebuild with overwrite=[cache] to add them", root, hookpoint)
        return False
    manifest_hash = sha256_file(root / MANIFEST)
    verified = _read_verified(root, manifest_hash)
    if not always and hookpoint in verified.get("hookpoints", {}):
        return False
    t0 = time.perf_counter()
    over = (manifest.get("integrity") or {}).get("over", "file bytes")
    for shard in shards:
        path = root / shard["path"]
        if over == "file bytes":
            actual = sha256_file(path)
        else:
            start = int(shard["first_row"])
            try:
                actual = sha256_h5_rows(path, start, start + int(shard["rows"]))
            except (OSError, KeyError) as err:
                raise corrupt(root, path, f"rows {start}+ cannot be read ({err})") from err
        if actual != shard["sha256"]:
            first = int(shard["first_row"])
            where = "" if over == "file bytes" else f" (rows {first}-{first + int(shard['rows'])})"
            raise corrupt(root, path,
                          f"its sha256{where} {actual[:12]}… differs from the manifest's {shard['sha256'][:12]}…")
    log.info("verified %d shard hashes of %s (%s) in %.1f s", len(shards), root, hookpoint, time.perf_counter() - t0)
    verified = _read_verified(root, manifest_hash) or {"manifest_sha256": manifest_hash, "hookpoints": {}}
    verified["hookpoints"][hookpoint] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        atomic_write_json(_verified_path(root), verified)
    except OSError as err:  # a read-only store still trains; it is verified again next time
        log.warning("could not record the verification in %s: %s", _verified_path(root), err)
    return True

