"""Building blocks of an Engram layer: the multi-head hashed table, per-branch RMSNorm and the
short depthwise causal convolution."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.accounting import Counts
from core.param_groups import tag
from core.partial_init import current, normal_rows
from memory.sharded import RowLayout, TableShard, sharded_lookup

TABLE_GROUP = "engram_tables"


class MultiHeadTable(nn.Module):
    """All hash heads of one layer in a single [sum(sizes), head_dim] table; head j reads rows
    offset_j .. offset_j + size_j - 1. ``forward(ids [..., heads]) -> [..., heads * head_dim]``.

    Lookups are gathers (0 FLOPs); the table counts in total but not in active parameters.
    After :meth:`shard_` the module keeps only this rank's rows (memory/sharded.py) and looks the
    others up from their owners.
    """

    def __init__(self, sizes: Sequence[int], head_dim: int, init_std: float = 1.0):
        super().__init__()
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) < 1 or head_dim < 1:
            raise ValueError(f"MultiHeadTable needs positive sizes and head_dim, got {sizes}, {head_dim}")
        self.sizes, self.head_dim = sizes, int(head_dim)
        self.shard: Optional[TableShard] = None  # set by shard_(): then there is no self.weight
        offsets = torch.tensor([0] + sizes[:-1], dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        built = current()  # a sharded run's rank builds its own rows only (core/partial_init.py)
        self.built_rows = (built.table_rank, built.table_world)  # rows rank::world of the whole draw
        self.weight = nn.Parameter(normal_rows(sum(sizes), head_dim, init_std, *self.built_rows))
        tag(self.weight, TABLE_GROUP)

    @property
    def num_params(self) -> int:
        return sum(self.sizes) * self.head_dim

    def shard_(self, rank: int, world: int, group=None, device: Optional[torch.device] = None) -> TableShard:
        """Keep rows rank, rank + world, ... of the table (the whole table's draw at init, so a sharded run
        starts from the replicated run's exact weights: built with those rows only, or sliced from the
        whole) and drop the rest; returns the shard."""
        if self.shard is not None:
            raise ValueError("MultiHeadTable is already sharded")
        if self.built_rows not in ((0, 1), (rank, world)):
            raise ValueError(f"table built with rows {self.built_rows[0]}::{self.built_rows[1]} cannot hold "
                             f"rows {rank}::{world}")
        layout = RowLayout(sum(self.sizes), rank, world)
        held = self._parameters.pop("weight").detach()
        rows = held[rank::world].clone() if self.built_rows == (0, 1) else held
        weight = tag(nn.Parameter(rows.to(device or rows.device, torch.float32)), TABLE_GROUP)
        self.shard = TableShard(weight, layout, 1.0 / world, group)
        return self.shard

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.shape[-1] != len(self.sizes):
            raise ValueError(f"expected {len(self.sizes)} hash ids per token, got {ids.shape[-1]}")
        rows = ids + self.offsets  # [..., heads] global row ids
        if self.shard is None:
            if self.built_rows != (0, 1):
                raise RuntimeError("a table built with some rows only is looked up after shard_()")
            return F.embedding(rows, self.weight).flatten(-2)  # [..., heads * head_dim]
        return sharded_lookup(self.shard, rows).flatten(-2)

    def counts(self, seq_len: int) -> Counts:
        return Counts(self.num_params, 0, 0.0)

    def extra_repr(self) -> str:
        where = "" if self.shard is None else f", shard {self.shard.layout.rank}/{self.shard.layout.world}"
        return f"heads={len(self.sizes)}, rows={sum(self.sizes)}, head_dim={self.head_dim}{where}"


class BranchRMSNorm(nn.Module):
    """RMSNorm over the last dim of [..., n_branches, dim] with one gain vector per branch."""

    def __init__(self, n_branches: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = tag(nn.Parameter(torch.ones(n_branches, dim)), "norm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight

    def counts(self, seq_len: int) -> Counts:
        n = self.weight.numel()
        return Counts(n, n, 0.0)


class ShortConv(nn.Module):
    """Per-branch RMSNorm, then a depthwise causal convolution over time (``kernel_size`` taps spaced
    by ``dilation``), then SiLU: [B, T, G, d] -> [B, T, G, d].

    The weights start at zero (the paper's initialisation), so the layer outputs exactly 0 at init.
    Output t reads inputs t, t - dilation, ..., t - (kernel_size - 1) * dilation only.
    """

    def __init__(self, n_branches: int, dim: int, kernel_size: int, dilation: int, eps: float = 1e-6):
        super().__init__()
        self.n_branches, self.dim, self.kernel_size, self.dilation = n_branches, dim, kernel_size, dilation
        self.norm = BranchRMSNorm(n_branches, dim, eps)
        channels = n_branches * dim
        self.weight = tag(nn.Parameter(torch.zeros(channels, 1, kernel_size)), "engram_conv")  # depthwise, no bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, G, d = x.shape
        y = self.norm(x).reshape(B, T, G * d).transpose(1, 2)  # [B, C, T]
        y = F.pad(y, ((self.kernel_size - 1) * self.dilation, 0))  # left padding only: causal
        y = F.conv1d(y, self.weight, dilation=self.dilation, groups=G * d)
        return F.silu(y).transpose(1, 2).reshape(B, T, G, d)

    def counts(self, seq_len: int) -> Counts:
        c = self.weight.numel()
        return self.norm.counts(seq_len) + Counts(c, c, 2.0 * c)  # kernel_size MACs per channel/token
