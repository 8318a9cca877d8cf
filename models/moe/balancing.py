"""Expert load balancing: auxiliary-loss-free selection bias and the sequence-level auxiliary loss.

Auxiliary-loss-free (Wang et al. 2024; DeepSeek-V3 sec. 2.1.2): after each optimizer step, with
c_i the tokens routed to expert i during that step (summed over micro-batches and data-parallel
ranks) and c_bar their mean,

    b_i <- b_i + u * sign(c_bar - c_i),      then  b <- b - mean(b).

Overloaded experts become less likely to be selected, idle ones more. Re-centring leaves every
top-k choice unchanged (a common shift of all scores) and keeps b bounded and interpretable.

Sequence-level auxiliary loss (DeepSeek-V3 eq. 17-20), per sequence of T tokens:

    f_i = E / (k T) * sum_t 1[i in topk(t)],   P_i = 1/T * sum_t s'_{i,t},   L = alpha * sum_i f_i P_i,

with s' the affinities normalised over all E experts (softmax scores already are). L equals
alpha for a perfectly balanced sequence; it is averaged over the sequences of the batch.
"""
from __future__ import annotations

import torch


@torch.no_grad()
def update_expert_bias_(bias: torch.Tensor, load: torch.Tensor, rate: float) -> torch.Tensor:
    """Sign update of the selection bias from one step's per-expert token counts (float32)."""
    delta = rate * torch.sign(load.mean() - load)
    bias.add_(delta.to(bias.dtype))
    bias.sub_(bias.mean())
    return bias


def load_stats(load: torch.Tensor) -> dict[str, float]:
    """Imbalance of per-expert token counts, relative to the mean (1.0 everywhere = balanced)."""
    load = load.double()
    mean = load.mean()
    if mean <= 0:
        return {}
    return {
        "load_max_over_mean": (load.max() / mean).item(),
        "load_min_over_mean": (load.min() / mean).item(),
        "load_std_over_mean": (load.std(unbiased=False) / mean).item(),
    }


def sequence_aux_loss(scores: torch.Tensor, expert_ids: torch.Tensor, batch: int, seq_len: int,
                      score_func: str, coef: float) -> torch.Tensor:
    """scores: [B*T, E] float32 affinities; expert_ids: [B*T, k] chosen experts -> scalar loss.

    Gradients flow through P (the scores), not through the selection counts f.
    """
    n_experts, top_k = scores.shape[1], expert_ids.shape[1]
    if score_func == "sigmoid":
        probs = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        probs = scores
    with torch.no_grad():
        chosen = torch.zeros_like(scores).scatter_(1, expert_ids, 1.0)
        f = chosen.view(batch, seq_len, n_experts).sum(dim=1) * (n_experts / (top_k * seq_len))
    p = probs.view(batch, seq_len, n_experts).mean(dim=1)
    return coef * (f * p).sum(dim=-1).mean()
