"""Backbone configuration. MoE and Engram sub-configs are owned by their own packages
(``models.moe.MoEConfig``, ``memory.EngramConfig``) and stored here as plain mappings so that
this file never needs to know their fields."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from core.config_utils import checked_kwargs


_OMITTED_AT = {"n_branches": 1}  # field -> value at which it is left out of to_dict()


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
    n_branches: int = 1  # residual branches; > 1: hyper-connections (models.hyper_connections)
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
        self._check_branches()

    def _check_branches(self) -> None:
        """The branch count is the backbone's: Engram, if set, must agree (or leave it unset)."""
        n = self.n_branches
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"model.n_branches must be an integer >= 1, got {n!r}")
        engram = self.engram
        if isinstance(engram, Mapping):
            mem_n = engram.get("n_branches")
        else:
            mem_n = getattr(engram, "n_branches", None)
        if mem_n is not None and mem_n != n:
            raise ValueError(f"model.engram.n_branches={mem_n!r} disagrees with model.n_branches={n}: the branch "
                             f"count is the backbone's (set model.n_branches, leave engram.n_branches null)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        d = {k: (dict(v) if isinstance(v, Mapping) else v)
             for k, v in checked_kwargs(cls, d, "model").items()}
        return cls(**d)

    def to_dict(self) -> dict:
        """All fields, except those added later while at the value that reproduces the older model
        (``_OMITTED_AT``): older checkpoints keep their fingerprint and shipped plans stay unchanged."""
        d = asdict(self)
        for key, value in _OMITTED_AT.items():
            if d[key] == value:
                del d[key]
        return d

    def fingerprint(self) -> str:
        """Stable hash of the architecture: a checkpoint only loads into the same fingerprint."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
