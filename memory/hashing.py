"""Multi-head n-gram hashing, bit-for-bit equal (int64) to the public Engram reference rule.

For Engram layer l with compressed vocabulary size V:
- multipliers m_0..m_{N-1} = 2 r + 1 with r ~ numpy ``default_rng(seed + 10007 l).integers(0, B)``,
  B = max(1, (2^63 - 1) // V // 2), so every product token * m_k stays below 2^63 (no overflow);
- for order n = 2..N: mix_n[t] = XOR_{k<n} (x[t - k] * m_k), positions before the start read the
  (compressed) pad id;
- head j of order n: id = mix_n mod p_{l,n,j}, with the primes of :mod:`memory.primes`.

Everything runs in torch int64 on the ids' device; multipliers and primes are buffers, so the
hasher moves with ``.to(device)`` and runs equally in a data loader or on the training device.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memory.primes import assign_table_primes

LAYER_SEED_STRIDE = 10007
_INT64_MAX = np.iinfo(np.int64).max


def multiplier_bound(vocab_size: int) -> int:
    """Exclusive upper bound of r in m = 2 r + 1, so that (vocab_size - 1) * m fits in int64."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, (_INT64_MAX // int(vocab_size)) // 2)


def layer_multipliers(layer_id: int, seed: int, max_ngram_size: int, vocab_size: int) -> np.ndarray:
    """The odd multipliers m_0..m_{N-1} of one layer (int64, numpy's PCG64 stream)."""
    rng = np.random.default_rng(int(seed + LAYER_SEED_STRIDE * int(layer_id)))
    r = rng.integers(low=0, high=multiplier_bound(vocab_size), size=(max_ngram_size,), dtype=np.int64)
    return r * 2 + 1


class NgramHasher(nn.Module):
    """Hash ids of every Engram layer from compressed token ids.

    ``table_sizes[layer_id][n - 2][j]`` is the prime table size of head j of order n.
    ``forward(ids [B, T] int64) -> {layer_id: [B, T, (N - 1) * n_head_per_ngram] int64}``, heads
    ordered order-major (all heads of order 2, then order 3, ...); the results are views of one
    [L, N-1, H, B, T] buffer (time innermost), so not contiguous. ``ids`` must lie in
    [0, vocab_size); ``pad_id`` is in the same compressed id space.
    """

    def __init__(self, vocab_size: int, max_ngram_size: int, n_head_per_ngram: int,
                 vocab_bases: Sequence[int], layer_ids: Sequence[int], pad_id: int, seed: int):
        super().__init__()
        if max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {max_ngram_size}")
        if len(vocab_bases) != max_ngram_size - 1:
            raise ValueError(f"vocab_bases needs one base size per order 2..{max_ngram_size}, got "
                             f"{list(vocab_bases)}")
        if not 0 <= pad_id < vocab_size:
            raise ValueError(f"pad_id={pad_id} outside the compressed vocabulary [0, {vocab_size})")
        if not layer_ids:
            raise ValueError("layer_ids is empty")
        self.vocab_size, self.max_ngram_size = int(vocab_size), int(max_ngram_size)
        self.n_head_per_ngram, self.pad_id, self.seed = int(n_head_per_ngram), int(pad_id), int(seed)
        self.layer_ids = [int(i) for i in layer_ids]
        self.table_sizes: dict[int, list[list[int]]] = assign_table_primes(
            list(vocab_bases), self.n_head_per_ngram, self.layer_ids)
        mult = np.stack([layer_multipliers(l, self.seed, self.max_ngram_size, self.vocab_size)
                         for l in self.layer_ids])
        mods = np.array([self.table_sizes[l] for l in self.layer_ids], dtype=np.int64)  # [L, N-1, H]
        # Derived from the config: not checkpointed, but moved with the module.
        self.register_buffer("multipliers", torch.from_numpy(mult), persistent=False)  # [L, N]
        self.register_buffer("moduli", torch.from_numpy(mods), persistent=False)  # [L, N-1, H]

    @property
    def n_heads(self) -> int:
        """Hash ids per token and layer."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    def forward(self, ids: torch.Tensor, in_range: bool = False) -> dict[int, torch.Tensor]:
        """ids: [B, T] compressed ids. ``in_range=True`` skips the range check (a host read on CPU):
        for callers whose ids are in range by construction, like the indexer's own lookup."""
        if ids.dtype != torch.int64 or ids.ndim != 2:
            raise ValueError(f"NgramHasher expects int64 ids [B, T], got {ids.dtype} {tuple(ids.shape)}")
        if (not in_range and ids.device.type == "cpu" and ids.numel()
                and (ids.min() < 0 or ids.max() >= self.vocab_size)):
            raise ValueError(f"NgramHasher: ids outside the compressed vocabulary [0, {self.vocab_size})")
        mult, mods = self.multipliers, self.moduli
        if mult.device != ids.device:
            mult, mods = mult.to(ids.device), mods.to(ids.device)
        B, T = ids.shape
        N, L, H = self.max_ngram_size, len(self.layer_ids), self.n_head_per_ngram
        # Left-pad once; x[t - k] for every t is then the view padded[:, N-1-k : N-1-k+T].
        padded = F.pad(ids, (N - 1, 0), value=self.pad_id)
        mixes = []
        mix = None
        for k in range(N):
            shifted = padded[:, N - 1 - k: N - 1 - k + T]
            term = shifted.unsqueeze(0) * mult[:, k].view(L, 1, 1)  # [L, B, T]
            mix = term if mix is None else torch.bitwise_xor(mix, term)
            if k >= 1:  # mix now covers order n = k + 1
                mixes.append(mix)
        mixes = torch.stack(mixes, dim=1)  # [L, N-1, B, T]
        # One remainder over every (layer, order, head), time innermost so each row divides by one
        # prime: [L, N-1, H, B, T]; the per-layer results are [B, T, (N-1) * H] views of it.
        hashed = torch.remainder(mixes.unsqueeze(2), mods.view(L, N - 1, H, 1, 1))
        hashed = hashed.permute(0, 3, 4, 1, 2).reshape(L, B, T, (N - 1) * H)
        return {l: hashed[i] for i, l in enumerate(self.layer_ids)}

    def extra_repr(self) -> str:
        return (f"vocab_size={self.vocab_size}, max_ngram_size={self.max_ngram_size}, "
                f"n_head_per_ngram={self.n_head_per_ngram}, layer_ids={self.layer_ids}, "
                f"pad_id={self.pad_id}, seed={self.seed}")
