"""The lr scales of the Muon recipe (what train/optim.py needs to build its groups and print them),
apart from the optimizer itself (train/muon_optimizer.py), whose DeepSpeed base class imports
torch's compiler stack (~2.4 s at every trainer start): runs without Muon or lazy tables never load it."""
from __future__ import annotations

import torch
from torch.optim._muon import _adjust_lr

ADJUST_LR_FNS = ("match_rms_adamw", "original")


def zero_lr_scale(shape: tuple[int, int], adjust_lr_fn: str) -> float:
    """lr factor that turns DeepSpeed's ZeRO Muon update (scaled sqrt(max(1, A/B))) into ours."""
    return _adjust_lr(1.0, adjust_lr_fn, shape) / _adjust_lr(1.0, "original", shape)


def matrix_shape(p: torch.Tensor) -> tuple[int, int]:
    """The [out, in] shape Muon orthogonalises: the last two dims (one expert of [E, out, in])."""
    if p.ndim not in (2, 3):
        raise ValueError(f"Muon needs 2-D matrices or 3-D stacks of matrices, got shape {tuple(p.shape)}")
    return int(p.shape[-2]), int(p.shape[-1])


def muon_shape_factor(shape: tuple[int, int], adjust_lr_fn: str) -> float:
    """lr multiplier Muon applies to a matrix of ``shape`` (what the start-up lines report)."""
    return _adjust_lr(1.0, adjust_lr_fn, shape)
