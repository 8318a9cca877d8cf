"""Token-choice top-k router with a selection-only expert bias (auxiliary-loss-free balancing)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from core.accounting import Counts, linear_counts
from core.param_groups import tag


@dataclass
class Routing:
    """Routing decision for N tokens.

    scores: [N, E] float32 affinities s_{t,i} (sigmoid or softmax of the gate logits).
    expert_ids: [N, k] int64 chosen experts, chosen by top-k of ``scores + expert_bias``.
    weights: [N, k] float32 combine weights, taken from the unbiased ``scores`` (optionally
        normalised over the k chosen, then multiplied by route_scale).
    """

    scores: torch.Tensor
    expert_ids: torch.Tensor
    weights: torch.Tensor


class TopKRouter(nn.Module):
    """Gate ``W_g [E, d]``; selection ``top-k(s + b)``; combine weights from ``s`` alone.

    ``expert_bias`` (b) is a persistent float32 buffer: it is saved in checkpoints, kept in
    float32 even when the module is cast to bf16 (its sign updates of size ~1e-3 would be lost
    in bf16), and only ever changed by the owning layer after an optimizer step.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, score_func: str, norm_topk: bool,
                 route_scale: float, init_std: float):
        super().__init__()
        self.d_model, self.n_experts, self.top_k = d_model, n_experts, top_k
        self.score_func, self.norm_topk, self.route_scale = score_func, norm_topk, route_scale
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.trunc_normal_(self.weight, std=init_std, a=-3 * init_std, b=3 * init_std)
        tag(self.weight, "router")
        self.register_buffer("expert_bias", torch.zeros(n_experts, dtype=torch.float32), persistent=True)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.expert_bias.dtype != torch.float32:  # e.g. module.bfloat16(): keep the bias exact
            self.expert_bias = self.expert_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> Routing:
        """x: [N, d] -> Routing."""
        logits = F.linear(x, self.weight).float()
        if self.score_func == "sigmoid":
            scores = torch.sigmoid(logits)
        else:
            scores = torch.softmax(logits, dim=-1)
        expert_ids = torch.topk(scores.detach() + self.expert_bias, self.top_k, dim=-1, sorted=True).indices
        weights = scores.gather(1, expert_ids)
        if self.norm_topk:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            weights = weights * self.route_scale
        return Routing(scores, expert_ids, weights)

    def counts(self, seq_len: int) -> Counts:
        return linear_counts(self.d_model, self.n_experts)  # every token scores every expert
