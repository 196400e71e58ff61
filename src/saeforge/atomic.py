"""Nothing is written half: every output file (or folder) goes to a temp name beside it, then is renamed.

The temp file is fsynced before the rename and its folder after it, so after a power loss the
final name holds either the old content or the whole new content, never an empty file.

A full disk (ENOSPC, also where a library reports it inside its own error: torch's zip writer,
safetensors, h5py) while writing raises `DiskFullError`, whose str() is one line: the final path, the
bytes written so far and the free bytes of its folder. The temp is deleted and an old file kept, so a
rerun after space is freed resumes.

Test-only fault injection: `SAEFORGE_FAULT_ENOSPC=<glob or substring of a final path>` makes every
write whose final path matches raise ENOSPC at commit time (the temp complete, before the rename),
so tests check full-disk handling without filling a disk. Never set it outside tests.
"""

from __future__ import annotations

import errno
import fnmatch
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

FAULT_ENOSPC = "SAEFORGE_FAULT_ENOSPC"
"""Test-only: writes whose final path matches this glob (or contains this substring) fail with ENOSPC."""


class DiskFullError(OSError):
    """No space left writing `path` (errno ENOSPC); str() is one line with the bytes needed (if known) and free."""

    def __init__(self, path: str | Path, needed: int | None = None):
        self.path, self.needed = Path(path), needed
        folder = self.path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            self.free: int | None = shutil.disk_usage(folder).free
        except OSError:
            self.free = None
        need = f"needs ~{needed} bytes, " if needed else ""
        free = f"{self.free} bytes free on {folder}" if self.free is not None else f"free space on {folder} unknown"
        self.message = f"no space left on device writing {self.path} ({need}{free})"
        super().__init__(errno.ENOSPC, self.message, str(self.path))

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[Any, ...]:  # picklable: an error sent back from a worker process
        return type(self), (self.path, self.needed)


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err`, then the errors it was raised from or during (`__cause__`, else `__context__`)."""
    seen: set[int] = set()
    node: BaseException | None = err
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        yield node
        node = node.__cause__ or node.__context__


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` or an error in its chain is ENOSPC: by errno, or by the OS message inside a library's
    error (safetensors, h5py; torch's zip writer keeps the OSError as its context)."""
    return any((isinstance(e, OSError) and e.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(e)
               for e in _chain(err))


_MESSAGE = re.compile(r"no space left on device writing (?P<path>.+?) \((?:needs ~(?P<needed>\d+) bytes, )?")


def disk_full_error(err: BaseException) -> DiskFullError | None:
    """The DiskFullError in `err`'s chain; else one rebuilt from its message inside another error's text (a
    worker process's traceback); else one made from a bare ENOSPC there (its file name if known); else None."""
    found = next((e for e in _chain(err) if isinstance(e, DiskFullError)), None)
    if found is not None:
        return found
    for e in _chain(err):
        if match := _MESSAGE.search(str(e)):
            return DiskFullError(match["path"], int(match["needed"]) if match["needed"] else None)
    if not is_disk_full(err):
        return None
    filename = next((e.filename for e in _chain(err) if isinstance(e, OSError) and e.filename), None)
    return DiskFullError(filename or "?")


@contextmanager
def disk_full_as(path: str | Path, tmp: str | Path | None = None) -> Iterator[None]:
    """Turn ENOSPC raised inside into `DiskFullError` for the final path `path` (bytes needed: `tmp`'s size so far)."""
    try:
        yield
    except DiskFullError:
        raise
    except BaseException as err:
        if not is_disk_full(err):
            raise
        raise DiskFullError(path, _size(tmp) if tmp is not None else None) from err


def _size(path: str | Path) -> int | None:
    """Bytes of a file, or of all files under a folder; None if unreadable."""
    path = Path(path)
    try:
        if path.is_dir():
            return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return path.stat().st_size
    except OSError:
        return None


def inject_fault(path: str | Path, tmp: str | Path) -> None:
    """Test-only: raise ENOSPC for the final path `path` when $SAEFORGE_FAULT_ENOSPC matches it."""
    pattern = os.environ.get(FAULT_ENOSPC)
    if pattern and (pattern in str(path) or fnmatch.fnmatch(str(path), pattern)):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp))


def reserve_blocks(path: str | Path) -> None:
    """Allocate the disk blocks of a (sparse) file before it is memory-mapped and written: without this, a
    full disk kills the process with SIGBUS at some page write; with it, `DiskFullError` now. A filesystem
    that cannot allocate ahead is left as it is. $SAEFORGE_FAULT_ENOSPC applies (test-only)."""
    path = Path(path)
    with disk_full_as(path, path):
        inject_fault(path, path)
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise
        except AttributeError:  # no posix_fallocate (macOS, Windows)
            pass
        finally:
            os.close(fd)


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
    with disk_full_as(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_leftovers(path)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    tmp = Path(name)
    try:
        with disk_full_as(path, tmp):
            yield tmp
            commit_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def commit_file(tmp: Path, path: Path) -> None:
    """Give the finished temp file `tmp` the name `path`: fsync it, rename, fsync the folder.
    Where $SAEFORGE_FAULT_ENOSPC matches `path` it raises ENOSPC instead (test-only)."""
    inject_fault(path, tmp)
    os.chmod(tmp, 0o644)
    fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(path.parent)


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
    with disk_full_as(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_leftovers(path)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_owner()}.", suffix=".tmp", dir=path.parent))
    try:
        with disk_full_as(path, tmp):
            yield tmp
            inject_fault(path, tmp)
            _commit_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _commit_dir(tmp: Path, path: Path) -> None:
    """Give the finished temp folder `tmp` the name `path` (fsynced; a folder there is renamed aside, then deleted)."""
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


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, data: Any, *, indent: int | None = 2, **dumps_kwargs: Any) -> None:
    """JSON (UTF-8, non-ASCII kept) written atomically; `dumps_kwargs` go to `json.dumps`."""
    atomic_write_text(path, json.dumps(data, indent=indent, ensure_ascii=False, **dumps_kwargs) + "\n")
