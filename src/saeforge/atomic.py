"""Nothing is written half: every output file (or folder) goes to a temp name beside it, then is renamed.

The temp file is fsynced before the rename and its folder after it, so after a power loss the
final name holds either the old content or the whole new content, never an empty file.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def fsync_file(path: str | Path) -> None:
    """Flush a file's content to disk (the writer may have closed it already)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Flush a folder's entries (a rename into it) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path in `path`'s folder; rename it over `path` on success, delete it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_leftovers(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        fsync_file(tmp)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _owner() -> str:
    """Marks temp files and folders with their writer, so a later writer can remove those of a killed one."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_dead_leftovers(path: Path) -> None:
    """Delete temp files / temp and old folders beside `path` left by a writer on this host that no longer runs (kill -9)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(?P<host>.+)-(?P<pid>\d+)\.(old-[0-9a-f]+|[^.]+\.tmp)$")
    host = socket.gethostname()
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*"):
        match = pattern.match(sibling.name)
        if not match or match["host"] != host:
            continue
        pid = int(match["pid"])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
            continue  # its writer still runs
        except ProcessLookupError:
            pass  # dead: its folder is garbage
        except PermissionError:
            continue  # alive, another user's
        if sibling.is_dir():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on success it takes `path`'s name, on error it is deleted.

    An existing folder at `path` is renamed aside, replaced by the new one, then deleted.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        for file in tmp.rglob("*"):
            if file.is_file():
                fsync_file(file)
        fsync_dir(tmp)
        if path.exists():
            old = path.parent / f".{path.name}.{_owner()}.old-{uuid.uuid4().hex[:8]}"
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
        fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2, **dumps_kwargs: Any) -> None:
    """JSON (UTF-8, non-ASCII kept) written atomically; `dumps_kwargs` go to `json.dumps`."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, **dumps_kwargs) + "\n")
