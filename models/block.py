"""One pre-norm transformer block with an optional memory hook before attention."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from core.accounting import Counts


class Block(nn.Module):
    """h = h + memory(h, mem_in)   (only where a memory module is attached)
    h = h + attn(norm(h))
    h = h + ffn(norm(h))

    ``ffn`` is any module mapping [B, T, d] -> [B, T, d] that reports ``counts``; it may expose an
    ``aux_loss`` attribute (a scalar tensor or None) set during its forward.

    With hyper-connections (``attn_hc`` and ``ffn_hc``, see :mod:`models.hyper_connections`) h is
    the multi-branch stream [B, T, n, d]: the memory adds its per-branch output to it directly, and
    each sublayer reads from and writes to it through its hyper-connection. Without them (one
    branch) the block is the plain residual above and holds no extra parameters.
    """

    def __init__(self, layer_id: int, attn: nn.Module, ffn: nn.Module, attn_norm: nn.Module,
                 ffn_norm: nn.Module, attn_hc: Optional[nn.Module] = None,
                 ffn_hc: Optional[nn.Module] = None):
        super().__init__()
        if (attn_hc is None) != (ffn_hc is None):
            raise ValueError(f"block {layer_id}: give hyper-connections for both sublayers or neither")
        self.layer_id = layer_id
        self.memory: Optional[nn.Module] = None
        self.attn_norm, self.attn = attn_norm, attn
        self.ffn_norm, self.ffn = ffn_norm, ffn
        self.attn_hc, self.ffn_hc = attn_hc, ffn_hc

    def attach_memory(self, module: nn.Module) -> None:
        self.memory = module

    def _attn(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.attn_norm(x))

    def _ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(self.ffn_norm(x))

    def forward(self, h: torch.Tensor, mem_in=None) -> torch.Tensor:
        if self.memory is not None:
            h = h + self.memory(h, mem_in)
        if self.attn_hc is None:
            h = h + self._attn(h)
            return h + self._ffn(h)
        h = self.attn_hc(h, self._attn)  # [B, T, n, d]
        return self.ffn_hc(h, self._ffn)

    def counts(self, seq_len: int) -> Counts:
        c = (self.attn_norm.counts(seq_len) + self.attn.counts(seq_len)
             + self.ffn_norm.counts(seq_len) + self.ffn.counts(seq_len))
        if self.memory is not None:
            c = c + self.memory.counts(seq_len)
        if self.attn_hc is not None:
            c = c + self.attn_hc.counts(seq_len) + self.ffn_hc.counts(seq_len)
        return c
