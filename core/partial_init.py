"""Build only what this rank will hold: a slice of a sharded parameter, drawn from the same random stream
as the whole.

Sharded Engram tables (rows rank, rank + W, ...: memory/layers.py) and expert parallelism (a block of
experts: models/moe/experts.py) keep a slice of a tensor whose whole is drawn at init, so that a sharded
run starts from the replicated run's exact weights. Drawing the whole and slicing it afterwards holds the
whole on every rank for a moment (the paper's 2e20 point at rho = 0.4 has 3.1B table parameters, 12 GB
fp32 per rank; eight ranks on a node hold eight copies). Here the whole is drawn chunk by chunk from the
same generator in the same order and each chunk keeps only its owned slice: the same numbers, the same
generator state afterwards (every later parameter initialises as before), the memory of one chunk.

Why chunks reproduce the whole draw (CPU generator, float32; tests/unit/test_partial_init.py checks it
bit for bit): ``normal_`` fills a tensor of n >= 16 elements with n uniforms in order, transforms them in
blocks of 16 and, when n is not a multiple of 16, draws 16 more for its last 16 elements; chunks whose
sizes are multiples of 16, the last one of at least 16 elements, consume and transform the stream
identically. torch 2.13's ``trunc_normal_`` (at +-3 std) draws all n normally and, while any value lies
outside, draws all n again and takes the new values there: replayed round by round, chunk by chunk,
keeping the owned block and the ids still outside. Whether the replay matches this torch is checked once
on small tensors; where it does not, the whole is drawn and sliced, as before.

:func:`building` says, for the parameters built inside it, which slice this rank keeps.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of fp32 drawn at a time


@dataclass(frozen=True)
class BuildShard:
    """What the parameters built under :func:`building` keep: table rows ``table_rank::table_world``
    and routed experts ``expert_first .. expert_first + expert_count - 1`` (None: all of them)."""

    table_rank: int = 0
    table_world: int = 1
    expert_first: int = 0
    expert_count: Optional[int] = None

    def __post_init__(self):
        if self.table_world < 1 or not 0 <= self.table_rank < self.table_world:
            raise ValueError(f"table rows rank {self.table_rank} of {self.table_world}")
        if self.expert_first < 0 or (self.expert_count is not None and self.expert_count < 1):
            raise ValueError(f"experts from {self.expert_first}, {self.expert_count} of them")


_current = BuildShard()


@contextlib.contextmanager
def building(shard: BuildShard) -> Iterator[BuildShard]:
    """Inside: tables and routed experts are built holding ``shard``'s slice only."""
    global _current
    saved, _current = _current, shard
    try:
        yield shard
    finally:
        _current = saved


def current() -> BuildShard:
    return _current


def _chunks(n: int, step: int) -> list[tuple[int, int]]:
    """[start, end) bounds over n items, every chunk a multiple of ``step`` but the last, which is merged
    into the one before it when shorter than ``step`` (``normal_``'s tail rule: see the module docstring)."""
    bounds = list(range(0, n, step)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < step:
        del bounds[-2]
    return list(zip(bounds[:-1], bounds[1:]))


def _draw_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """The chunks of n draws of about ``chunk`` elements that reproduce one ``normal_`` of n."""
    return _chunks(n, max(16, chunk // 16 * 16))


def _normal_chunks(n: int, std: float, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, values) of n ``normal_(0, std)`` draws made chunk by chunk, the same as one draw of n. The
    values live in one reused buffer (fresh chunk-sized tensors each time let the allocator's heap grow
    with n: measured), valid until the next chunk."""
    bounds = _draw_bounds(n, chunk)
    buf = torch.empty(max(b - a for a, b in bounds))
    for a, b in bounds:
        yield a, buf[:b - a].normal_(0, std)


def _normal_rows(rows: int, cols: int, std: float, rank: int, world: int, chunk: int) -> torch.Tensor:
    per = max(16, chunk // cols // 16 * 16)  # rows per chunk: a multiple of 16 (so are its elements)
    out = torch.empty((rows - rank + world - 1) // world, cols)
    for a, values in _normal_chunks(rows * cols, std, per * cols):
        block, b = values.view(-1, cols), a // cols + values.numel() // cols
        a //= cols
        first = a + (rank - a) % world  # the chunk's first global row r = rank (mod world)
        if first < b:
            local = (first - rank) // world
            out[local:local + (b - first + world - 1) // world] = block[first - a::world]
    return out


def _trunc_normal_block(n: int, std: float, first: int, count: int, chunk: int) -> torch.Tensor:
    """Elements first .. first + count - 1 of n drawn by torch's ``trunc_normal_(std, -3 std, 3 std)``:
    a normal draw of all n, then, while any element is outside [-3 std, 3 std], a new draw of all n whose
    values replace the outside ones. Each round is drawn chunk by chunk; what is kept between rounds is
    the owned block and the ids still outside (about 0.3% of n after the first round)."""
    lo, hi = (torch.tensor(v, dtype=torch.float32).item() for v in (-3 * std, 3 * std))
    out = torch.empty(count)
    pending = None  # global ids still outside, ascending
    size = max(b - a for a, b in _draw_bounds(n, chunk))
    outside = torch.empty(2 * size, dtype=torch.bool)  # reused masks (see _normal_chunks)
    while pending is None or pending.numel():
        still = []
        for a, values in _normal_chunks(n, std, chunk):
            b = a + values.numel()
            if pending is None:  # the first round: every element (no id tensors: a chunk's worth of int64)
                m, high = outside[:values.numel()], outside[values.numel():2 * values.numel()]
                torch.lt(values, lo, out=m)
                torch.logical_or(m, torch.gt(values, hi, out=high), out=m)
                still.append(m.nonzero().squeeze(1) + a)
                lo_own, hi_own = max(a, first), min(b, first + count)
                if lo_own < hi_own:
                    out[lo_own - first:hi_own - first] = values[lo_own - a:hi_own - a]
                continue
            ids = pending[torch.searchsorted(pending, a):torch.searchsorted(pending, b)]
            picked = values[ids - a]
            still.append(ids[(picked < lo) | (picked > hi)])
            own = (ids >= first) & (ids < first + count)
            out[ids[own] - first] = picked[own]
        pending = torch.cat(still)
    return out


def _reproduces_torch(kind: str) -> bool:
    """Whether the chunked ``kind`` draw ("normal" or "trunc_normal") reproduces this torch's whole draw
    (checked once, on small tensors cut into many chunks, the caller's generator state untouched)."""
    if kind not in _verified:
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(1234)  # the CPU generator only (fork_rng restores it)
            if kind == "normal":
                whole = nn.init.normal_(torch.empty(37, 5), std=0.5)[1::3]
            else:
                whole = nn.init.trunc_normal_(torch.empty(300, 7), std=0.01, a=-0.03, b=0.03)[100:200].reshape(-1)
            after = torch.rand(3)
            torch.default_generator.manual_seed(1234)  # the CPU generator only (fork_rng restores it)
            got = (_normal_rows(37, 5, 0.5, 1, 3, 64) if kind == "normal"
                   else _trunc_normal_block(2100, 0.01, 700, 700, 64))
            _verified[kind] = torch.equal(got, whole) and torch.equal(torch.rand(3), after)
    return _verified[kind]


_verified: dict[str, bool] = {}


def normal_rows(rows: int, cols: int, std: float, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Rows rank, rank + world, ... of a [rows, cols] fp32 tensor drawn by ``normal_(0, std)``:
    [ceil((rows - rank) / world), cols], the generator left as the whole draw leaves it."""
    if world == 1 or rows * cols < 32 or not _reproduces_torch("normal"):  # (the last: drawn whole, sliced)
        return torch.empty(rows, cols).normal_(0, std)[rank::world].contiguous()
    return _normal_rows(rows, cols, std, rank, world, CHUNK_ELEMENTS)


def trunc_normal_blocks(shape: tuple[int, ...], std: float, first: int = 0,
                        count: Optional[int] = None) -> torch.Tensor:
    """Entries ``first .. first + count - 1`` along dim 0 of a ``shape`` fp32 tensor drawn by
    ``trunc_normal_(std, -3 std, 3 std)``, the generator left as the whole draw leaves it."""
    n, per_item = shape[0], math.prod(shape[1:])
    count = n - first if count is None else count
    if first < 0 or count < 1 or first + count > n:
        raise ValueError(f"entries {first} .. {first + count - 1} of {n}")
    if count == n or n * per_item < 32 or not _reproduces_torch("trunc_normal"):
        whole = nn.init.trunc_normal_(torch.empty(shape), std=std, a=-3 * std, b=3 * std)
        return whole if count == n else whole[first:first + count].clone()
    flat = _trunc_normal_block(n * per_item, std, first * per_item, count * per_item, CHUNK_ELEMENTS)
    return flat.view(count, *shape[1:])
