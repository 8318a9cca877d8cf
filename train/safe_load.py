"""Loading DeepSpeed's checkpoint files without unpickling code: ``torch.load(weights_only=True)`` with the
few data-only classes DeepSpeed pickles into them allowed. Used by the checkpoint module and by the
expert and table files written beside DeepSpeed's (so both sit above this one, not above each other)."""
from __future__ import annotations

import torch


def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed pickles into its checkpoints (data only, no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location=None, mmap: bool = False):
    """``mmap``: map the file instead of reading it (tensors are read when touched)."""
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
