"""Decoder-only transformer: token embedding -> blocks -> RMSNorm -> output head.

With ``n_branches > 1`` the residual stream is hyper-connected (:mod:`models.hyper_connections`):
expanded to [B, T, n, d] after the embedding, merged back to [B, T, d] before the final norm.

The memory branch (Engram) is handed in, never imported: models and memory are siblings above
``core``, and the model is assembled where both are known (:func:`assembly.build_model`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.accounting import Counts, ModelCounts, linear_counts
from core.distributed import all_reduce_sum
from core.param_groups import tag
from models.attention import Attention
from models.block import Block
from models.config import ModelConfig
from models.ffn import SwiGLU
from models.hyper_connections import HyperConnection, expand_streams, merge_streams
from models.layers import RMSNorm


# model config -> (indexer, {layer_id: module}). The indexer maps raw ids [B, T] to per-layer keys
# {layer_id: keys}; block l then adds module(h, keys[l]) to its residual stream before attention.
MemoryBuilder = Callable[[ModelConfig], tuple[nn.Module, dict[int, nn.Module]]]


@dataclass
class ModelOutput:
    loss: Optional[torch.Tensor]  # ce_loss + aux_loss (what is back-propagated)
    ce_loss: Optional[torch.Tensor]  # mean next-token cross-entropy (nats)
    aux_loss: Optional[torch.Tensor]  # sum of auxiliary losses reported by blocks (or None)
    logits: Optional[torch.Tensor]


def build_ffn(cfg: ModelConfig, layer_id: int, init_std: float, out_std: float) -> nn.Module:
    if cfg.moe is not None:
        from models.moe import build_moe_ffn  # local import: MoE lives in its own package

        ffn = build_moe_ffn(cfg.moe, cfg.d_model, layer_id, init_std, out_std)
        if ffn is not None:  # None: this layer stays dense (e.g. first k layers)
            return ffn
    return SwiGLU(cfg.d_model, cfg.ffn_hidden, init_std, out_std)


def build_hyper_connections(cfg: ModelConfig, layer_id: int) -> tuple:
    """(attention HC, FFN HC) of block ``layer_id``; () for a single-branch residual."""
    if cfg.n_branches == 1:
        return ()
    return tuple(HyperConnection(cfg.n_branches, cfg.d_model, 2 * layer_id + k, cfg.norm_eps) for k in (0, 1))


class Transformer(nn.Module):
    """``memory``: builds the memory branch when ``cfg.engram`` is set (assembly.build_model hands in
    memory.build_memory); the backbone itself knows no memory module."""

    def __init__(self, cfg: ModelConfig, memory: Optional[MemoryBuilder] = None):
        super().__init__()
        self.cfg = cfg
        std = cfg.init_std
        out_std = std / math.sqrt(2 * cfg.n_layers)
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        tag(self.tok_emb.weight, "embed")
        self.layers = nn.ModuleList()
        for i in range(cfg.n_layers):
            attn = Attention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.max_seq_len,
                             cfg.rope_theta, std, out_std)
            self.layers.append(Block(i, attn, build_ffn(cfg, i, std, out_std),
                                     RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps),
                                     *build_hyper_connections(cfg, i)))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.tie_embeddings:
            self.head = None
        else:
            self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
            nn.init.trunc_normal_(self.head.weight, std=1.0 / math.sqrt(cfg.d_model),
                                  a=-3 / math.sqrt(cfg.d_model), b=3 / math.sqrt(cfg.d_model))
            tag(self.head.weight, "head")
        self.memory_indexer: Optional[nn.Module] = None
        if cfg.engram is not None:
            if memory is None:
                raise ValueError("model.engram is set but no memory builder was handed in: build the model "
                                 "with assembly.build_model(cfg)")
            self.memory_indexer, per_layer = memory(cfg)
            for layer_id, module in per_layer.items():
                if not 0 <= layer_id < cfg.n_layers:
                    raise ValueError(f"engram layer id {layer_id} outside 0..{cfg.n_layers - 1}")
                self.layers[layer_id].attach_memory(module)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                return_logits: bool = False) -> ModelOutput:
        T = idx.shape[1]
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        mem = self.memory_indexer(idx) if self.memory_indexer is not None else {}
        h = self.tok_emb(idx)  # [B, T, d]
        if self.cfg.n_branches > 1:
            h = expand_streams(h, self.cfg.n_branches)  # [B, T, n, d]
        aux = None
        for blk in self.layers:
            h = blk(h, mem.get(blk.layer_id))
            a = getattr(blk.ffn, "aux_loss", None)
            if a is not None:
                aux = a if aux is None else aux + a
        if self.cfg.n_branches > 1:
            h = merge_streams(h)
        h = self.norm(h)
        logits = F.linear(h, self.tok_emb.weight) if self.head is None else self.head(h)
        if targets is None:
            return ModelOutput(None, None, aux, logits)
        ce = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        loss = ce if aux is None else ce + aux
        return ModelOutput(loss, ce, aux, logits if return_logits else None)

    # ---- accounting -------------------------------------------------------------------------
    def core_counts(self, seq_len: int) -> Counts:
        """Blocks + final norm (+ memory): P_tot / P_act and their FLOPs, embedding/head excluded."""
        c = self.norm.counts(seq_len)
        for blk in self.layers:
            c = c + blk.counts(seq_len)
        if self.memory_indexer is not None:
            c = c + self.memory_indexer.counts(seq_len)
        return c

    def model_counts(self, seq_len: Optional[int] = None) -> ModelCounts:
        seq_len = seq_len or self.cfg.max_seq_len
        core = self.core_counts(seq_len)
        emb = self.tok_emb.weight.numel()
        head = linear_counts(self.cfg.d_model, self.cfg.vocab_size)
        head_params = 0 if self.head is None else head.total_params
        return ModelCounts(core.total_params, core.active_params, emb, head_params,
                           core.flops_per_token + head.flops_per_token, core.causal_skipped_flops)

    # ---- hooks the trainer calls ------------------------------------------------------------
    @torch.no_grad()
    def on_optimizer_step(self, extra: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Forward the post-step hook to submodules that define one. MoE layers' token counts travel in
        one all-reduce for all layers (one collective per step, not one per layer), then each layer
        updates its bias from its slice. ``extra`` ([k], e.g. the training loop's step losses) rides in
        the same all-reduce: returned summed over ranks (fp64)."""
        subs = [m for m in self.modules() if m is not self]
        moe = [m for m in subs if hasattr(m, "take_step_load")]
        parts = [m.take_step_load().double() for m in moe]  # [E_l] each
        parts += [extra.double()] if extra is not None else []
        if parts:
            total = all_reduce_sum(torch.cat(parts)).split([t.numel() for t in parts])
            for m, load in zip(moe, total):
                m.apply_step_load(load.float())  # token counts: exact in fp32 and fp64 alike
            extra = total[-1] if extra is not None else None
        for m in subs:
            if hasattr(m, "on_optimizer_step") and not hasattr(m, "take_step_load"):
                m.on_optimizer_step()
        return extra

    def metrics(self) -> dict[str, float]:
        """Collect scalar metrics from submodules that report them (e.g. per-layer expert load)."""
        out: dict[str, float] = {}
        for m in self.modules():
            if m is not self and hasattr(m, "metrics"):
                out.update(m.metrics())
        return out
