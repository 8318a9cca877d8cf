"""Causal multi-head attention with grouped KV heads, RoPE and SDPA."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.accounting import Counts, attention_core_counts, linear_counts
from core.param_groups import tag_module
from models.layers import Rotary


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 max_seq_len: int, rope_theta: float, init_std: float, out_std: float):
        super().__init__()
        if n_heads % n_kv_heads:
            raise ValueError(f"n_heads={n_heads} is not a multiple of n_kv_heads={n_kv_heads}")
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.wq = nn.Linear(d_model, n_heads * head_dim, bias=False)
        self.wk = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wv = nn.Linear(d_model, n_kv_heads * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.rotary = Rotary(head_dim, max_seq_len, rope_theta)
        for lin in (self.wq, self.wk, self.wv, self.wo):
            tag_module(lin, weight="matrix")
        for lin in (self.wq, self.wk, self.wv):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.wo.weight, std=out_std, a=-3 * out_std, b=3 * out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rotary(q), self.rotary(k)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads,
            scale=1.0 / math.sqrt(self.head_dim))
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))

    def counts(self, seq_len: int) -> Counts:
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        proj = (linear_counts(self.d_model, q_dim) + linear_counts(self.d_model, kv_dim) * 2
                + linear_counts(q_dim, self.d_model))
        # QK^T and AV: full T x T count, and what the causal kernel skips (core.accounting).
        return proj + attention_core_counts(seq_len, q_dim)
