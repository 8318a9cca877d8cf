"""``train.deterministic=true``: a run repeats its losses and weights bit for bit, run to run.

On CPU and gloo the trainer already repeats itself (fixed data order, seeded init, summation orders fixed
by construction: expert-parallel dispatch, sharded-table owners, per-step MoE load all-reduce). On CUDA
three things vary between two launches of one config: cuBLAS picks split-K reductions per workspace,
cuDNN autotunes algorithms, and scatter/index-add backward kernels (embedding, Engram table gradients,
the MoE combine) sum with atomics. The switch turns each off: ``CUBLAS_WORKSPACE_CONFIG=:4096:8``,
``torch.use_deterministic_algorithms(True)`` (deterministic kernels where PyTorch has them; an op without
one raises, naming itself, rather than silently varying) and cuDNN without benchmark mode. It costs speed
(sorted index-adds instead of atomics), so it is off by default and outside the trajectory settings (a
resume may flip it). It does not promise equality across world sizes, devices or library versions:
reduction orders differ there by design.
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("train")
CUBLAS_WORKSPACE = ":4096:8"


def apply_determinism(enabled: bool) -> None:
    """Switch deterministic kernels on for this process (call before the first CUDA matmul)."""
    if not enabled:
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (CUBLAS_WORKSPACE, ":16:8"):
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    log.info("train.deterministic: deterministic kernels on (CUBLAS_WORKSPACE_CONFIG=%s)",
             os.environ["CUBLAS_WORKSPACE_CONFIG"])
