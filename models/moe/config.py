"""MoE configuration, re-exported: the dataclass lives in :mod:`core.moe_config`, next to the Engram
config, so that every typed section of ModelConfig is pure data below both models and memory."""
from core.moe_config import BALANCE_MODES, IMPLS, SCORE_FUNCS, MoEConfig

__all__ = ["BALANCE_MODES", "IMPLS", "SCORE_FUNCS", "MoEConfig"]
