"""Parameter and FLOP accounting protocol.

Every module that holds parameters or does matrix work reports its own counts through
``counts(seq_len) -> Counts``; containers sum their children's reports. Nothing here
inspects parameter names.

Conventions (shared by the budget solver and MFU):
- FLOPs are matmul FLOPs, one multiply-add = 2 FLOPs, forward pass, per token.
  Training FLOPs per token = 3 x forward (backward = 2 x forward for matmuls).
- Attention scores count the full T x T product (what ``FlopCounterMode`` counts for the
  math SDPA path); causal kernels do about half, which only makes reported MFU conservative.
- Table lookups (token embedding, Engram tables) count zero FLOPs.
- ``total_params`` counts every parameter of the module; ``active_params`` those used by one token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True)
class Counts:
    total_params: int = 0
    active_params: int = 0
    flops_per_token: float = 0.0  # forward matmul FLOPs per token

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(
            self.total_params + other.total_params,
            self.active_params + other.active_params,
            self.flops_per_token + other.flops_per_token,
        )

    def __mul__(self, n: int) -> "Counts":
        return Counts(self.total_params * n, self.active_params * n, self.flops_per_token * n)

    __rmul__ = __mul__


@runtime_checkable
class Accountable(Protocol):
    def counts(self, seq_len: int) -> Counts: ...


def linear_counts(d_in: int, d_out: int, bias: bool = False) -> Counts:
    """A dense d_in -> d_out projection applied to every token."""
    p = d_in * d_out + (d_out if bias else 0)
    return Counts(p, p, 2.0 * d_in * d_out)


def norm_counts(dim: int) -> Counts:
    return Counts(dim, dim, 0.0)


def sum_counts(items, seq_len: int) -> Counts:
    total = Counts()
    for m in items:
        total = total + m.counts(seq_len)
    return total


@dataclass(frozen=True)
class ModelCounts:
    """Whole-model report in the paper's terms.

    ``total_params`` / ``active_params`` exclude the vocabulary embedding and the output head
    (P_tot, P_act); ``flops_per_token`` includes everything that multiplies, attention scores
    and the output head included.
    """

    total_params: int
    active_params: int
    embedding_params: int
    head_params: int
    flops_per_token: float

    @property
    def sparse_params(self) -> int:
        return self.total_params - self.active_params

    @property
    def train_flops_per_token(self) -> float:
        return 3.0 * self.flops_per_token
