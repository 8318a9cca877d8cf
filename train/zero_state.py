"""Whole, name-keyed fp32 masters and optimizer state of a ZeRO 1/2 engine, read and written through
DeepSpeed's parameter-to-partition map (``param._hp_mapping``).

ZeRO 1/2 keep each parameter group's fp32 master and optimizer state as one flat partition per rank of
the group's data-parallel group (for expert groups: the ranks holding the same experts), so their files
fit only the layout (EP size, world size) that wrote them. Whole tensors by parameter name fit any
layout: an expert-parallel checkpoint carries them (train/expert_checkpoint.py), and a resume at another
EP or world size deals them back into this engine's partitions.

A parameter's fragment in this rank's partition: ``lp_fragment_address`` (where it starts in the flattened
parameter, how many elements) and ``hp_fragment_address`` (where it sits in the flat partition); a
parameter outside this rank's partition has ``_hp_mapping`` None. Optimizer state entries shaped like the
partition (Adam's moments, Muon's momentum) are split the same way; other entries (``step``) are scalars
shared by the group.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn


class NotReshardable(RuntimeError):
    """An optimizer state entry that is neither partition-shaped nor a scalar: no whole form to write."""


def _groups(zero_opt) -> dict[int, int]:
    """id(parameter) -> index of its ZeRO parameter group (and flat partition)."""
    return {id(p): i for i, group in enumerate(zero_opt.bit16_groups) for p in group}


def _split_state(zero_opt, i: int) -> tuple[list[str], dict]:
    """Group ``i``'s partition-shaped state keys and its other (scalar) entries."""
    flat = zero_opt.single_partition_of_fp32_groups[i]
    base = zero_opt.optimizer.state.get(flat, {})
    keys = sorted(k for k, v in base.items() if torch.is_tensor(v) and v.shape == flat.shape)
    other = {k: v for k, v in base.items() if k not in keys}
    bad = [k for k, v in other.items() if torch.is_tensor(v) and v.numel() > 1]
    if bad:
        raise NotReshardable(f"optimizer state {bad} is not split like the ZeRO partition")
    return keys, {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in other.items()}


def _whole(p: nn.Parameter, part: torch.Tensor) -> torch.Tensor:
    """The whole fp32 tensor of parameter ``p`` from each rank's fragment of ``part`` (a flat partition or
    a partition-shaped state entry): a sum over the parameter's data-parallel group (collective)."""
    buf = torch.zeros(p.numel(), dtype=torch.float32, device=part.device)
    m = p._hp_mapping
    if m is not None:
        lp, hp = m.lp_fragment_address, m.hp_fragment_address
        buf.narrow(0, lp.start, lp.numel).copy_(part.narrow(0, hp.start, hp.numel))
    if dist.is_initialized() and dist.get_world_size(p._dp_group) > 1:
        dist.all_reduce(buf, group=p._dp_group)
    return buf.view(p.shape)


def gather_named(zero_opt, named: list[tuple[str, nn.Parameter]],
                 keep: Callable[[str], bool]) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """(fp32 master, optimizer state) by name, whole, for the names ``keep`` accepts (CPU copies).

    Collective: every rank calls it with the same ``named`` in the same order (each parameter is summed
    over its own data-parallel group). State keys come from the group's base optimizer state, empty
    before the first step."""
    groups = _groups(zero_opt)
    split = {i: _split_state(zero_opt, i) for i in sorted(set(groups.values()))}
    fp32, state = {}, {}
    for name, p in named:
        if id(p) not in groups:
            continue
        i = groups[id(p)]
        keys, scalars = split[i]
        flat = zero_opt.single_partition_of_fp32_groups[i]
        base = zero_opt.optimizer.state.get(flat, {})
        master = _whole(p, flat)
        entries = {k: _whole(p, base[k]) for k in keys}
        if keep(name):
            fp32[name] = master.cpu()
            state[name] = {**{k: v.cpu() for k, v in entries.items()}, **scalars}
    return fp32, state


def scatter_named(zero_opt, named: list[tuple[str, nn.Parameter]], fp32: dict[str, torch.Tensor],
                  state: dict[str, dict]) -> None:
    """Write whole tensors by name into this rank's partitions: every group's fp32 master, and its base
    optimizer state when ``state`` has any (scalars such as ``step`` from the group's first parameter).
    Local (no collective); each name in ``named`` that ZeRO holds must be in ``fp32``."""
    groups = _groups(zero_opt)
    members: dict[int, list[tuple[str, nn.Parameter]]] = {}
    for name, p in named:
        if id(p) in groups:
            members.setdefault(groups[id(p)], []).append((name, p))
    with torch.no_grad():
        for i, params in sorted(members.items()):
            flat = zero_opt.single_partition_of_fp32_groups[i]
            first = state.get(params[0][0], {})
            keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.shape == params[0][1].shape)
            base = {k: torch.zeros_like(flat) for k in keys}
            for name, p in params:
                m = p._hp_mapping
                if m is None:
                    continue
                lp, hp = m.lp_fragment_address, m.hp_fragment_address
                flat.narrow(0, hp.start, hp.numel).copy_(fp32[name].reshape(-1).narrow(0, lp.start, lp.numel))
                for k in keys:
                    src = state[name][k].reshape(-1).narrow(0, lp.start, lp.numel)
                    base[k].narrow(0, hp.start, hp.numel).copy_(src)
            if keys:
                scalars = {k: v.clone() if torch.is_tensor(v) else v for k, v in first.items() if k not in keys}
                zero_opt.optimizer.state[flat] = {**base, **scalars}
