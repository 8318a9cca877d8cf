"""Parameter and FLOP accounting protocol.

Every module that holds parameters or does matrix work reports its own counts through
``counts(seq_len) -> Counts``; containers sum their children's reports. Nothing here
inspects parameter names.

Conventions:
- FLOPs are matmul FLOPs, one multiply-add = 2 FLOPs, forward pass, per token.
  Training FLOPs per token = 3 x forward (backward = 2 x forward for matmuls).
- Two attention counts, both named. ``flops_per_token`` counts the scores and the weighted sum of
  values over the full T x T product (what ``FlopCounterMode`` counts for SDPA); a causal kernel
  computes only the T (T + 1) / 2 query-key pairs at or below the diagonal, so
  ``flops_per_token_causal = flops_per_token - causal_skipped_flops`` is what the hardware does.
- The budget solver and every FLOP label of a run (``train_flops``, budgets, iso-FLOP tolerances)
  use the full count: the family budget rules and shipped plans were set under it, and attention
  is the same at every rho of a sweep, so the choice does not move the comparison. MFU uses the
  causal count (it is a statement about the hardware; the full count reads high at long sequences).
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
    flops_per_token: float = 0.0  # forward matmul FLOPs per token, attention over the full T x T
    causal_skipped_flops: float = 0.0  # the part of flops_per_token a causal kernel never computes

    @property
    def flops_per_token_causal(self) -> float:
        return self.flops_per_token - self.causal_skipped_flops

    def __add__(self, other: "Counts") -> "Counts":
        return Counts(
            self.total_params + other.total_params,
            self.active_params + other.active_params,
            self.flops_per_token + other.flops_per_token,
            self.causal_skipped_flops + other.causal_skipped_flops,
        )

    def __mul__(self, n: int) -> "Counts":
        return Counts(self.total_params * n, self.active_params * n, self.flops_per_token * n,
                      self.causal_skipped_flops * n)

    __rmul__ = __mul__


@runtime_checkable
class Accountable(Protocol):
    def counts(self, seq_len: int) -> Counts: ...


def linear_counts(d_in: int, d_out: int, bias: bool = False) -> Counts:
    """A dense d_in -> d_out projection applied to every token."""
    p = d_in * d_out + (d_out if bias else 0)
    return Counts(p, p, 2.0 * d_in * d_out)


def attention_core_counts(seq_len: int, q_dim: int) -> Counts:
    """Scores Q K^T and the weighted sum A V of one causal sequence, per token.

    Full product: 2 matmuls x 2 FLOPs x seq_len keys x q_dim. A causal kernel visits
    (seq_len + 1) / 2 keys per query on average, so it skips 2 x 2 x (seq_len - 1) / 2 x q_dim.
    """
    return Counts(0, 0, 4.0 * seq_len * q_dim, 2.0 * (seq_len - 1) * q_dim)


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
    (full T x T: the budget's convention) and the output head included;
    ``flops_per_token_causal`` is the same with attention as a causal kernel computes it (MFU's).
    """

    total_params: int
    active_params: int
    embedding_params: int
    head_params: int
    flops_per_token: float
    causal_skipped_flops: float = 0.0

    @property
    def flops_per_token_causal(self) -> float:
        return self.flops_per_token - self.causal_skipped_flops

    @property
    def train_flops_per_token_causal(self) -> float:
        """3 x the causal forward count: the FLOPs a causal kernel runs per trained token (for MFU)."""
        return 3.0 * self.flops_per_token_causal

    @property
    def sparse_params(self) -> int:
        return self.total_params - self.active_params

    @property
    def train_flops_per_token(self) -> float:
        return 3.0 * self.flops_per_token
