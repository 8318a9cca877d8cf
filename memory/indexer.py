"""Token ids -> hash ids of every Engram layer, once per forward, on the ids' device."""
from __future__ import annotations

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

    def forward(self, idx: torch.Tensor) -> dict[int, torch.Tensor]:
        return self.hasher(self.compress(idx), in_range=True)  # the lookup's values lie in the compressed vocab

    def counts(self, seq_len: int) -> Counts:
        return Counts()
