"""Batches that are a pure function of (seed, step, micro-step, rank): exact resume, no loader state.

The train split's token stream is cut into non-overlapping windows of ``seq_len + 1`` tokens
(inputs and shifted targets). Each epoch visits every window once in an order drawn from
``numpy.random.default_rng([seed, epoch])``. Optimizer step ``s`` consumes the global sample
indices ``[s * G, (s + 1) * G)`` (G = global batch size in sequences); micro-step ``m`` of rank
``r`` takes its ``micro_batch_size`` slice of those, so the data seen per step is independent of
how the global batch is split over ranks and accumulation steps.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch


class TrainBatches:
    def __init__(self, split, seq_len: int, micro_batch_size: int, global_batch_size: int,
                 rank: int, world_size: int, seed: int):
        if global_batch_size % (micro_batch_size * world_size):
            raise ValueError(
                f"train.global_batch_size={global_batch_size} is not a multiple of "
                f"micro_batch_size*world_size={micro_batch_size}*{world_size}")
        self.split, self.seq_len = split, seq_len
        self.micro, self.global_bs = micro_batch_size, global_batch_size
        self.rank, self.world, self.seed = rank, world_size, seed
        self.accum_steps = global_batch_size // (micro_batch_size * world_size)
        self.n_windows = (split.n_tokens - 1) // seq_len
        if self.n_windows < global_batch_size:
            raise ValueError(f"train split has {split.n_tokens} tokens: fewer than one global batch of "
                             f"{global_batch_size} x {seq_len + 1}-token windows")

    @lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def sample_ids(self, step: int, micro_step: int) -> np.ndarray:
        first = step * self.global_bs + (micro_step * self.world + self.rank) * self.micro
        return np.arange(first, first + self.micro)

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
