"""One Engram layer: hashed n-gram memory fused into the residual stream by a context-aware gate.

With e = concat of the retrieved rows of all heads (width E = (N - 1) * embed_dim_per_ngram) and
h_g the hidden state of residual branch g:

    k_g  = RMSNorm(W_k^g e + b_k^g),  q_g = RMSNorm(h_g)
    s_g  = <k_g, q_g> / sqrt(d)
    a_g  = sigmoid(sign(s_g) * sqrt(max(|s_g|, 1e-6)))          (signed square root, then sigmoid)
    v_g  = a_g * (W_v e + b_v)                                    (value projection shared by branches)
    out  = v + SiLU(DepthwiseCausalConv(RMSNorm(v)))              (kernel 4, dilation N, zero-init)

The caller adds ``out`` to the residual stream before attention. Input [B, T, d] is the standard
single-branch stream; [B, T, G, d] feeds G branches (G = the backbone's model.n_branches; the
hyper-connected stream of models.hyper_connections), adding a per-branch output to each.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from core.accounting import Counts, linear_counts
from core.param_groups import tag_module
from memory.layers import BranchRMSNorm, MultiHeadTable, ShortConv

GATE_EPS = 1e-6  # floor of |s| under the square root (bounds the gate's gradient at s = 0)


class Engram(nn.Module):
    def __init__(self, layer_id: int, table_sizes: Sequence[Sequence[int]], embed_dim_per_ngram: int,
                 d_model: int, n_branches: int = 1, kernel_size: int = 4, norm_eps: float = 1e-6,
                 init_std: float = 0.02, out_std: float = 0.02, table_init_std: float = 1.0):
        """``table_sizes[n - 2][j]``: rows of head j of order n (all orders have the same head count)."""
        super().__init__()
        n_orders = len(table_sizes)
        heads = len(table_sizes[0]) if n_orders else 0
        if n_orders < 1 or heads < 1 or any(len(s) != heads for s in table_sizes):
            raise ValueError(f"table_sizes must be a non-empty [order][head] grid, got {table_sizes}")
        if embed_dim_per_ngram % heads:
            raise ValueError(f"embed_dim_per_ngram={embed_dim_per_ngram} not divisible by {heads} heads")
        self.layer_id, self.d_model, self.n_branches = layer_id, d_model, n_branches
        self.max_ngram = n_orders + 1
        self.memory_dim = n_orders * embed_dim_per_ngram
        self.tables = MultiHeadTable([s for per_order in table_sizes for s in per_order],
                                     embed_dim_per_ngram // heads, table_init_std)
        self.value_proj = nn.Linear(self.memory_dim, d_model)
        self.key_proj = nn.Linear(self.memory_dim, n_branches * d_model)  # one key map per branch
        self.key_norm = BranchRMSNorm(n_branches, d_model, norm_eps)
        self.query_norm = BranchRMSNorm(n_branches, d_model, norm_eps)
        self.conv = ShortConv(n_branches, d_model, kernel_size, dilation=self.max_ngram, eps=norm_eps)
        for lin, std in ((self.key_proj, init_std), (self.value_proj, out_std)):
            nn.init.trunc_normal_(lin.weight, std=std, a=-3 * std, b=3 * std)
            nn.init.zeros_(lin.bias)
            tag_module(lin, weight="engram_proj", bias="bias")
        self._gate_mean: torch.Tensor | None = None

    @property
    def table_params(self) -> int:
        return self.tables.num_params

    def forward(self, h: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
        if hash_ids is None:
            raise ValueError(f"Engram layer {self.layer_id} called without hash ids")
        single = h.ndim == 3
        if single:
            if self.n_branches != 1:
                raise ValueError(f"Engram layer {self.layer_id} has {self.n_branches} branches; "
                                 f"expected input [B, T, {self.n_branches}, d], got {tuple(h.shape)}")
            h = h.unsqueeze(2)
        if h.ndim != 4 or h.shape[2] != self.n_branches or h.shape[3] != self.d_model:
            raise ValueError(f"Engram layer {self.layer_id}: bad hidden shape {tuple(h.shape)}")
        B, T = h.shape[:2]
        if hash_ids.shape[:2] != (B, T):
            raise ValueError(f"Engram layer {self.layer_id}: hash ids {tuple(hash_ids.shape)} do not match "
                             f"hidden states {tuple(h.shape)}")
        e = self.tables(hash_ids).to(h.dtype)  # [B, T, E]
        key = self.key_norm(self.key_proj(e).view(B, T, self.n_branches, self.d_model))
        query = self.query_norm(h)
        score = (key * query).sum(-1) / math.sqrt(self.d_model)  # [B, T, G]
        score = score.sign() * score.abs().clamp_min(GATE_EPS).sqrt()
        gate = torch.sigmoid(score).unsqueeze(-1)  # [B, T, G, 1]
        self._gate_mean = gate.detach().mean()
        value = gate * self.value_proj(e).unsqueeze(2)  # [B, T, G, d]
        out = value + self.conv(value)
        return out.squeeze(2) if single else out

    def counts(self, seq_len: int) -> Counts:
        G, d, E = self.n_branches, self.d_model, self.memory_dim
        gate_dot = Counts(0, 0, 2.0 * G * d)  # <k_g, q_g>: one multiply-add per element
        return (self.tables.counts(seq_len)
                + linear_counts(E, d, bias=True) + linear_counts(E, G * d, bias=True)
                + self.key_norm.counts(seq_len) + self.query_norm.counts(seq_len)
                + gate_dot + self.conv.counts(seq_len))

    def metrics(self) -> dict[str, float]:
        if self._gate_mean is None:
            return {}
        return {f"engram/layer{self.layer_id}/gate_mean": float(self._gate_mean)}

    def extra_repr(self) -> str:
        return (f"layer_id={self.layer_id}, memory_dim={self.memory_dim}, d_model={self.d_model}, "
                f"n_branches={self.n_branches}, table_params={self.table_params}")
