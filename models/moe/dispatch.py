"""Dropless, deterministic token <-> expert permutation.

Every (token, slot) pair of the top-k choice becomes one row of an expert-sorted buffer; no token
is ever dropped (no capacity factor). Rows move by gathers only, forward and backward: the
gradient of a permutation is the inverse permutation (another gather), and the k copies of a
token are summed over a fixed axis in a fixed order. No scatter-add or atomic accumulation is
involved anywhere, so outputs and gradients are bit-for-bit reproducible on every device, and no
zero-filled gradient buffers are allocated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


class _GatherTokens(torch.autograd.Function):
    """x [N, d] -> x[order // k] [N*k, d]; backward: inverse-permute, then sum the k copies."""

    @staticmethod
    def forward(ctx, x, order, inverse, top_k):
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, torch.div(order, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        return g.view(-1, ctx.top_k, g.shape[-1]).sum(dim=1), None, None, None


class Permute(torch.autograd.Function):
    """rows -> rows[perm]; backward: grad[inverse of perm]."""

    @staticmethod
    def forward(ctx, rows, perm, perm_inverse):
        ctx.save_for_backward(perm_inverse)
        return rows.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (perm_inverse,) = ctx.saved_tensors
        return grad.index_select(0, perm_inverse), None, None


def group_sizes(sorted_ids: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Rows per group of an ascending id vector: [n_groups] int64, computed on the device.

    ``torch.bincount`` must size its output from the largest id, a device-to-host sync on a GPU;
    group boundaries found by binary search over the sorted ids need none (and add no atomics).
    """
    bounds = torch.arange(n_groups + 1, device=sorted_ids.device, dtype=sorted_ids.dtype)
    return torch.diff(torch.searchsorted(sorted_ids, bounds))


@dataclass
class ExpertDispatch:
    """order[j]: flat (token*k + slot) index of sorted row j; inverse: the inverse permutation;
    tokens_per_expert[e]: rows of expert e (int64, on the tokens' device)."""

    order: torch.Tensor
    inverse: torch.Tensor
    tokens_per_expert: torch.Tensor
    top_k: int

    @classmethod
    def from_expert_ids(cls, expert_ids: torch.Tensor, n_experts: int) -> "ExpertDispatch":
        """expert_ids: [N, k] int64 -> dispatch sorted by expert id, ties kept in token order."""
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return cls(order, inverse, group_sizes(flat[order], n_experts), expert_ids.shape[1])

    def permute(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, d] -> [N*k, d] rows sorted by expert (token n appears k times)."""
        return _GatherTokens.apply(x, self.order, self.inverse, self.top_k)

    def combine(self, y_sorted: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """y_sorted: [N*k, d] expert outputs in sorted order; weights: [N, k] -> sum_j w_j y_j: [N, d]."""
        y = Permute.apply(y_sorted, self.inverse, self.order).view(weights.shape[0], self.top_k, -1)
        ys = y.unbind(1)  # unbind (not slicing): its backward stacks, with no zero-filled buffers
        ws = weights.to(y.dtype).unsqueeze(-1).unbind(1)
        out = ys[0] * ws[0]
        for j in range(1, self.top_k):  # fixed summation order (and faster than a broadcast reduce)
            out = torch.addcmul(out, ys[j], ws[j])
        return out
