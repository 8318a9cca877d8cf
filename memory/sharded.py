"""Engram table rows sharded over the data-parallel ranks: each rank holds 1/world of every table.

Layout: global row g lives on rank ``g % world`` at local row ``g // world`` (cyclic, not contiguous
blocks). Why cyclic: one layer's table is the concatenation of its heads' prime-sized slices, and
the orders' slices differ in size (so in lookups per row); contiguous blocks would hand one rank a
whole small, hot order-2 slice, cyclic rows spread every head evenly over the ranks (shard sizes
differ by at most one row), and a re-shard to another world size is a strided copy.

Lookup (FlagScale's design), all ranks in lockstep, one call per table:
  forward:  hash ids -> global rows [N] -> stable sort by owner -> all_to_all of the counts, then of
            the local row ids -> owners gather rows [M, D] -> all_to_all back -> original order [N, D];
  backward: the row gradients [N, D] travel the same way to their owners, which sum them per row.
The owner's sum is deterministic (stable sort by row, then a segment sum; no atomics), so a run
repeats bit for bit. ``grad_scale`` (the trainer passes 1/world) makes the shard's gradient that of
the mean loss over ranks: exactly the replicated table's gradient after the data-parallel average.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RowLayout:
    """Which rows of a ``rows``-row table rank ``rank`` of ``world`` holds: rank, rank + world, ..."""
    rows: int
    rank: int
    world: int

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world or self.rows < 1:
            raise ValueError(f"bad row layout: rows={self.rows}, rank={self.rank}, world={self.world}")

    def local_rows(self, rank: Optional[int] = None) -> int:
        r = self.rank if rank is None else rank
        return (self.rows - r + self.world - 1) // self.world

    def global_ids(self, rank: Optional[int] = None) -> torch.Tensor:
        """Global row ids held by ``rank`` (default: this one), in local order: [local_rows]."""
        r = self.rank if rank is None else rank
        return torch.arange(r, self.rows, self.world, dtype=torch.int64)


def reshard_rows(saved: torch.Tensor, saved_layout: RowLayout, out: torch.Tensor, layout: RowLayout) -> None:
    """Copy the rows of one saved shard ``saved`` [n, ...] that ``layout``'s rank owns into ``out``
    (its shard, [layout.local_rows(), ...]). Loading every saved shard this way rebuilds the shard."""
    if saved_layout.rows != layout.rows or saved.shape[0] != saved_layout.local_rows():
        raise ValueError(f"saved shard of {saved.shape[0]} rows ({saved_layout}) does not fit {layout}")
    g = saved_layout.global_ids()
    mine = g % layout.world == layout.rank
    out[g[mine] // layout.world] = saved[mine.to(saved.device)].to(out.dtype)


def _segment_sum(rows: torch.Tensor, grads: torch.Tensor, n_rows: int) -> torch.Tensor:
    """sum of ``grads`` [M, D] per row id of ``rows`` [M] into [n_rows, D], in a fixed order."""
    out = grads.new_zeros(n_rows, grads.shape[1])
    if rows.numel() == 0:
        return out
    order = torch.argsort(rows, stable=True)
    uniq, counts = torch.unique_consecutive(rows[order], return_counts=True)
    sums = torch.segment_reduce(grads[order], "sum", lengths=counts, axis=0)
    return out.index_copy_(0, uniq, sums)


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """all_to_all_single of ``x`` [sum(send), ...] -> [sum(recv), ...]."""
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shard: torch.Tensor, ids: torch.Tensor, world: int, grad_scale: float, group):
        owner = ids % world
        order = torch.argsort(owner, stable=True)  # [N]: requests grouped by owner, ties in token order
        send_t = torch.bincount(owner, minlength=world)
        recv_t = torch.empty_like(send_t)
        dist.all_to_all_single(recv_t, send_t, group=group)
        send, recv = send_t.tolist(), recv_t.tolist()
        wanted = _exchange((ids // world)[order], send, recv, group)  # [M] local rows asked of this rank
        found = _exchange(shard.index_select(0, wanted), recv, send, group)  # [N, D] in owner order
        out = torch.empty_like(found).index_copy_(0, order, found)  # [N, D] in token order
        ctx.save_for_backward(order, wanted)
        ctx.meta = (send, recv, world, grad_scale, group, shard.shape[0])
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        order, wanted = ctx.saved_tensors
        send, recv, world, grad_scale, group, n_rows = ctx.meta
        to_owner = _exchange(grad.float().index_select(0, order), send, recv, group)  # [M, D]
        g = _segment_sum(wanted, to_owner, n_rows)
        return (g * grad_scale if grad_scale != 1.0 else g), None, None, None, None


def sharded_lookup(shard: torch.Tensor, ids: torch.Tensor, world: int, grad_scale: float = 1.0,
                   group=None) -> torch.Tensor:
    """Rows ``ids`` [...] (global row ids) of a table cyclically sharded over ``group`` (``shard``: this
    rank's [local_rows, D]) -> [..., D]. A collective: every rank of ``group`` calls it, in the same order."""
    if ids.dtype != torch.int64:
        raise ValueError(f"sharded_lookup needs int64 row ids, got {ids.dtype}")
    if world == 1:
        return torch.nn.functional.embedding(ids, shard)
    flat = _ShardedLookup.apply(shard, ids.reshape(-1), world, grad_scale, group)
    return flat.view(*ids.shape, shard.shape[1])


@dataclass
class TableShard:
    """This rank's rows of one table. ``weight`` [layout.local_rows(), D] is a leaf parameter held outside
    the model's module tree: the data-parallel engine neither all-reduces nor partitions it (its gradient
    already sums every rank's lookups), and it stays fp32 under a bf16 engine."""
    weight: torch.nn.Parameter
    layout: RowLayout
    grad_scale: float
    group: object = None
