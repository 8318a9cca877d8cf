"""Backbone configuration. MoE and Engram sub-configs are owned by their own packages
(``models.moe.MoEConfig``, ``memory.EngramConfig``) and stored here as plain mappings so that
this file never needs to know their fields."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from models.config_utils import checked_kwargs


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (no grouping)
    head_dim: Optional[int] = None  # None: d_model // n_heads
    ffn_hidden: int = 352  # dense SwiGLU hidden size
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    tie_embeddings: bool = False
    moe: Optional[dict] = None  # fields of models.moe.MoEConfig; None = dense FFN everywhere
    engram: Optional[dict] = None  # fields of memory.EngramConfig; None = no memory

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "ffn_hidden", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = {k: (dict(v) if isinstance(v, Mapping) else v)
             for k, v in checked_kwargs(cls, d, "model").items()}
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Stable hash of the architecture: a checkpoint only loads into the same fingerprint."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
