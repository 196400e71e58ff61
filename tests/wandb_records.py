"""Read back an offline W&B run file (`run-*.wandb`): a 7-byte header, then 32 KiB blocks of
`<IHB` (crc, length, type) records whose payloads are `wandb_internal_pb2.Record` messages."""

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
    data = path.read_bytes()[HEADER:]
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


def read_run(run_dir: Path) -> dict[str, Any]:
    """{'history': [ {key: value} ...], 'summary': {...}, 'config': {...}} of the newest offline run."""
    from wandb.proto import wandb_internal_pb2

    files = sorted(run_dir.rglob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {run_dir}"
    history, summary, config = [], {}, {}
    for blob in payloads(files[-1]):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(blob)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
        elif kind == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.summary.update})
        elif kind == "config":
            config.update({item.key: _unwrap(json.loads(item.value_json)) for item in record.config.update})
    return {"history": history, "summary": summary, "config": config}
