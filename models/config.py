"""Model configuration: the ``model`` section of the config tree (rundir/schema.py), with the typed
``moe`` and ``engram`` sections (pure data kept in core: :mod:`core.moe_config`, :mod:`core.engram_config`;
re-exported by models.moe and memory), as torchtitan keeps its MoEArgs inside the model args. One object
is built per run and handed to every layer: nothing re-parses a section per layer."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional

from core.config_utils import load
from core.fingerprint import fingerprint
from core.engram_config import EngramConfig
from core.moe_config import MoEConfig


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
    # residual branches; > 1: hyper-connections (models.hyper_connections). None (the default) is 1, so that
    # `+model.n_branches=4` (Hydra's add) works on a config that leaves it out.
    n_branches: Optional[int] = None
    moe: Optional[MoEConfig] = None  # None = dense FFN everywhere
    engram: Optional[EngramConfig] = None  # None = no memory

    def __post_init__(self):
        if self.n_branches is None:
            self.n_branches = 1
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
        mem_n = self.engram.n_branches if self.engram is not None else None
        if mem_n is not None and mem_n != n:
            raise ValueError(f"model.engram.n_branches={mem_n!r} disagrees with model.n_branches={n}: the branch "
                             f"count is the backbone's (set model.n_branches, leave engram.n_branches null)")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
        """A mapping of fields, ``moe`` and ``engram`` as nested mappings (the YAML / plan form)."""
        return load(cls, d, "model")

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
        return fingerprint(self.to_dict(), sort_keys=True, default=str)
