"""Hyper-connections: a residual stream widened into ``n`` parallel branches.

Hyper-Connections (Zhu et al. 2024, arXiv 2409.19606) replace ``h = h + f(norm(h))`` by a stream
H [n, d] per token and, around every sublayer f (attention, FFN/MoE),

    x   = sum_i a_i H_i                         read: the sublayer's input, [d]
    H'_j = sum_i R_ij H_i + b_j f(norm(x))       write + residual mixing, [n, d]

The stream is expanded after the token embedding (n copies) and merged (mean over branches) before
the final norm. Engram sits directly on the stream ([B, T, n, d]: branch-specific keys and gates, a
shared value projection, as in deepseek-ai/Engram's engram_demo_v1.py) and is not wrapped.

Dynamic, not static. The weights are ``static + scale * tanh(RMSNorm(H_i) W)``, per token, as the
paper's DHC: stream i's features set its read weight a_i, its write weight b_i and its row R_i.
Zhu et al. find DHC better than static HC at equal tokens, and DeepSeek-V3-style backbones
(hc_mult = 4; DeepSeek's manifold-constrained mHC) are dynamic too. The whole connection costs
2 n d (n + 2) + 2 n d + 2 n^2 d FLOPs per token and sublayer (counted below): about 0.6% of a
layer at the paper's 2e20 shape (n = 4, d = 2560), but 6% of the tiny test model's (d = 64),
where the budget solver charges it like any other FLOP. We keep Zhu's unconstrained tanh form,
not mHC's Sinkhorn-projected R: mHC addresses signal blow-up at 27B scale with 60+ layers, and its
sigmoid/Sinkhorn parametrisation cannot start exactly at the identity, which the initialisation
below relies on.

Initialisation: R = I, b = 1, a = one-hot at (sublayer index mod n), W = 0 (drawn from no random
generator). Every branch then starts equal to the single-stream residual h (the read picks h
exactly, I @ H keeps it, b adds f to every branch), so a freshly built n-branch model computes
the 1-branch model's function (up to rounding in the final mean; Engram's per-branch keys make
its branches differ from the first step) and consumes the same random numbers: the same seed
gives the same backbone weights.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.accounting import Counts
from core.param_groups import tag

HC_GROUP = "residual_mix"  # a few mixing weights per branch: AdamW without weight decay, never Muon
DYN_SCALE_INIT = 0.01  # Zhu et al.'s s_alpha, s_beta


class HyperConnection(nn.Module):
    """Dynamic hyper-connection around one sublayer: ``forward(H [B, T, n, d], f) -> H' [B, T, n, d]``
    where ``f`` maps the read-out [B, T, d] to the sublayer's output [B, T, d]."""

    def __init__(self, n_branches: int, d_model: int, sublayer_index: int, eps: float = 1e-6):
        super().__init__()
        if n_branches < 2:
            raise ValueError(f"HyperConnection needs n_branches >= 2, got {n_branches}")
        n = self.n_branches = n_branches
        self.d_model, self.eps = d_model, eps
        read = torch.zeros(n)
        read[sublayer_index % n] = 1.0
        self.static_read = nn.Parameter(read)  # a [n]
        self.static_write = nn.Parameter(torch.ones(n))  # b [n]
        self.static_res = nn.Parameter(torch.eye(n))  # R [n, n], R[i, j]: branch i -> branch j
        self.norm_weight = nn.Parameter(torch.ones(d_model))  # RMSNorm gain of the dynamic path
        self.dyn_weight = nn.Parameter(torch.zeros(n + 2, d_model))  # rows: read, write, res[0..n)
        self.dyn_scale = nn.Parameter(torch.full((2,), DYN_SCALE_INIT))  # (read & res, write)
        for p in self.parameters():
            tag(p, HC_GROUP)

    def mixing(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-token weights from H [B, T, n, d]: read [B, T, n], write [B, T, n], res [B, T, n, n]."""
        dyn = torch.tanh(F.linear(F.rms_norm(h, (self.d_model,), self.norm_weight, self.eps),
                                  self.dyn_weight))  # [B, T, n, n + 2]
        s_a, s_b = self.dyn_scale[0], self.dyn_scale[1]
        read = self.static_read + s_a * dyn[..., 0]
        write = self.static_write + s_b * dyn[..., 1]
        res = self.static_res + s_a * dyn[..., 2:]
        return read, write, res

    def forward(self, h: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        if h.ndim != 4 or h.shape[2] != self.n_branches or h.shape[3] != self.d_model:
            raise ValueError(f"HyperConnection expects [B, T, {self.n_branches}, {self.d_model}], "
                             f"got {tuple(h.shape)}")
        read, write, res = self.mixing(h)
        x = torch.matmul(read.unsqueeze(-2), h).squeeze(-2)  # [B, T, d]
        y = sublayer(x)  # [B, T, d]
        # H'_j = sum_i R_ij H_i + b_j y: a matmul over branches, then a broadcast write.
        return torch.matmul(res.transpose(-1, -2), h) + write.unsqueeze(-1) * y.unsqueeze(-2)

    def counts(self, seq_len: int) -> Counts:
        n, d = self.n_branches, self.d_model
        p = sum(q.numel() for q in self.parameters())
        # dynamic projection (n rows of d -> n + 2), read (n x d) and residual mix (n x n x d), 2 FLOPs
        # per multiply-add; the write is a broadcast product, not a matmul (0, like norms).
        return Counts(p, p, 2.0 * n * d * (n + 2) + 2.0 * n * d + 2.0 * n * n * d)

    def extra_repr(self) -> str:
        return f"n_branches={self.n_branches}, d_model={self.d_model}"


def expand_streams(h: torch.Tensor, n_branches: int) -> torch.Tensor:
    """Token embeddings [B, T, d] -> n identical branches [B, T, n, d] (a view; no FLOPs)."""
    return h.unsqueeze(2).expand(-1, -1, n_branches, -1)


def merge_streams(h: torch.Tensor) -> torch.Tensor:
    """Branches [B, T, n, d] -> [B, T, d] before the final norm.

    The mean, not the paper's sum: after the scale-free final norm the two differ only through its
    eps, and the mean keeps the single-stream magnitude, so a fresh model's logits equal the
    1-branch model's. A reduction, 0 FLOPs.
    """
    return h.mean(dim=2)
