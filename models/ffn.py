"""Dense SwiGLU feed-forward block."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.accounting import Counts, linear_counts
from core.param_groups import tag_module


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int, init_std: float = 0.02, out_std: float = 0.02):
        super().__init__()
        self.d_model, self.hidden = d_model, hidden
        self.w1 = nn.Linear(d_model, hidden, bias=False)  # gate
        self.w3 = nn.Linear(d_model, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, d_model, bias=False)  # down
        for lin in (self.w1, self.w2, self.w3):
            tag_module(lin, weight="matrix")  # an MoE layer re-tags its shared experts
        for lin in (self.w1, self.w3):
            nn.init.trunc_normal_(lin.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std, a=-3 * out_std, b=3 * out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def counts(self, seq_len: int) -> Counts:
        return linear_counts(self.d_model, self.hidden) * 2 + linear_counts(self.hidden, self.d_model)
