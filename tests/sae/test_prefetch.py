"""The training stream's background prefetch: same items in the same order, errors raised where they occur, early stop."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from saeforge.config import ConfigError
from saeforge.sae.datamodule import ActivationDataModule
from saeforge.sae.prefetch import prefetched
from tests.sae.test_datamodule import CFG, ids_rows, write_h5


def producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "saeforge-prefetch"]


def test_items_order_and_the_producers_error_reach_the_consumer():
    assert list(prefetched(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        yield 2
        raise OSError("disk gone at item 3")

    got = []
    with pytest.raises(OSError, match="disk gone at item 3"):
        for item in prefetched(failing(), depth=2):
            got.append(item)
    assert got == [1, 2]


def test_the_producer_runs_ahead_and_stops_when_the_consumer_does():
    produced = []

    def counting():
        for i in range(10_000):
            produced.append(i)
            yield i

    stream = prefetched(counting(), depth=4)
    assert next(stream) == 0
    deadline = time.monotonic() + 5
    while len(produced) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(produced) == 5  # one taken, four queued: bounded by depth
    stream.close()
    assert not producer_threads()
    assert len(produced) < 10


def test_training_batches_do_not_depend_on_prefetch(tmp_path):
    path = write_h5(tmp_path / "a.h5", ids_rows(3000))
    streams = []
    for prefetch, workers in ((0, 0), (2, 0), (2, 1)):
        dm = ActivationDataModule({**CFG, "prefetch_batches": prefetch, "num_workers": workers}, str(path), None, seed=5)
        dm.setup()
        streams.append([b.clone() for b in dm.train_dataloader()])
    assert len(streams[0]) == len(streams[1]) == len(streams[2]) > 10
    for other in streams[1:]:
        for a, b in zip(streams[0], other):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not producer_threads()


def test_more_than_one_worker_is_refused_before_anything_is_read(tmp_path):
    with pytest.raises(ConfigError, match=r"data.num_workers.*must be 0 or 1"):
        ActivationDataModule({**CFG, "num_workers": 2}, str(tmp_path / "absent.h5"), None, seed=0)
