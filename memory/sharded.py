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

from dataclasses import dataclass, field
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


def _ordered_sum(rows: torch.Tensor, src: torch.Tensor, micro: torch.Tensor, grads: torch.Tensor, world: int,
                 n_micro: int, n_rows: int) -> torch.Tensor:
    """Sum of ``grads`` [M, D] per row id ``rows`` [M] into [n_rows, D] in the replicated run's order: per
    (row, source rank, micro-step) in token order (each rank's embedding backward), then over the
    micro-steps in order (autograd's accumulation), then over the source ranks in rank order (the
    all-reduce). No atomics: deterministic, and at two ranks bit for bit the replicated gradient."""
    out = grads.new_zeros(n_rows, grads.shape[1])
    if rows.numel() == 0:
        return out
    key = (rows * world + src) * n_micro + micro  # [M]
    order = torch.argsort(key, stable=True)
    keys, counts = torch.unique_consecutive(key[order], return_counts=True)
    sums = torch.segment_reduce(grads[order], "sum", lengths=counts, axis=0)
    for width in (n_micro, world):  # fold micro-steps, then source ranks
        keys, counts = torch.unique_consecutive(keys // width, return_counts=True)
        sums = torch.segment_reduce(sums, "sum", lengths=counts, axis=0)
    return out.index_copy_(0, keys, sums)


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """all_to_all_single of ``x`` [sum(send), ...] -> [sum(recv), ...]."""
    out = x.new_empty((sum(recv),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight: torch.Tensor, ids: torch.Tensor, shard: "TableShard"):
        world, group = shard.layout.world, shard.group
        owner = ids % world
        order = torch.argsort(owner, stable=True)  # [N]: requests grouped by owner, ties in token order
        send_t = torch.bincount(owner, minlength=world)
        recv_t = torch.empty_like(send_t)
        dist.all_to_all_single(recv_t, send_t, group=group)
        send, recv = send_t.tolist(), recv_t.tolist()
        wanted = _exchange((ids // world)[order], send, recv, group)  # [M] local rows asked of this rank
        found = _exchange(weight.index_select(0, wanted), recv, send, group)  # [N, D] in owner order
        out = torch.empty_like(found).index_copy_(0, order, found)  # [N, D] in token order
        ctx.save_for_backward(order, wanted)
        ctx.meta = (send, recv, shard)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        order, wanted = ctx.saved_tensors
        send, recv, shard = ctx.meta
        world = shard.layout.world
        to_owner = _exchange(grad.float().index_select(0, order), send, recv, shard.group)  # [M, D]
        src = torch.repeat_interleave(torch.arange(world, device=wanted.device),
                                      torch.tensor(recv, device=wanted.device))  # [M] sending rank
        shard.pending.append((wanted, src, to_owner))  # summed at flush(), in the replicated order
        return None, None, None


@dataclass
class TableShard:
    """This rank's rows of one table. ``weight`` [layout.local_rows(), D] is a leaf parameter held outside
    the model's module tree: the data-parallel engine neither all-reduces nor partitions it (its gradient
    sums every rank's lookups), and it stays fp32 under a bf16 engine.

    The row gradients the owner receives wait in ``pending`` until :meth:`flush` (the accumulation
    boundary) sums them into ``weight.grad``, scaled by ``grad_scale``."""
    weight: torch.nn.Parameter
    layout: RowLayout
    grad_scale: float
    group: object = None
    pending: list = field(default_factory=list)

    def flush(self) -> None:
        if not self.pending:
            return
        dev = self.weight.device
        micro = torch.cat([torch.full_like(w, i) for i, (w, _, _) in enumerate(self.pending)])
        rows, src, grads = (torch.cat(parts) for parts in zip(*self.pending))
        g = _ordered_sum(rows.to(dev), src.to(dev), micro.to(dev), grads, self.layout.world, len(self.pending),
                         self.weight.shape[0])
        g = g * self.grad_scale if self.grad_scale != 1.0 else g
        self.weight.grad = g if self.weight.grad is None else self.weight.grad + g
        self.pending.clear()


def sharded_lookup(shard: TableShard, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` [...] (global row ids) of a table cyclically sharded over ``shard.group`` -> [..., D]. A
    collective: every rank of the group calls it, in the same order. The shard's gradient of the backward
    is complete after ``shard.flush()``."""
    if ids.dtype != torch.int64:
        raise ValueError(f"sharded_lookup needs int64 row ids, got {ids.dtype}")
    if shard.layout.world == 1 and not dist.is_initialized():  # no process group: nothing to exchange with
        return torch.nn.functional.embedding(ids, shard.weight)
    # one rank in a process group takes the exchange path too (all-to-alls with itself), so a single
    # GPU runs the sharded code on NCCL as a cluster would (benchmarks/bench_tables.py in gpu_check.sh)
    flat = _ShardedLookup.apply(shard.weight, ids.reshape(-1), shard)
    return flat.view(*ids.shape, shard.weight.shape[1])
