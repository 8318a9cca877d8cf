"""train.data.Prefetcher: the training loop's batches read ahead by a thread. It hands out exactly what
the batch source gives, in (step, micro-step) order, raises a source error where that batch was wanted,
refuses an out-of-order request, and stops its thread on close even while the queue is full."""
from __future__ import annotations

import time

import pytest
import torch

from train.data import Prefetcher


class Source:
    """A batch source with TrainBatches' interface: a pure function of (step, micro-step)."""
    accum_steps = 3

    def __init__(self, fail_at=None):
        self.fail_at, self.reads = fail_at, 0

    def get(self, step: int, micro: int):
        if (step, micro) == self.fail_at:
            raise ValueError(f"shard unreadable at step {step}")
        self.reads += 1
        x = torch.full((2, 4), step * 10 + micro, dtype=torch.int64)
        return x, x + 1


def test_batches_arrive_in_order_and_equal_the_source():
    src, fetch = Source(), Prefetcher(Source(), start=5, end=9, pin=False)
    try:
        for step in range(5, 9):
            for micro in range(Source.accum_steps):
                got, want = fetch.get(step, micro), src.get(step, micro)
                assert all(torch.equal(a, b) for a, b in zip(got, want)), (step, micro)
    finally:
        fetch.close()


def test_a_source_error_is_raised_where_its_batch_is_wanted():
    fetch = Prefetcher(Source(fail_at=(2, 1)), start=1, end=4, pin=False)
    try:
        for micro in range(3):
            fetch.get(1, micro)
        fetch.get(2, 0)
        with pytest.raises(ValueError, match="shard unreadable at step 2"):
            fetch.get(2, 1)
    finally:
        fetch.close()


def test_an_out_of_order_request_is_refused():
    fetch = Prefetcher(Source(), start=0, end=2, pin=False)
    try:
        with pytest.raises(RuntimeError, match="wanted step 0 micro 1, has \\(0, 0\\)"):
            fetch.get(0, 1)
    finally:
        fetch.close()


def test_close_stops_a_thread_blocked_on_a_full_queue():
    src = Source()
    fetch = Prefetcher(src, start=0, end=1000, pin=False, depth=2)
    deadline = time.time() + 5
    while src.reads < 3 and time.time() < deadline:  # depth 2 queued + 1 read waiting to be put
        time.sleep(0.01)
    time.sleep(0.2)
    assert src.reads == 3  # read ahead, but no further than the queue holds
    fetch.close()
    assert not fetch._thread.is_alive()
