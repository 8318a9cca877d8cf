"""Small building blocks: RMSNorm and rotary position embeddings."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.accounting import Counts, norm_counts
from core.param_groups import tag


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = tag(nn.Parameter(torch.ones(dim)), "norm")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)

    def counts(self, seq_len: int) -> Counts:
        return norm_counts(self.weight.numel())


class Rotary(nn.Module):
    """Rotary embeddings (half-split convention), cos/sin cached as non-persistent buffers."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary head_dim must be even, got {head_dim}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        t = torch.arange(max_seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, H, T, D] -> rotated x."""
        T = x.shape[-2]
        cos = self.cos[:T].to(x.dtype)
        sin = self.sin[:T].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
