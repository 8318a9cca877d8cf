"""Batches that are a pure function of (seed, step, micro-step, rank): exact resume, no loader state.

The train split's token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens
(inputs and shifted targets). Each epoch visits every window once in an order given by a keyed
bijection of ``[0, n_windows)`` (:class:`WindowOrder`, a Feistel permutation keyed by (seed, epoch)),
computed per sample: no rank materialises an epoch's permutation (8 bytes x n_windows). Optimizer
step ``s`` consumes the global sample indices ``[s * G, (s + 1) * G)`` (G = global batch size in
sequences); micro-step ``m`` of rank
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
    exact count passes a feasible one (:mod:`sweeps.planning.solver` does), so no rounding happens.
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


_MASK = (1 << 64) - 1  # seeds and epochs as uint64 words


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective, well-avalanching hash of uint64 words (wraps mod 2**64)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class WindowOrder:
    """A pseudo-random permutation of ``[0, n)`` keyed by (seed, epoch), evaluated per index.

    A balanced Feistel network on ``2h`` bits (``4**h >= n``, at most 4n) with 6 rounds whose round function
    is splitmix64 of (round key, half) is a bijection of ``[0, 4**h)``; cycle walking (re-applying it while
    the image is >= n) restricts it to a bijection of ``[0, n)`` (at most ~4 walks on average). Memory
    O(batch), time O(batch) per call, independent of ``n``: a 400 GB corpus needs no per-rank index.
    """

    ROUNDS = 6

    def __init__(self, n: int, seed: int, epoch: int):
        if n <= 0:
            raise ValueError(f"window order over {n} windows")
        self.n, self.half = n, max(1, (max(n - 1, 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half) - 1)
        base = _mix64(np.array([seed & _MASK, epoch & _MASK], dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15))
        self.keys = _mix64(np.arange(1, self.ROUNDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
                           ^ base[0] ^ (base[1] << np.uint64(1)))

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half)
        left, right = x >> h, x & self.mask
        for k in self.keys:
            left, right = right, left ^ (_mix64(right ^ k) & self.mask)
        return (left << h) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        """Window ids (int64) at positions ``idx`` (each in ``[0, n)``) of this epoch's order."""
        x = self._feistel(np.asarray(idx, dtype=np.uint64))
        out = x >= np.uint64(self.n)
        while out.any():
            x[out] = self._feistel(x[out])
            out = x >= np.uint64(self.n)
        return x.astype(np.int64)


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
    def _order(self, epoch: int) -> WindowOrder:
        return WindowOrder(self.n_windows, self.seed, epoch)  # a few round keys, nothing per window

    def window_ids(self, step: int, micro_step: int) -> np.ndarray:
        """Window ids [n] of this rank's micro-batch ``micro_step`` of step ``step``: a pure function of
        (seed, step, micro-step, rank), computed from the sample ids without any per-epoch index."""
        epoch, pos = np.divmod(self.sample_ids(step, micro_step), self.n_windows)
        out = np.empty(pos.shape, dtype=np.int64)
        for e in np.unique(epoch):  # a micro-batch spans at most two epochs
            sel = epoch == e
            out[sel] = self._order(int(e))(pos[sel])
        return out

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
        rows = [self.split.read(int(w) * self.seq_len, self.seq_len + 1) for w in self.window_ids(step, micro_step)]
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
                    if pin:  # x, y are strided views of one buffer: pin dense copies, so the copy is one DMA
                        x, y = x.contiguous().pin_memory(), y.contiguous().pin_memory()
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
