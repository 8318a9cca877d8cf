"""Engram table parameters <-> base table sizes.

One Engram layer holds, for each order n = 2..N and head j, a table of p_{l,n,j} rows (a prime,
see :mod:`memory.primes`) and ``head_dim = embed_dim_per_ngram / heads_per_ngram`` columns, so

    table_params = head_dim * sum over layers l, orders n, heads j of p_{l,n,j}.

The inverse (a parameter budget -> base sizes) splits the budget over orders by ``order_shares``
(equal by default) and evenly over layers and heads, then corrects the base sizes until the exact
prime-sized total is as close to the budget as the primes allow: the heads of one order take
consecutive primes, so the total moves in steps of a few rows per table (relative error ~1e-6
at paper scale, ~1e-3 for CPU-sized tables). Primes come from a deterministic Miller-Rabin test,
so solving a paper-scale budget (billions of parameters, primes around 1e7..1e8) takes
milliseconds.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

from memory.config import EngramConfig
from memory.primes import assign_table_primes

_MAX_ITERS = 12


def table_primes_for(cfg: EngramConfig,
                     base_sizes: Optional[Sequence[int]] = None) -> dict[int, list[list[int]]]:
    """Exact prime table sizes ``{layer_id: [order][head]}`` (base sizes default to the config's)."""
    bases = list(base_sizes) if base_sizes is not None else resolve_base_sizes(cfg)
    return assign_table_primes(bases, cfg.heads_per_ngram, cfg.layer_ids)


def params_of_primes(primes: Mapping[int, Sequence[Sequence[int]]], head_dim: int) -> int:
    return head_dim * sum(p for per_order in primes.values() for heads in per_order for p in heads)


def table_params_for(cfg: EngramConfig,
                     base_sizes: Optional[Sequence[int]] = None) -> int:
    """Exact number of table parameters over all Engram layers of this config."""
    return params_of_primes(table_primes_for(cfg, base_sizes), cfg.head_dim)


def resolve_base_sizes(cfg: EngramConfig) -> list[int]:
    """The config's base size per order: ``table_sizes`` as given, or solved from ``table_params``."""
    if cfg.table_sizes is not None:
        return list(cfg.table_sizes)
    return solve_table_sizes(cfg.table_params, cfg)[0]


def solve_table_sizes(table_params: Union[int, float], cfg: EngramConfig,
                      order_shares: Optional[Sequence[float]] = None) -> tuple[list[int], int]:
    """Base size per order whose prime-sized tables hold as close to ``table_params`` as possible.

    Uses the config's layers, orders, heads and dims (its own table_sizes/table_params are ignored).
    ``order_shares``: relative share of the budget per order 2..N (default: equal).
    Returns ``(base_sizes, exact_table_params)``.
    """
    target = float(table_params)
    if not target > 0:
        raise ValueError(f"table_params must be positive, got {table_params!r}")
    shares = [1.0] * cfg.n_orders if order_shares is None else [float(s) for s in order_shares]
    if len(shares) != cfg.n_orders or min(shares) < 0 or sum(shares) <= 0:
        raise ValueError(f"order_shares needs {cfg.n_orders} non-negative weights with a positive sum, "
                         f"got {order_shares!r}")
    shares = [s / sum(shares) for s in shares]
    heads_per_order = len(cfg.layer_ids) * cfg.heads_per_ngram  # tables per order over all layers
    rows_per_head = [target * s / (cfg.head_dim * heads_per_order) for s in shares]  # ideal rows

    def evaluate(bases: list[int]) -> int:
        return table_params_for(cfg, bases)

    floor_params = evaluate([2] * cfg.n_orders)
    if target < floor_params:
        raise ValueError(f"table_params={int(target)} is below the smallest possible tables "
                         f"({floor_params} params for {len(cfg.layer_ids)} layers x {cfg.n_orders} orders x "
                         f"{cfg.heads_per_ngram} heads x {cfg.head_dim} dims)")
    # exact(bases) ~ head_dim * heads_per_order * sum(bases) + (prime-gap overshoot, roughly constant):
    # shift the ideal sizes down by the measured overshoot until it stops improving.
    correction = 0.0
    best: Optional[tuple[float, list[int], int]] = None
    tried: set[tuple[int, ...]] = set()
    for _ in range(_MAX_ITERS):
        bases = [max(2, round(r - correction * s)) for r, s in zip(rows_per_head, shares)]
        if tuple(bases) in tried:
            break
        tried.add(tuple(bases))
        exact = evaluate(bases)
        err = exact - target
        if best is None or abs(err) < best[0]:
            best = (abs(err), bases, exact)
        correction += err / (cfg.head_dim * heads_per_order)
    assert best is not None
    return best[1], best[2]
