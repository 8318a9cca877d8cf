"""The public reference's hashing procedure (deepseek-ai/Engram, engram_demo_v1.py), in host numpy
int64, written independently of :mod:`memory.hashing` and :mod:`memory.primes`.

It is the oracle the torch hasher is held to bit for bit (tests/unit/test_engram_hashing.py, always on: a
port that drifts, e.g. to int32, must fail) and the baseline the hashing benchmark times
(benchmarks/bench_engram.py). One copy, so the test and the benchmark cannot drift apart.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

LAYER_SEED_STRIDE = 10007  # layer l draws its multipliers from default_rng(seed + 10007 l)


def slow_is_prime(n: int) -> bool:
    """Trial division: slow, obviously right."""
    if n < 2:
        return False
    f = 2
    while f * f <= n:
        if n % f == 0:
            return False
        f += 1
    return True


def reference_primes(bases: Sequence[int], n_heads: int, layer_ids: Sequence[int]) -> dict[int, list[list[int]]]:
    """``{layer: [order][head] prime}``: searching upward from each order's base, skipping primes any
    earlier head, order or layer took."""
    seen: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer in layer_ids:
        per_order = []
        for base in bases:
            heads, cand = [], base
            for _ in range(n_heads):
                while cand in seen or not slow_is_prime(cand):
                    cand += 1
                heads.append(cand)
                seen.add(cand)
                cand += 1
            per_order.append(heads)
        out[layer] = per_order
    return out


def reference_multipliers(layer_ids: Sequence[int], seed: int, vocab_size: int,
                          max_ngram: int) -> dict[int, np.ndarray]:
    """``{layer: [max_ngram] odd int64 multipliers}``, bounded so that id * multiplier fits int64."""
    half = max(1, int(np.iinfo(np.int64).max // vocab_size) // 2)
    out = {}
    for layer in layer_ids:
        g = np.random.default_rng(int(seed + LAYER_SEED_STRIDE * layer))
        out[layer] = g.integers(low=0, high=half, size=(max_ngram,), dtype=np.int64) * 2 + 1
    return out


def reference_hash_ids(x: np.ndarray, multipliers: Mapping[int, np.ndarray],
                       primes: Mapping[int, Sequence[Sequence[int]]], pad_id: int,
                       max_ngram: int) -> dict[int, np.ndarray]:
    """x: [B, T] compressed ids -> ``{layer: [B, T, (max_ngram - 1) * heads] int64}``, heads order-major."""
    x = np.asarray(x, dtype=np.int64)
    B, T = x.shape
    shifts = [x] + [np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad_id)[:, :T]
                    for k in range(1, max_ngram)]
    out = {}
    for layer, mult in multipliers.items():
        cols = []
        for n in range(2, max_ngram + 1):
            mix = shifts[0] * mult[0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * mult[k])
            for p in primes[layer][n - 2]:
                cols.append((mix % int(p)).astype(np.int64, copy=False))
        out[layer] = np.stack(cols, axis=2)
    return out


def reference_hash(ids: np.ndarray, vocab_size: int, max_ngram: int, n_heads: int, bases: Sequence[int],
                   layer_ids: Sequence[int], pad_id: int, seed: int):
    """The whole rule from the config: ``({layer: hash ids}, {layer: primes})``."""
    primes = reference_primes(bases, n_heads, layer_ids)
    mult = reference_multipliers(layer_ids, seed, vocab_size, max_ngram)
    return reference_hash_ids(ids, mult, primes, pad_id, max_ngram), primes
