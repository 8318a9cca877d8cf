"""``train.compile``: torch.compile the transformer blocks, or not.

Blocks are compiled in place (``nn.Module.compile``), so parameter names, state dicts and checkpoints are
the same with and without it, and a run may resume with the other setting. Only the blocks: the
embedding, output head and loss stay eager (the vocabulary projection is one matmul either way), and a
block's MoE dispatch, whose group sizes change every step, is compiled with dynamic shapes.

``auto`` compiles on CUDA and not on a CPU. Measured on CPU (benchmarks/README.md, 2026-11-30): compiling
the dense + Engram blocks costs about 25 s and gains 10% per step, less than a cpu-family run of one to
three minutes gives back, and the MoE blocks' batched CPU path (host-side slicing by group size) recompiles
until dynamo's limit and runs at 0.56x. The default is ``off`` until the GPU check's compiled row is measured.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from models.moe.experts import cuda_capability
from rundir.schema import COMPILE_MODES

log = logging.getLogger(__name__)
# Every block runs Block.forward, so its compiled variants share one cache: each kind of block (dense, MoE,
# each Engram layer with its own table sizes), the first and the later micro-steps of a step (MoE's load
# counter starts empty) and evaluation's grad mode are entries there. Dynamo's default limit (8) is below
# what a MoE + Engram model needs, and past it the blocks run eager without a word in the step time.
RECOMPILE_LIMIT = 64


def resolve_compile(mode: str, device: torch.device) -> bool:
    """Whether ``mode`` compiles on ``device`` (``auto``: CUDA yes, CPU no)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile={mode!r} must be one of {', '.join(COMPILE_MODES)}")
    return mode == "blocks" or (mode == "auto" and device.type == "cuda")


def compile_blocks(model: nn.Module, mode: str, device: torch.device) -> int:
    """Compile every block of ``model.layers`` in place when ``mode`` asks for it; returns how many."""
    if not resolve_compile(mode, device):
        return 0
    blocks = list(getattr(model, "layers", []))
    if device.type == "cuda":
        cuda_capability(device.index)  # the MoE dispatch asks it on every forward: a constant once known
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    for block in blocks:
        block.compile(dynamic=None)  # in place: state_dict keys unchanged (no `_orig_mod.` prefix)
    log.info("torch.compile: %d blocks (train.compile=%s, %s)", len(blocks), mode, device.type)
    return len(blocks)
