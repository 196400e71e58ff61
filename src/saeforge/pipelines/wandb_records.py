"""Read back offline W&B run files (`offline-run-*/run-*.wandb`) with no server: history, summary,
config, group and name, merged over every file of one run id (a resumed run appends a new file).

A file is a 7-byte header, then 32 KiB blocks of `<IHB` (crc, length, type) records whose payloads
are `wandb_internal_pb2.Record` messages."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
RECORD_HEADER = struct.calcsize("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def payloads(path: Path) -> list[bytes]:
    data = Path(path).read_bytes()[HEADER:]
    out, pending, pos = [], b"", 0
    while pos + RECORD_HEADER <= len(data):
        block_left = BLOCK - ((pos + HEADER) % BLOCK)
        if block_left < RECORD_HEADER:
            pos += block_left
            continue
        _crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + RECORD_HEADER : pos + RECORD_HEADER + length]
        pos += RECORD_HEADER + length
        if kind == FULL:
            out.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            out.append(pending + chunk)
        elif kind == 0 and length == 0:
            pos += BLOCK - ((pos + HEADER) % BLOCK) if (pos + HEADER) % BLOCK else 0
    return out


def _unwrap(value: Any) -> Any:
    """Some W&B versions store config entries as {"value": v, "desc": ...}; others store v itself."""
    if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
        return value["value"]
    return value


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_file(path: Path) -> dict[str, Any]:
    """One `.wandb` file: {'id', 'group', 'name', 'start', 'history': [...], 'summary': {...}, 'config': {...}}."""
    from wandb.proto import wandb_internal_pb2

    run: dict[str, Any] = {"id": None, "group": None, "name": None, "start": 0.0, "history": [], "summary": {}, "config": {}}
    for blob in payloads(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(blob)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(id=r.run_id, group=r.run_group or None, name=r.display_name or None,
                       start=r.start_time.seconds + r.start_time.nanos / 1e9)
            run["config"].update({item.key: _unwrap(json.loads(item.value_json)) for item in r.config.update})
        elif kind == "history":
            run["history"].append({_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            run["summary"].update({_key(item): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "config":
            run["config"].update({item.key: _unwrap(json.loads(item.value_json)) for item in record.config.update})
    return run


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """The files of one run id, oldest first, as one run: later summary/config values win; group and
    name from the first file that has them; `files` lists the files."""
    parts = sorted(parts, key=lambda p: (p["start"], str(p["path"])))
    out: dict[str, Any] = {"id": parts[0]["id"], "group": None, "name": None, "history": [], "summary": {}, "config": {},
                           "files": [p["path"] for p in parts]}
    for p in parts:
        out["group"] = out["group"] or p["group"]
        out["name"] = out["name"] or p["name"]
        out["history"] += p["history"]
        out["summary"].update(p["summary"])
        out["config"].update(p["config"])
    return out


def read_runs(root: Path) -> list[dict[str, Any]]:
    """Every offline run under `root`, one entry per run id (its files merged), oldest first."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(Path(root).rglob("offline-run-*/run-*.wandb")):
        part = {**read_file(path), "path": path}
        by_id.setdefault(part["id"] or path.stem, []).append(part)
    return sorted((_merge(parts) for parts in by_id.values()), key=lambda r: str(r["files"][0]))


def read_run(root: Path) -> dict[str, Any]:
    """The run of the newest offline run file under `root`, merged over every file with its id."""
    files = sorted(Path(root).rglob("offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
    if not files:
        raise FileNotFoundError(f"no offline W&B run under {root}")
    newest = files[-1].stem.removeprefix("run-")
    runs = [r for r in read_runs(root) if r["id"] == newest]
    return runs[0]
