"""Token ids -> hash ids of every Engram layer, once per forward, on the ids' device.

On a GPU the hashing runs on a side stream, so it overlaps the embedding and the blocks before the first
Engram layer; each layer's ids are handed over with a stream wait when that layer asks for them
(:class:`PendingIds`). Hashing is integer arithmetic: the ids are the same on either stream."""
from __future__ import annotations

from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn

from core.accounting import Counts
from memory.hashing import NgramHasher


class EngramIndexer(nn.Module):
    """Compresses raw token ids through a lookup buffer, then hashes them for all Engram layers.

    ``forward(idx [B, T] int64 raw ids) -> {layer_id: [B, T, heads] int64 hash ids}``.
    Holds no parameters; its work is gathers and integer arithmetic (0 counted FLOPs).
    """

    def __init__(self, lookup: np.ndarray, hasher: NgramHasher):
        super().__init__()
        lookup = np.asarray(lookup, dtype=np.int64)
        if lookup.ndim != 1 or lookup.min() < 0 or lookup.max() >= hasher.vocab_size:
            raise ValueError(f"compression lookup must map into [0, {hasher.vocab_size})")
        self.register_buffer("lookup", torch.from_numpy(lookup.copy()), persistent=False)
        self.hasher = hasher

    @property
    def vocab_size(self) -> int:
        return int(self.lookup.shape[0])

    @property
    def table_sizes(self) -> dict[int, list[list[int]]]:
        return self.hasher.table_sizes

    def compress(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dtype != torch.int64 or idx.ndim != 2:
            raise ValueError(f"EngramIndexer expects int64 ids [B, T], got {idx.dtype} {tuple(idx.shape)}")
        try:  # no range check on the ids up front: it would read the device every step
            return self.lookup.index_select(0, idx.reshape(-1)).view(idx.shape)
        except IndexError as e:  # CPU; on a GPU an out-of-range id is a device-side assert
            raise ValueError(f"EngramIndexer: token ids outside [0, {self.vocab_size})") from e

    overlap = True  # CUDA: hash on a side stream (False: on the current stream, e.g. to measure the overlap)

    def forward(self, idx: torch.Tensor) -> Mapping[int, torch.Tensor]:
        if not (idx.is_cuda and self.overlap):
            return self._hash(idx)
        main = torch.cuda.current_stream(idx.device)
        side = _side_stream(idx.device)
        side.wait_stream(main)  # idx was written on the main stream
        with torch.cuda.stream(side):
            ids = self._hash(idx)
        idx.record_stream(side)  # the allocator must not reuse idx's memory before the side stream read it
        return PendingIds(ids, side)

    def _hash(self, idx: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.hasher(self.compress(idx), in_range=True)  # the lookup's values lie in the compressed vocab

    def counts(self, seq_len: int) -> Counts:
        return Counts()


_SIDE_STREAMS: dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device) -> "torch.cuda.Stream":
    device = torch.device(device)
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return _SIDE_STREAMS[device]


class PendingIds(Mapping[int, torch.Tensor]):
    """Hash ids being computed on ``stream``: reading one layer's ids makes the reader's current stream
    wait for the side stream (no host sync) and marks the tensor as used there, so its memory is not
    recycled while the reader still needs it."""

    def __init__(self, ids: dict[int, torch.Tensor], stream: "torch.cuda.Stream"):
        self._ids, self._event = ids, stream.record_event()

    def __getitem__(self, layer_id: int) -> torch.Tensor:
        t = self._ids[layer_id]
        current = torch.cuda.current_stream(t.device)
        current.wait_event(self._event)
        t.record_stream(current)
        return t

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, layer_id: object) -> bool:  # Mapping's own would read the ids (and wait)
        return layer_id in self._ids
