"""One process at a time: an exclusive lock on a file that dies with its process, naming its holder.

`hold(path, purpose)` takes `fcntl.flock(LOCK_EX)` on `path` (created if missing) and writes the
holder (host, pid, command, start time, purpose) into it as JSON; a second process gets
`LockedError` naming that holder, or with `wait=True` waits until the lock is free. The kernel
drops the lock when its process ends, however it ends (kill -9 too), so a lock never goes stale:
holder info found in a lock file that could be taken means its holder died without releasing it,
and the new holder takes over with a warning naming the dead one. Releasing clears the holder info.

The lock file is never deleted or replaced (a rename or an unlink would give later processes another
inode to lock than the one held), so it is written in place rather than through `atomic.py`; a
reader that catches a write half-done sees no holder and reads again later. A child forked while
the lock is held does not keep it: its copy of the descriptor is closed at fork (flock locks belong
to the open file, so closing the copy leaves the parent's lock in place).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
COMMAND_CHARS = 2000
"""The holder's command line is cut to this many characters."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock; `progress` is whatever the holder last reported (`Lock.note`)."""

    host: str
    pid: int
    command: str
    started: str
    purpose: str = ""
    progress: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def this_process(cls, purpose: str) -> Holder:
        command = " ".join([Path(sys.executable).name, *sys.argv])
        return cls(host=socket.gethostname(), pid=os.getpid(), command=command[:COMMAND_CHARS],
                   started=datetime.now(timezone.utc).isoformat(timespec="seconds"), purpose=purpose)

    def __str__(self) -> str:
        return f"pid {self.pid} on host {self.host} (command: {self.command!r}, since {self.started})"


class LockedError(RuntimeError):
    """The lock is held by another process (`holder`; None when it had not written its info yet)."""

    def __init__(self, path: Path, holder: Holder | None):
        self.path, self.holder = path, holder
        who = str(holder) if holder else "another process (its info not written yet)"
        doing = f", {holder.purpose}" if holder and holder.purpose else ""
        super().__init__(f"{path} is locked by {who}{doing}; wait for it to finish or stop that process")


def read_holder(path: str | Path) -> Holder | None:
    """The holder recorded in a lock file; None when it is missing, empty (released) or being rewritten."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        return Holder(**doc)
    except (OSError, ValueError, TypeError):
        return None


_HELD: set[int] = set()
"""Descriptors of the locks this process holds (closed in forked children)."""


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class Lock:
    """A held lock (what `hold` yields): its path, holder, and the dead holder it took over, if any."""

    def __init__(self, path: Path, fd: int, holder: Holder, took_over: Holder | None):
        self.path, self.fd, self.holder, self.took_over = path, fd, holder, took_over
        self._write()

    def note(self, **progress: Any) -> None:
        """Record progress in the lock file, for processes waiting on it (they get it as `Holder.progress`)."""
        self.holder = replace(self.holder, progress={**self.holder.progress, **progress})
        self._write()

    def _write(self) -> None:
        data = (json.dumps(asdict(self.holder)) + "\n").encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)

    def release(self) -> None:
        """Clear the holder info and unlock (only in the process that took the lock)."""
        if self.fd not in _HELD or os.getpid() != self.holder.pid:
            return
        _HELD.discard(self.fd)
        try:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            os.close(self.fd)


def _try_lock(path: Path) -> int | None:
    """An open descriptor of `path` holding the exclusive lock, or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _current_holder(path: Path, tries: int = 10) -> Holder | None:
    """The live holder's info, read again for a moment when it is being (re)written."""
    for _ in range(tries):
        holder = read_holder(path)
        if holder is not None:
            return holder
        time.sleep(0.05)
    return None


@contextmanager
def hold(
    path: str | Path,
    purpose: str,
    *,
    wait: bool = False,
    on_wait: Callable[[Holder | None], None] | None = None,
    poll: float = 0.5,
) -> Iterator[Lock]:
    """Hold the lock on `path` for the `with` block; `purpose` says what for (shown to others).

    Held elsewhere: raise `LockedError` naming the holder, or with `wait=True` try again every `poll`
    seconds, calling `on_wait(holder)` each time (holder None while its info is being written),
    until the holder ends. A holder that died without releasing is taken over with a warning.
    """
    path = Path(path)
    fd = _try_lock(path)
    while fd is None:
        holder = _current_holder(path, tries=1 if wait else 10)
        if holder is not None and (holder.host, holder.pid) == (socket.gethostname(), os.getpid()):
            raise LockedError(path, holder)  # this process holds it already: waiting would never end
        if not wait:
            raise LockedError(path, holder)
        if on_wait is not None:
            on_wait(holder)
        time.sleep(poll)
        fd = _try_lock(path)
    _HELD.add(fd)
    try:
        dead = read_holder(path)
        if dead is not None:
            log.warning("taking over %s: its holder %s, %s, died without releasing it", path, dead,
                        dead.purpose or "no purpose given")
        lock = Lock(path, fd, Holder.this_process(purpose), dead)
    except BaseException:
        _HELD.discard(fd)
        os.close(fd)
        raise
    try:
        yield lock
    finally:
        lock.release()
