"""Configuration of the DeepSeekMoE feed-forward block: the typed ``model.moe`` section of the config tree
(torchtitan's MoEArgs inside the model args). Built once, from YAML or a dict, by
:func:`core.config_utils.load`; every MoE layer of a model shares the one instance. Pure data kept in
core next to the Engram config (re-exported as ``models.moe.MoEConfig``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

from core.config_utils import load

SCORE_FUNCS = ("sigmoid", "softmax")
BALANCE_MODES = ("aux_free", "aux_loss", "both", "none")
IMPLS = ("auto", "grouped_mm", "batched")


@dataclass
class MoEConfig:
    """Shared + fine-grained routed experts with token-choice top-k routing.

    n_routed_experts: routed experts per MoE layer (N).
    n_shared_experts: always-active experts per MoE layer (may be 0).
    top_k: routed experts chosen per token.
    expert_hidden: SwiGLU hidden size of each routed AND each shared expert.
    n_dense_layers: the first k layers keep the dense SwiGLU of size ``model.ffn_hidden``.
    score_func: 'sigmoid' (DeepSeek-V3) or 'softmax' router affinities.
    norm_topk: divide the k selected affinities by their sum before combining.
    route_scale: constant factor on the combine weights (after normalisation).
    balance: 'aux_free' (selection bias updated after each optimizer step), 'aux_loss'
        (sequence-level auxiliary loss), 'both', or 'none'.
    bias_update_rate: step size of the sign update of the selection bias (aux_free / both).
    aux_loss_coef: coefficient of the sequence-level auxiliary loss (aux_loss / both).
    impl: expert compute path: 'grouped_mm' (``torch._grouped_mm``), 'batched' (one matmul per
        expert over its contiguous token slice) or 'auto' (grouped_mm on CUDA in bf16 where the
        kernel supports the shapes, batched elsewhere).
    """

    n_routed_experts: int = 16
    n_shared_experts: int = 1
    top_k: int = 3
    expert_hidden: int = 88
    n_dense_layers: int = 1
    score_func: str = "sigmoid"
    norm_topk: bool = True
    route_scale: float = 1.0
    balance: str = "aux_free"
    bias_update_rate: float = 1e-3
    aux_loss_coef: float = 1e-4
    impl: str = "auto"

    def __post_init__(self):
        for name in ("n_routed_experts", "top_k", "expert_hidden"):
            if getattr(self, name) <= 0:
                raise ValueError(f"moe.{name} must be positive, got {getattr(self, name)}")
        for name in ("n_shared_experts", "n_dense_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")
        if self.top_k > self.n_routed_experts:
            raise ValueError(f"moe.top_k={self.top_k} exceeds moe.n_routed_experts={self.n_routed_experts}")
        if self.score_func not in SCORE_FUNCS:
            raise ValueError(f"moe.score_func must be one of {SCORE_FUNCS}, got {self.score_func!r}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"moe.balance must be one of {BALANCE_MODES}, got {self.balance!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"moe.impl must be one of {IMPLS}, got {self.impl!r}")
        if not self.route_scale > 0:
            raise ValueError(f"moe.route_scale must be positive, got {self.route_scale}")
        if self.uses_bias and not self.bias_update_rate > 0:
            raise ValueError(f"moe.balance={self.balance!r} needs moe.bias_update_rate > 0, "
                             f"got {self.bias_update_rate}")
        if self.uses_aux_loss and not self.aux_loss_coef > 0:
            raise ValueError(f"moe.balance={self.balance!r} needs moe.aux_loss_coef > 0, got {self.aux_loss_coef}")

    @property
    def uses_bias(self) -> bool:
        return self.balance in ("aux_free", "both")

    @property
    def uses_aux_loss(self) -> bool:
        return self.balance in ("aux_loss", "both")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoEConfig":
        """A mapping of fields (unknown keys and wrong types refused in one line)."""
        return load(cls, d, "model.moe")

    def to_dict(self) -> dict:
        return asdict(self)
