"""Routed SwiGLU experts computed over an expert-sorted token buffer.

Tokens arrive sorted by expert: rows ``offs[e-1]:offs[e]`` of ``x`` belong to expert ``e``.
Each expert computes ``w2_e (silu(w1_e x) * (w3_e x))`` on its own rows. Two exact paths:

- ``grouped_mm``: three ``torch._grouped_mm`` calls over all experts at once (CUDA bf16, sm80+;
  the CPU kernel also runs in float32 and is used by the tests to cross-check the paths); each
  expert's group is zero-padded to a 16-byte multiple of rows on device, without a host sync;
- ``batched``: one matmul per expert over its contiguous slice (each expert's tokens form one
  batch). Deterministic everywhere, exact FLOPs (no padding), one host sync for the slice sizes.

Weights are stored like stacked ``nn.Linear`` weights: ``w1, w3: [E, hidden, d]``,
``w2: [E, d, hidden]``; the grouped path multiplies by their transposes (column-major views,
the layout the CUDA kernel wants).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.accounting import Counts
from core.param_groups import tag
from core.partial_init import current, trunc_normal_blocks

_GROUPED_MM_MAX_GROUPS = 1024  # the CUDA bf16 kernel's group limit


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: the autocast dtype when autocast is on for its device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_CAPABILITY: dict[Optional[int], tuple[int, int]] = {}


def cuda_capability(index: Optional[int]) -> tuple[int, int]:
    """The compute capability of CUDA device ``index``, asked of the driver once. It is asked on every
    forward, inside compiled blocks: there a device-property call breaks the graph, a lookup in this
    filled table is a constant (train/compile.py fills it before compiling). Not
    ``torch.compiler.assume_constant_result``: that decorator imports dynamo, a second per process."""
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def grouped_mm_unsupported(device: torch.device, dtype: torch.dtype, n_experts: int,
                           dims: tuple[int, ...]) -> Optional[str]:
    """Why ``torch._grouped_mm`` cannot run these expert shapes here, or None if it can."""
    if not hasattr(torch, "_grouped_mm"):
        return "this torch build has no torch._grouped_mm"
    if device.type == "cuda":
        if cuda_capability(device.index) < (8, 0):
            return "torch._grouped_mm needs a CUDA GPU with compute capability >= 8.0"
        if dtype != torch.bfloat16:
            return f"torch._grouped_mm on CUDA needs bfloat16 inputs, got {dtype}"
        if n_experts >= _GROUPED_MM_MAX_GROUPS:
            return f"torch._grouped_mm supports fewer than {_GROUPED_MM_MAX_GROUPS} experts, got {n_experts}"
    elif device.type != "cpu":
        return f"torch._grouped_mm is not available on device type {device.type!r}"
    for dim in dims:
        if (dim * dtype.itemsize) % 16:
            return f"torch._grouped_mm needs 16-byte aligned rows; dimension {dim} in {dtype} is not"
    return None


def padded_group_layout(tokens_per_expert: torch.Tensor, n_rows: int, align: int):
    """Rows of each expert group padded to a multiple of ``align``, computed on device (no sync).

    The weight-gradient grouped GEMM contracts over each group's rows; its kernels want every
    group to start and end on a 16-byte boundary (``align`` = 16 / element size). Returns
    ``dest`` ([n_rows] int64, the padded row of each sorted row), ``offs`` ([E] int32 group
    ends) and the padded row count, a static bound ``round_up(n_rows + E * (align - 1), align)``
    whose slack is given to the last group (so every row up to it is a zero row or a token row).
    """
    n_experts = tokens_per_expert.shape[0]
    padded = (tokens_per_expert + (align - 1)) // align * align
    total = -(-(n_rows + n_experts * (align - 1)) // align) * align
    padded_end = torch.cumsum(padded, dim=0)
    shift = (padded_end - padded) - (torch.cumsum(tokens_per_expert, dim=0) - tokens_per_expert)
    expert_of_row = torch.repeat_interleave(torch.arange(n_experts, device=tokens_per_expert.device),
                                            tokens_per_expert, output_size=n_rows)
    dest = torch.arange(n_rows, device=tokens_per_expert.device) + shift[expert_of_row]
    offs = padded_end.to(torch.int32)
    offs[-1:].fill_(total)  # a kernel with a scalar argument: `offs[-1] = total` copies from the host and syncs
    return dest, offs, total


class RoutedExperts(nn.Module):
    """E SwiGLU experts of hidden size ``hidden``; each token visits ``top_k`` of them."""

    def __init__(self, d_model: int, hidden: int, n_experts: int, top_k: int, init_std: float,
                 out_std: float):
        super().__init__()
        self.d_model, self.hidden, self.n_experts, self.top_k = d_model, hidden, n_experts, top_k
        # An expert-parallel rank builds its own experts only, the whole tensors' draws (core/partial_init.py)
        built = current()
        self.built_experts = (built.expert_first, built.expert_count) if built.expert_count else (0, n_experts)
        self.sharded = False
        self.w1 = nn.Parameter(trunc_normal_blocks((n_experts, hidden, d_model), init_std, *self.built_experts))  # gate
        self.w3 = nn.Parameter(trunc_normal_blocks((n_experts, hidden, d_model), init_std, *self.built_experts))  # up
        self.w2 = nn.Parameter(trunc_normal_blocks((n_experts, d_model, hidden), out_std, *self.built_experts))  # down
        for w in (self.w1, self.w2, self.w3):
            tag(w, "experts")

    def shard_(self, first: int, count: int) -> None:
        """Keep experts ``first .. first+count-1`` only (expert parallelism, models/moe/parallel.py).

        The experts hold the full [E, ...] tensors' draws (built with this block only, or sliced from the
        whole), so a sharded model starts from exactly the EP = 1 model's weights. ``n_experts`` stays the
        global count (what the accounting reports)."""
        if self.sharded:
            raise ValueError(f"routed experts are already sharded ({self.w1.shape[0]} of {self.n_experts} held)")
        if self.built_experts not in ((0, self.n_experts), (first, count)):
            raise ValueError(f"experts built as {self.built_experts} (first, count) cannot hold {(first, count)}")
        if self.built_experts != (first, count):
            for name in ("w1", "w2", "w3"):
                w = getattr(self, name)
                setattr(self, name, tag(nn.Parameter(w.detach()[first:first + count].clone()), "experts"))
        self.built_experts, self.sharded = (first, count), True

    def resolve_impl(self, impl: str, x: torch.Tensor) -> str:
        """'auto' -> 'grouped_mm' on CUDA (not ROCm) where the kernel supports the shapes, else
        'batched'. An explicit 'grouped_mm' that cannot run raises ValueError."""
        if impl == "batched":
            return impl
        reason = grouped_mm_unsupported(x.device, compute_dtype(x), self.n_experts,
                                        (self.d_model, self.hidden))
        if impl == "grouped_mm":
            if reason is not None:
                raise ValueError(f"moe.impl='grouped_mm' cannot run here: {reason}")
            return impl
        if impl != "auto":
            raise ValueError(f"unknown expert impl {impl!r}")
        if x.device.type == "cuda" and torch.version.hip is None and reason is None:
            return "grouped_mm"
        return "batched"

    def forward(self, x: torch.Tensor, tokens_per_expert: torch.Tensor, impl: str) -> torch.Tensor:
        """x: [M, d] sorted by expert; tokens_per_expert: [E] int64 summing to M -> [M, d]."""
        impl = self.resolve_impl(impl, x)
        if impl == "grouped_mm":
            return self._grouped_mm(x, tokens_per_expert)
        return self._batched(x, tokens_per_expert)

    def _grouped_mm(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype(x)
        dest, offs, total = padded_group_layout(tokens_per_expert, x.shape[0], 16 // dtype.itemsize)
        x_pad = x.new_zeros(total, x.shape[1], dtype=dtype).index_copy(0, dest, x.to(dtype))
        w1, w2, w3 = (w.to(dtype).transpose(-2, -1) for w in (self.w1, self.w2, self.w3))
        h = F.silu(torch._grouped_mm(x_pad, w1, offs=offs)) * torch._grouped_mm(x_pad, w3, offs=offs)
        return torch._grouped_mm(h, w2, offs=offs).index_select(0, dest)

    def _batched(self, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        sizes = tokens_per_expert.tolist()  # host sync: slice sizes must be known on the host
        w1s, w2s, w3s = self.w1.unbind(0), self.w2.unbind(0), self.w3.unbind(0)  # one-shot backward
        outs = []
        for e, xe in enumerate(torch.split(x, sizes, dim=0)):
            if sizes[e] == 0:
                continue
            outs.append(F.linear(F.silu(F.linear(xe, w1s[e])) * F.linear(xe, w3s[e]), w2s[e]))
        if not outs:
            return x.new_zeros(0, self.d_model)
        return torch.cat(outs, dim=0)

    def expert_params(self) -> int:
        """Parameters of one expert."""
        return 3 * self.d_model * self.hidden

    def counts(self, seq_len: int) -> Counts:
        """All E experts are held; each token multiplies through ``top_k`` of them."""
        per = self.expert_params()
        return Counts(per * self.n_experts, per * self.top_k, 2.0 * per * self.top_k)
