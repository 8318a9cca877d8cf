"""One small DeepSeekMoE layer and a naive per-token reference, for the MoE tests (unit and integration)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from models.moe import MoEConfig, MoEFFN, build_moe_ffn


def make_layer(seed: int = 0, d: int = 32, layer_id: int = 1, **moe) -> MoEFFN:
    torch.manual_seed(seed)
    cfg = dict(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=24, n_dense_layers=0)
    cfg.update(moe)
    layer = build_moe_ffn(MoEConfig(**cfg), d, layer_id, init_std=0.1, out_std=0.05)
    assert isinstance(layer, MoEFFN)
    return layer


# ---- naive reference ---------------------------------------------------------------------------
def swiglu_ref(x, w1, w3, w2):
    """One token through one SwiGLU expert; weights in nn.Linear layout ([out, in])."""
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def naive_moe(layer: MoEFFN, x: torch.Tensor):
    """Per-token loop: score, biased top-k, unbiased weights, sum of experts (+ shared)."""
    cfg, r, ex = layer.cfg, layer.router, layer.experts
    B, T, d = x.shape
    outs, scores_all, chosen_all = [], [], []
    for t in range(B * T):
        xt = x.reshape(B * T, d)[t]
        logits = (r.weight @ xt).float()
        s = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, -1)
        chosen = torch.topk(s.detach() + r.expert_bias, cfg.top_k).indices.tolist()
        g = torch.stack([s[e] for e in chosen])
        if cfg.norm_topk:
            g = g / g.sum()
        g = g * cfg.route_scale
        y = torch.zeros(d)
        for j, e in enumerate(chosen):
            y = y + g[j] * swiglu_ref(xt, ex.w1[e], ex.w3[e], ex.w2[e])
        if layer.shared is not None:
            sh = layer.shared
            y = y + swiglu_ref(xt, sh.w1.weight, sh.w3.weight, sh.w2.weight)
        outs.append(y)
        scores_all.append(s)
        chosen_all.append(chosen)
    aux = None
    if cfg.uses_aux_loss:
        E, k = cfg.n_routed_experts, cfg.top_k
        per_seq = []
        for b in range(B):
            f = torch.zeros(E)
            p = torch.zeros(E)
            for t in range(b * T, (b + 1) * T):
                for e in chosen_all[t]:
                    f[e] += E / (k * T)
                s = scores_all[t]
                p = p + (s / s.sum()) / T
            per_seq.append((f * p).sum())
        aux = cfg.aux_loss_coef * torch.stack(per_seq).mean()
    return torch.stack(outs).view(B, T, d), aux


def grads_of(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, aux, gy: torch.Tensor):
    loss = (out * gy).sum() + (aux if aux is not None else 0.0)
    params = [p for _, p in module.named_parameters()]
    return torch.autograd.grad(loss, [x] + params)
