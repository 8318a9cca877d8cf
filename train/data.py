"""Batches that are a pure function of (seed, step, micro-step, rank): exact resume, no loader state.

The train split's token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens
(inputs and shifted targets). Each epoch visits every window once in an order drawn from
``numpy.random.default_rng([seed, epoch])``. Optimizer step ``s`` consumes the global sample
indices ``[s * G, (s + 1) * G)`` (G = global batch size in sequences); micro-step ``m`` of rank
``r`` takes its ``micro_batch_size`` slice of those, so the data seen per step is independent of
how the global batch is split over ranks and accumulation steps.

Exact token counts. A run may end on a partial optimizer step (``last_step_sequences`` < G), so an
iso-FLOP plan can train its budget's tokens to the sequence rather than to the step. The last step
keeps every micro-batch *slot* (G / micro_batch_size of them over ranks and accumulation steps),
only smaller: its sequences are spread over the slots (sizes differ by at most one, at least one
each), so DeepSpeed's gradient-accumulation boundary and the all-reduce are the same as on any
other step. DeepSpeed averages the slots' mean losses; :meth:`TrainBatches.loss_weight` rescales
each slot's loss by its share of the step's sequences, so the step's gradient is the mean over its
sequences exactly as on a full step (weight 1 there). The data order does not change: step ``s``
still starts at sample ``s * G``, so exact resume is unaffected.
"""
from __future__ import annotations

import math
import queue
import threading
from functools import lru_cache
from typing import Optional

import numpy as np
import torch


def run_length(train_tokens: float, seq_len: int, global_batch_size: int, micro_batch_size: int) -> tuple[int, int]:
    """(optimizer steps, sequences of the last step) that train ``train_tokens`` tokens.

    Rounded up to whole sequences, and the last step up to one sequence per micro-batch slot
    (``global_batch_size // micro_batch_size`` slots, whatever the world size); a plan that wants an
    exact count passes a feasible one (:mod:`sweeps.solver` does), so no rounding happens.
    """
    if not (math.isfinite(train_tokens) and train_tokens > 0):
        raise ValueError(f"train.train_tokens must be a positive number of tokens, got {train_tokens}")
    if global_batch_size % micro_batch_size:
        raise ValueError(f"train.global_batch_size={global_batch_size} is not a multiple of "
                         f"micro_batch_size={micro_batch_size}")
    sequences = -(-math.ceil(train_tokens) // seq_len)
    steps = -(-sequences // global_batch_size)
    last = max(sequences - (steps - 1) * global_batch_size, global_batch_size // micro_batch_size)
    return steps, last


class TrainBatches:
    def __init__(self, split, seq_len: int, micro_batch_size: int, global_batch_size: int,
                 rank: int, world_size: int, seed: int, total_steps: Optional[int] = None,
                 last_step_sequences: Optional[int] = None):
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is not a multiple of "
                f"micro_batch_size*world_size={micro_batch_size}*{world_size}")
        self.split, self.seq_len = split, seq_len
        self.micro, self.global_bs = micro_batch_size, global_batch_size
        self.rank, self.world, self.seed = rank, world_size, seed
        self.accum_steps = global_batch_size // (micro_batch_size * world_size)
        self.slots = global_batch_size // micro_batch_size  # micro-batches per step over all ranks
        self.total_steps = total_steps
        self.last = global_batch_size if last_step_sequences is None else int(last_step_sequences)
        if not self.slots <= self.last <= global_batch_size or (self.last < global_batch_size and not total_steps):
            raise ValueError(f"last step of {self.last} sequences: needs total_steps and between "
                             f"{self.slots} (one per micro-batch) and {global_batch_size} sequences")
        self.n_windows = (split.n_tokens - 1) // seq_len
        if self.n_windows < global_batch_size:
            raise ValueError(f"train split has {split.n_tokens} tokens: fewer than one global batch of "
                             f"{global_batch_size} x {seq_len + 1}-token windows")

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def sequences_in(self, step: int) -> int:
        """Sequences of optimizer step ``step`` (0-based): G, or the last step's count."""
        return self.last if self.total_steps is not None and step == self.total_steps - 1 else self.global_bs

    def tokens_through(self, steps_done: int) -> int:
        """Tokens trained by the first ``steps_done`` optimizer steps."""
        if steps_done <= 0:
            return 0
        return ((steps_done - 1) * self.global_bs + self.sequences_in(steps_done - 1)) * self.seq_len

    def _slot(self, step: int, micro_step: int) -> tuple[int, int]:
        """(first sequence within the step, sequences) of this rank's micro-batch ``micro_step``."""
        base, extra = divmod(self.sequences_in(step), self.slots)
        j = micro_step * self.world + self.rank
        return j * base + min(j, extra), base + (j < extra)

    def loss_weight(self, step: int, micro_step: int) -> float:
        """Factor on this micro-batch's mean loss so the step's gradient is the mean over its sequences
        (1 on full steps; on a short last step, the slot's share of the step's sequences x slots)."""
        n = self._slot(step, micro_step)[1]
        return n * self.slots / self.sequences_in(step)

    def sample_ids(self, step: int, micro_step: int) -> np.ndarray:
        offset, n = self._slot(step, micro_step)
        first = step * self.global_bs + offset
        return np.arange(first, first + n)

    def get(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for g in self.sample_ids(step, micro_step):
            epoch, pos = divmod(int(g), self.n_windows)
            w = int(self._order(epoch)[pos])
            rows.append(self.split.read(w * self.seq_len, self.seq_len + 1))
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))
        return buf[:, :-1], buf[:, 1:]

    def epochs_at(self, step: int) -> float:
        return step * self.global_bs / self.n_windows


class Prefetcher:
    """The micro-batches of steps ``[start, end)`` in (step, micro) order, read ahead by a thread.

    Reading a micro-batch is numpy work on memory-mapped shards, so a background thread overlaps it
    with the step's compute; on a GPU each batch is pinned, so the copy to the device does not block
    the host. Batches are a pure function of (step, micro-step): reading ahead changes no value, and
    ``get`` checks that the caller asks for exactly the next one.
    """

    def __init__(self, batches: TrainBatches, start: int, end: int, pin: bool, depth: int = 4):
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(batches, start, end, pin), daemon=True,
                                        name="batch-prefetch")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _fill(self, batches: TrainBatches, start: int, end: int, pin: bool) -> None:
        try:
            for step in range(start, end):
                for micro in range(batches.accum_steps):
                    x, y = batches.get(step, micro)
                    if pin:
                        x, y = x.pin_memory(), y.pin_memory()
                    if not self._put((step, micro, x, y)):
                        return
        except BaseException as e:  # handed to the consumer, raised where the batch was wanted
            self._put(e)

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self._q.get()
        if isinstance(item, BaseException):
            raise item
        if item[:2] != (step, micro):
            raise RuntimeError(f"prefetcher out of order: wanted step {step} micro {micro}, has {item[:2]}")
        return item[2], item[3]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def eval_windows(split, seq_len: int, eval_tokens: int) -> int:
    """Number of fixed held-out windows: the first ``eval_tokens`` of the validation stream."""
    n = min(eval_tokens // seq_len, (split.n_tokens - 1) // seq_len)
    if n <= 0:
        raise ValueError(f"validation split has {split.n_tokens} tokens: too few for one "
                         f"{seq_len + 1}-token window")
    return n


def eval_batches(split, seq_len: int, eval_tokens: int, batch_size: int, rank: int, world_size: int):
    """Yield this rank's share of the fixed validation windows (window i goes to rank i % world)."""
    mine = list(range(eval_windows(split, seq_len, eval_tokens)))[rank::world_size]
    for i in range(0, len(mine), batch_size):
        rows = [split.read(w * seq_len, seq_len + 1) for w in mine[i:i + batch_size]]
        buf = torch.from_numpy(np.stack(rows).astype(np.int64))
        yield buf[:, :-1], buf[:, 1:]
