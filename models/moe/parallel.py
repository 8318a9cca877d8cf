"""Expert parallelism: the routed experts of a MoE layer sharded over the ranks of an EP group.

With EP size N the E routed experts are split into N contiguous blocks of L = E / N; EP rank j holds
experts ``j*L .. (j+1)*L - 1``. Router and shared experts stay replicated. One forward:

1. route locally and sort the (token, slot) rows by global expert id (:class:`ExpertDispatch`); the
   rows for EP rank j are then one contiguous block;
2. exchange the per-expert row counts (``all_to_all_single`` of [N, L] int64), then the rows;
3. the received rows arrive source-major (rank 0's rows for my L experts, then rank 1's...); a
   stable sort by local expert makes them expert-major with the sources in rank order, and the
   existing grouped/batched kernel computes them;
4. the inverse permutation, the reverse all-to-all, and the layer's usual combine, in the
   original row order.

Dropless (every row travels, no capacity) and deterministic (stable sorts, fixed source order, no
atomics). The split sizes must be known on the host for ``all_to_all_single``: one device-to-host
read of the [N, L] counts per layer per forward (the EP = 1 path needs none on the grouped kernel).

Gradients: the backward of the row all-to-all is the reverse all-to-all, so after backward an EP
rank's expert gradient is the sum over the N ranks of its EP group of their (per-rank mean) losses'
gradients. The data-parallel mean over W ranks is recovered by summing that over the W / N ranks
holding the same experts (the expert-data-parallel group) and dividing by W, not W / N: the owner of
that reduction (train/expert_parallel.py, through DeepSpeed's expert-data-parallel groups) does so.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from models.moe.dispatch import Permute


@dataclass(frozen=True)
class ExpertShard:
    """Which block of routed experts this rank holds and the group it exchanges rows with.

    size: EP size N (ranks sharing one copy of the experts); rank: this rank's position in the EP
    group; n_experts: global routed experts E (a multiple of N); group: the EP process group.
    """

    size: int
    rank: int
    n_experts: int
    group: Optional[object] = None

    def __post_init__(self):
        if self.size < 1 or self.n_experts % self.size:
            raise ValueError(f"expert parallel size {self.size} must divide the routed expert count {self.n_experts}")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"EP rank {self.rank} outside an EP group of {self.size}")

    @property
    def local(self) -> int:
        """Experts per rank (L)."""
        return self.n_experts // self.size

    @property
    def first(self) -> int:
        """Global id of this rank's first expert."""
        return self.rank * self.local


class _AllToAll(torch.autograd.Function):
    """rows [sum(send), d] -> [sum(recv), d]; backward: the reverse exchange of the gradient rows."""

    @staticmethod
    def forward(ctx, x, send: list, recv: list, group):
        ctx.send, ctx.recv, ctx.group = send, recv, group
        out = x.new_empty(sum(recv), x.shape[1])
        dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty(sum(ctx.send), grad.shape[1])
        dist.all_to_all_single(out, grad.contiguous(), output_split_sizes=ctx.send, input_split_sizes=ctx.recv,
                               group=ctx.group)
        return out, None, None, None


def exchange_counts(tokens_per_expert: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """tokens_per_expert [E] (this rank's rows per global expert) -> [N, L]: row s holds the rows rank s
    sends to each of this rank's L experts."""
    send = tokens_per_expert.reshape(shard.size, shard.local).contiguous()  # [N dest, L]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=shard.group)
    return recv


def local_order(recv_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, L] counts of received source-major rows -> (perm, inverse) making them expert-major,
    sources in rank order within each expert (a stable sort by local expert id)."""
    n_src, n_local = recv_counts.shape
    ids = torch.arange(n_local, device=recv_counts.device).repeat(n_src)  # [N*L] local expert of each block
    expert_of_row = torch.repeat_interleave(ids, recv_counts.reshape(-1))
    perm = torch.argsort(expert_of_row, stable=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return perm, inverse


def expert_parallel_compute(rows: torch.Tensor, tokens_per_expert: torch.Tensor, shard: ExpertShard,
                            experts, impl: str) -> torch.Tensor:
    """rows [M, d] sorted by global expert, tokens_per_expert [E] -> expert outputs [M, d], same order.

    ``experts`` holds this rank's L experts (``RoutedExperts`` with n_experts = L)."""
    recv_counts = exchange_counts(tokens_per_expert, shard)  # [N, L]
    sizes = torch.stack([tokens_per_expert.reshape(shard.size, shard.local).sum(1), recv_counts.sum(1)])
    send, recv = sizes.tolist()  # the one host read: all_to_all_single takes its split sizes on the host
    received = _AllToAll.apply(rows, send, recv, shard.group)  # [R, d] source-major
    perm, inverse = local_order(recv_counts)
    out = experts(Permute.apply(received, perm, inverse), recv_counts.sum(0), impl)  # expert-major
    return _AllToAll.apply(Permute.apply(out, inverse, perm), recv, send, shard.group)


def shard_rows(w: torch.Tensor, shard: ExpertShard) -> torch.Tensor:
    """This rank's block of a stacked expert tensor [E, ...] -> [L, ...] (a copy)."""
    if w.shape[0] != shard.n_experts:
        raise ValueError(f"expert tensor has {w.shape[0]} experts, the shard expects {shard.n_experts}")
    return w[shard.first:shard.first + shard.local].clone()
