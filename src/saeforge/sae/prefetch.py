"""Run an iterator in a background thread, a few items ahead of its consumer.

The training stream reads, concatenates and shuffles rows between optimisation steps; done in the
training loop's thread that work adds to every step (and on a GPU it would dominate). Here it runs
in a daemon thread while the step computes. The items and their order are exactly the iterator's;
an exception in the producer is raised in the consumer at the point it would have occurred.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


def prefetched(items: Iterator[T], depth: int, name: str = "saeforge-prefetch") -> Iterator[T]:
    """Yield `items`' items, produced up to `depth` ahead in a background thread (`depth` 0: inline).

    Closing the returned generator (or dropping it) stops the producer at its next item.
    """
    if depth <= 0:
        yield from items
        return
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as err:  # handed to the consumer, raised there
            put(_Failure(err))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)
