"""One pre-norm transformer block with an optional memory hook before attention."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from models.accounting import Counts


class Block(nn.Module):
    """h = h + memory(h, mem_in)   (only where a memory module is attached)
    h = h + attn(norm(h))
    h = h + ffn(norm(h))

    ``ffn`` is any module mapping [B, T, d] -> [B, T, d] that reports ``counts``; it may expose an
    ``aux_loss`` attribute (a scalar tensor or None) set during its forward.
    """

    def __init__(self, layer_id: int, attn: nn.Module, ffn: nn.Module, attn_norm: nn.Module,
                 ffn_norm: nn.Module):
        super().__init__()
        self.layer_id = layer_id
        self.memory: Optional[nn.Module] = None
        self.attn_norm, self.attn = attn_norm, attn
        self.ffn_norm, self.ffn = ffn_norm, ffn

    def attach_memory(self, module: nn.Module) -> None:
        self.memory = module

    def forward(self, h: torch.Tensor, mem_in=None) -> torch.Tensor:
        if self.memory is not None:
            h = h + self.memory(h, mem_in)
        h = h + self.attn(self.attn_norm(h))
        h = h + self.ffn(self.ffn_norm(h))
        return h

    def counts(self, seq_len: int) -> Counts:
        c = (self.attn_norm.counts(seq_len) + self.attn.counts(seq_len)
             + self.ffn_norm.counts(seq_len) + self.ffn.counts(seq_len))
        if self.memory is not None:
            c = c + self.memory.counts(seq_len)
        return c
