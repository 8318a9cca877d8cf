"""Prime table sizes for the Engram hash heads.

Every hash head takes its n-gram hash modulo its own prime, and no prime is used twice across
heads, orders and layers. The assignment order is the public reference's: layers in the order
given, then orders 2..N, then heads; each order's search starts just above its base size
(the first candidate is the base itself), and each next head continues above the prime just found.

Primality uses a deterministic Miller-Rabin test: with the first twelve primes as witnesses it is
exact for every n < 3.3e24 (Sorenson & Webster 2015), far beyond any table size.
"""
from __future__ import annotations

from typing import Iterable, Sequence

_WITNESSES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
_DETERMINISTIC_LIMIT = 3_317_044_064_679_887_385_961_981  # witnesses above are exact below this


def is_prime(n: int) -> bool:
    """Exact primality for 0 <= n < 3.3e24 (deterministic Miller-Rabin)."""
    n = int(n)
    if n < 2:
        return False
    for p in _WITNESSES:
        if n % p == 0:
            return n == p
    if n >= _DETERMINISTIC_LIMIT:
        raise ValueError(f"is_prime: {n} is beyond the deterministic Miller-Rabin range (< 3.3e24)")
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for a in _WITNESSES:
        x = pow(a, d, n)
        if x == 1 or x == n - 1:
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def next_prime_above(start: int, exclude: Iterable[int] = ()) -> int:
    """Smallest prime p > start with p not in ``exclude``."""
    excluded = exclude if isinstance(exclude, (set, frozenset)) else set(exclude)
    candidate = int(start) + 1
    while candidate in excluded or not is_prime(candidate):
        candidate += 1
    return candidate


def assign_table_primes(base_sizes: Sequence[int], n_heads: int,
                        layer_ids: Sequence[int]) -> dict[int, list[list[int]]]:
    """Prime size of every hash head: ``{layer_id: [order n = 2..N][head] -> prime}``.

    ``base_sizes[n - 2]`` is order n's base table size; primes are unique over the whole result.
    A base of 1 gives each head of that order one row (every n-gram hashes to it: no memory left, the
    control arm of sweeps/planning/ablation.py); those sizes are not primes and take no prime from the others.
    """
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")
    if len(set(layer_ids)) != len(layer_ids):
        raise ValueError(f"layer ids must be unique, got {list(layer_ids)}")
    for b in base_sizes:
        if int(b) != b or b < 1:
            raise ValueError(f"base table sizes must be integers >= 1, got {list(base_sizes)}")
    seen: set[int] = set()
    out: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order = []
        for base in base_sizes:
            if int(base) == 1:
                per_order.append([1] * n_heads)
                continue
            heads, start = [], int(base) - 1
            for _ in range(n_heads):
                p = next_prime_above(start, seen)
                seen.add(p)
                heads.append(p)
                start = p
            per_order.append(heads)
        out[int(layer_id)] = per_order
    return out
