"""Expert parallelism inside the DeepSpeed engine (``parallel.expert=N``).

The layer side (row exchange, sharded weights) is models/moe/parallel.py. This module hands the
layout to DeepSpeed through its own MoE machinery, so ZeRO 0/1/2 reduce and partition the expert
weights over the right ranks:

* groups: DeepSpeed's ``ep_size_N`` groups (``deepspeed.utils.groups``): EP groups of N consecutive
  ranks exchange rows; the W / N ranks holding the same experts (every N-th rank) form the
  expert-data-parallel group;
* parameters: every routed expert weight is tagged ``allreduce=False, group_name="ep_size_N"``
  (DeepSpeed's MoE-parameter mark) and placed in optimizer groups of its own marked ``moe: True``
  (train/optim.py); ZeRO 1/2 partition those over the expert-data-parallel group;
* gradient scale: DeepSpeed sums an expert gradient over the expert-data-parallel group and divides
  by the full data-parallel size W (engine ``_reduce_expert_gradients``, ZeRO's ``average_tensor``).
  An EP rank's gradient already sums its EP group's N ranks (the all-to-all backward), so the result
  is the sum over all W ranks / W: exactly the EP = 1 gradient (tests/integration/test_moe_ep_train.py);
* the engine looks for ``deepspeed.moe.layer.MoE`` modules to switch this on: one parameter-free
  marker of that class is attached to the model.

The router and the shared experts stay replicated; their gradients are averaged over all W ranks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from core.partial_init import BuildShard
from models.moe import MoEConfig, MoEFFN
from models.moe.parallel import ExpertShard

MARKER = "expert_parallel_marker"


@dataclass(frozen=True)
class ExpertLayout:
    """size: EP size N; rank: this rank's EP rank; group_name: DeepSpeed's name of the groups."""

    size: int
    rank: int
    group_name: str


def check_expert_parallel(size: int, world_size: int, n_routed: Optional[int], precision: str = "fp32",
                          zero_stage: int = 0) -> None:
    """One-line errors for an EP size that cannot shard this run. bf16 at ZeRO 0 is refused: DeepSpeed
    wraps the optimizer with fp32 master copies whose clipping norm averages the ranks' local norms and
    whose state the expert checkpoint (keyed by the model's parameters) cannot reach."""
    if size < 1:
        raise ValueError(f"parallel.expert={size} must be >= 1")
    if size == 1:
        return
    if world_size % size:
        raise ValueError(f"parallel.expert={size} does not divide the world size {world_size}")
    if n_routed is None:
        raise ValueError(f"parallel.expert={size} needs a MoE model (model.moe is not set)")
    if n_routed % size:
        raise ValueError(f"parallel.expert={size} does not divide model.moe.n_routed_experts={n_routed}")
    if precision == "bf16" and zero_stage == 0:
        raise ValueError(f"parallel.expert={size} with train.precision=bf16 needs train.zero_stage 1 or 2")


def routed_experts(moe: Optional[MoEConfig]) -> Optional[int]:
    """model.moe's routed expert count (None for a dense model)."""
    return None if moe is None else moe.n_routed_experts


def moe_layers(model: nn.Module) -> list[MoEFFN]:
    return [m for m in model.modules() if isinstance(m, MoEFFN)]


def _marker(n_experts: int, layout: ExpertLayout) -> nn.Module:
    from deepspeed.moe.layer import MoE

    class ExpertParallelMarker(MoE):
        """Tells the DeepSpeed engine the model has expert-parallel parameters; holds nothing."""

        def __init__(self):
            nn.Module.__init__(self)  # not MoE.__init__: no DeepSpeed experts or gate are built
            self.num_experts, self.ep_size = n_experts, layout.size
            self.num_local_experts, self.expert_group_name = n_experts // layout.size, layout.group_name

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # the groups exist already (expert_layout)

        def forward(self, *args, **kwargs):
            raise RuntimeError("the expert-parallel marker is not a layer")

    return ExpertParallelMarker()


def expert_layout(size: int, world_size: int, n_routed: Optional[int]) -> Optional[ExpertLayout]:
    """This rank's place in DeepSpeed's ``ep_size_N`` groups (created here: before the model is built, so
    that it builds its own experts only); None for ``size`` 1."""
    check_expert_parallel(size, world_size, n_routed)
    if size == 1:
        return None
    from deepspeed.utils import groups

    name = f"ep_size_{size}"
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(size)
    return ExpertLayout(size, groups._get_expert_parallel_rank(name), name)


def build_shard(layout: Optional[ExpertLayout], n_routed: Optional[int], tables_sharded: bool, rank: int,
                world_size: int) -> BuildShard:
    """What this rank's model is built holding (core/partial_init.py): its block of every MoE layer's
    routed experts under ``layout``, its rows of every Engram table when they are sharded."""
    local = n_routed // layout.size if layout is not None else None
    return BuildShard(table_rank=rank if tables_sharded else 0, table_world=world_size if tables_sharded else 1,
                      expert_first=layout.rank * local if layout is not None else 0, expert_count=local)


def built_slices_line(model: nn.Module) -> list[str]:
    """What this rank's model was built holding (read off the built modules, core/partial_init.py): its
    block of routed experts and its table rows when they are a slice (nothing for a whole model)."""
    from memory.layers import MultiHeadTable

    parts = []
    layers = moe_layers(model)
    if layers and layers[0].experts.built_experts != (0, layers[0].experts.n_experts):
        first, count = layers[0].experts.built_experts
        parts.append(f"routed experts {first}..{first + count - 1} of {layers[0].experts.n_experts} per MoE layer")
    table = next((m for m in model.modules() if isinstance(m, MultiHeadTable)), None)
    if table is not None and table.built_rows != (0, 1):
        parts.append(f"Engram table rows {table.built_rows[0]}::{table.built_rows[1]}")
    return [f"model build: this rank drew and holds only its {' and '.join(parts)}"] if parts else []


def setup_expert_parallel(model: nn.Module, layout: Optional[ExpertLayout]) -> None:
    """Shard every MoE layer's routed experts as ``layout`` (:func:`expert_layout`, the one the model was
    built for) says, after the model is built from its seed, before the optimizer and the engine; nothing
    for None (EP size 1)."""
    if layout is None:
        return
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"parallel.expert={layout.size} needs MoE layers (model.moe.n_dense_layers leaves none)")
    from deepspeed.utils import groups

    group = groups._get_expert_parallel_group(layout.group_name)
    for layer in layers:
        layer.set_expert_shard(ExpertShard(layout.size, layout.rank, layer.cfg.n_routed_experts, group))
        for p in (layer.experts.w1, layer.experts.w2, layer.experts.w3):
            p.allreduce, p.group_name = False, layout.group_name  # DeepSpeed's MoE-parameter mark
    model.add_module(MARKER, _marker(layers[0].cfg.n_routed_experts, layout))


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def expert_group(model: nn.Module):
    """The EP process group of ``model``'s sharded experts, or None when they are not sharded."""
    shards = [m.shard for m in moe_layers(model) if m.shard is not None]
    return shards[0].group if shards else None


def grad_norm(parameters, group=None) -> torch.Tensor:
    """L2 norm of the whole model's gradient as a device tensor (no host read), after the data-parallel
    reduction: replicated gradients are the same on every rank and count once; each rank holds 1/N of
    the expert gradients, summed over the EP ``group`` (None: nothing is sharded)."""
    replicated, sharded = [], []
    for p in parameters:
        if p.grad is not None:
            (sharded if is_expert_param(p) else replicated).append(p.grad.detach().float().norm() ** 2)
    total = torch.stack(replicated).sum() if replicated else torch.zeros(())
    if sharded:
        expert_sq = torch.stack(sharded).sum()
        if group is not None:
            import torch.distributed as dist

            dist.all_reduce(expert_sq, group=group)
        total = total + expert_sq
    return total.sqrt()


def exact_fp32_clipping(engine, group) -> None:
    """ZeRO 0 in fp32: clip on the true global gradient norm. DeepSpeed 0.19's ``clip_grad_norm_`` averages
    the ranks' local norms, which under EP (each rank seeing other experts) is not the norm of the
    gradient EP = 1 clips on; ZeRO 1/2 compute the exact norm themselves (per-partition sums)."""
    max_norm = float(engine.gradient_clipping())

    def clip() -> None:
        params = [p for p in engine.module.parameters() if p.grad is not None]
        coef = torch.clamp(max_norm / (grad_norm(params, group) + 1e-6), max=1.0)  # DeepSpeed's formula
        for p in params:
            p.grad.mul_(coef.to(p.grad.dtype))

    engine.clip_fp32_gradients = clip


def expert_memory(model: nn.Module, optimizer: torch.optim.Optimizer, size: int, world_size: int,
                  zero_stage: int) -> dict[str, int]:
    """Routed expert weights and their optimizer state held by one rank (fp32 bytes): 1/N of the experts
    under EP = N, and under ZeRO 1/2 the state further split over the W / N ranks holding the same experts.
    Call before the engine is built (ZeRO replaces the groups' parameters by flat partitions)."""
    from train.optim import STATE_FLOATS

    routed = {id(p) for m in moe_layers(model) for p in (m.experts.w1, m.experts.w2, m.experts.w3)}
    params, state = 0, 0
    for g in optimizer.param_groups:
        n = sum(p.numel() for p in g["params"] if id(p) in routed)
        params += n
        state += n * STATE_FLOATS["muon" if g.get("use_muon") else "adamw"]
    shards = world_size // size if zero_stage > 0 else 1
    return {"expert_parallel": size, "expert_params_per_rank": params, "expert_bytes_per_rank": 4 * params,
            "expert_optimizer_state_bytes_per_rank": 4 * -(-state // shards)}


def expert_memory_lines(model: nn.Module, optimizer: torch.optim.Optimizer, mem: dict, size: int, world_size: int,
                        zero_stage: int) -> list[str]:
    """Adds :func:`expert_memory` to ``mem`` (the run's memory record) and returns its start-up line
    (nothing for a dense model)."""
    if not moe_layers(model):
        return []
    mem.update(expert_memory(model, optimizer, size, world_size, zero_stage))
    mib = 2.0 ** 20
    return [f"memory per rank: routed experts {mem['expert_params_per_rank']:,} params = "
            f"{mem['expert_bytes_per_rank'] / mib:.2f} MiB fp32, their optimizer state "
            f"{mem['expert_optimizer_state_bytes_per_rank'] / mib:.2f} MiB (parallel.expert={mem['expert_parallel']}, "
            f"{world_size} ranks)"]
