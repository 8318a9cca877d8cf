"""ZeRO 1/2 fp32 masters and optimizer state as fragments of whole tensors by parameter name, so that a
checkpoint written under one partition layout (EP size, world size) loads under another.

ZeRO 1/2 keep each parameter group's fp32 master and optimizer state as one flat partition per rank of
the group's data-parallel group (for expert groups: the ranks holding the same experts), so DeepSpeed's
own files fit only the layout that wrote them. In their place (train/expert_checkpoint.py) every rank
writes what its partition holds as fragments: for each parameter it holds a piece of, where that piece
starts in the whole tensor flattened (routed experts: in the tensor of all experts, so ``offset`` = EP
rank x local size), its fp32 master and its partition-shaped optimizer state (Adam's moments), plus the
group's scalars (``step``). DeepSpeed's Muon keeps its momentum per whole parameter instead: one buffer of
the whole tensors of every parameter with a piece in the partition, in partition order (a parameter
split between two ranks has its momentum on both); each such parameter's momentum is written whole, at
the same offset. No collective and no whole tensor beyond those anywhere at save: each rank writes what
DeepSpeed would write for it. A resume, at the saved layout or another, reads every fragment file
(memory-mapped: only the pieces it needs are read) and copies each overlap into its own partitions.

DeepSpeed's map from a parameter to its piece of a partition is ``param._hp_mapping``:
``lp_fragment_address`` (start and length in the flattened parameter) and ``hp_fragment_address``
(start in the flat partition); a parameter outside this rank's partition has ``_hp_mapping`` None.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

FRAGMENTS = "zero_fragments_rank{rank:05d}.pt"


class NotReshardable(RuntimeError):
    """An optimizer state entry that is neither partition-shaped, nor Muon's per-parameter momentum, nor a
    scalar: no fragment form to write."""


def _flats(zero_opt) -> list[torch.Tensor]:
    """Each parameter group's flat fp32 partition on this rank. Two DeepSpeed optimizers: ZeRO 1/2's
    (``single_partition_of_fp32_groups``) and, for bf16 at ZeRO 1 with fp32 gradient accumulation,
    BF16_Optimizer (``fp32_groups_flat_partition``)."""
    if hasattr(zero_opt, "single_partition_of_fp32_groups"):
        return zero_opt.single_partition_of_fp32_groups
    return zero_opt.fp32_groups_flat_partition


def _groups(zero_opt) -> dict[int, int]:
    """id(parameter) -> index of its ZeRO parameter group (and flat partition)."""
    groups = zero_opt.bit16_groups if hasattr(zero_opt, "bit16_groups") else zero_opt.bf16_groups
    return {id(p): i for i, group in enumerate(groups) for p in group}


MUON_MOMENTUM = "momentum_buffer"  # DeepSpeed's Muon at ZeRO 1/2 (stage_1_and_2._muon_momentum_buffer)


def _whole_layout(zero_opt, i: int) -> Optional[tuple[dict[int, int], int]]:
    """Group ``i``'s Muon momentum buffer layout: (id(parameter) -> offset of its whole tensor, buffer size),
    the group's parameters with a piece in this rank's partition, whole, in order; None without one."""
    members = getattr(zero_opt, "params_in_partition", None)
    if members is None or not members[i] or not zero_opt._is_muon_group(members[i]):
        return None
    offsets, at = {}, 0
    for p in members[i]:
        offsets[id(p)] = at
        at += p.numel()
    return offsets, at


def _split_state(zero_opt, i: int) -> tuple[list[str], list[str], dict]:
    """Group ``i``'s partition-shaped state keys, its whole-parameter keys (Muon's momentum) and its other
    (scalar) entries."""
    flat = _flats(zero_opt)[i]
    base = zero_opt.optimizer.state.get(flat, {})
    whole = [MUON_MOMENTUM] if MUON_MOMENTUM in base and _whole_layout(zero_opt, i) is not None else []
    keys = sorted(k for k, v in base.items() if torch.is_tensor(v) and v.shape == flat.shape and k not in whole)
    other = {k: v for k, v in base.items() if k not in keys and k not in whole}
    bad = [k for k, v in other.items() if torch.is_tensor(v) and v.numel() > 1]
    if bad:
        raise NotReshardable(f"optimizer state {bad} is not split like the ZeRO partition")
    return keys, whole, {k: v.detach().clone().cpu() if torch.is_tensor(v) else v for k, v in other.items()}


def agreed_split(zero_opt) -> dict[int, tuple[list[str], list[str], dict]]:
    """:func:`_split_state` of every group, or NotReshardable on every rank when any rank cannot split its
    state (one flag all-reduced: the ranks agree on what the checkpoint records)."""
    why, split = "", {}
    try:
        split = {i: _split_state(zero_opt, i) for i in range(len(_flats(zero_opt)))}
    except NotReshardable as e:
        why = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0.0 if why else 1.0], device=_flats(zero_opt)[0].device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        if flag.item() < 1.0 and not why:
            why = "another rank's optimizer state is not split like the ZeRO partition"
    if why:
        raise NotReshardable(why)
    return split


def _held(zero_opt, named: list[tuple[str, nn.Parameter]]):
    """(name, parameter, group index, lp address, hp address) of every parameter with a piece in this
    rank's partitions."""
    groups = _groups(zero_opt)
    for name, p in named:
        m = getattr(p, "_hp_mapping", None)
        if id(p) in groups and m is not None:
            yield name, p, groups[id(p)], m.lp_fragment_address, m.hp_fragment_address


def save_fragments(zero_opt, named: list[tuple[str, nn.Parameter]], offset: Callable[[str, nn.Parameter], int],
                   tag_dir: Path, rank: int, split: dict) -> None:
    """Write this rank's fragment file. ``offset(name, p)``: where ``p``'s elements start in the whole
    tensor of that name (0 but for expert-parallel experts); ``split``: :func:`agreed_split`'s answer."""
    flats = _flats(zero_opt)
    wholes = {i: _whole_layout(zero_opt, i) for i in split if split[i][1]}
    out = {}
    for name, p, i, lp, hp in _held(zero_opt, named):
        keys, whole, scalars = split[i]
        base = zero_opt.optimizer.state.get(flats[i], {})
        out[name] = {"start": offset(name, p) + lp.start, "fp32": flats[i].narrow(0, hp.start, hp.numel).cpu().clone(),
                     "state": {k: base[k].narrow(0, hp.start, hp.numel).cpu().clone() for k in keys},
                     "scalars": scalars}
        if whole:  # the whole parameter's, which starts at offset(name, p) in the whole tensor of that name
            at = wholes[i][0][id(p)]
            out[name]["whole_start"] = offset(name, p)
            out[name]["whole"] = {k: base[k].narrow(0, at, p.numel()).cpu().clone() for k in whole}
    torch.save(out, Path(tag_dir) / FRAGMENTS.format(rank=rank))


def _fill_whole(saved: list[dict], name: str, p: nn.Parameter, lo: int, layout: tuple[dict[int, int], int],
                parts: dict, device: torch.device) -> None:
    """Parameter ``name``'s whole-parameter state (elements ``lo .. lo + numel`` of the whole tensor of that
    name) from the saved pieces into this group's buffers (``layout``: :func:`_whole_layout`). Pieces may
    repeat (a parameter split between two saving ranks): every element must be covered."""
    pieces = [frags[name] for frags in saved if name in frags and "whole" in frags[name]]
    if not pieces:
        return  # saved before the first step, or by an optimizer without such state
    seen, at, total = torch.zeros(p.numel(), dtype=torch.bool), layout[0][id(p)], layout[1]
    for f in pieces:
        n = next(iter(f["whole"].values())).numel()
        a, b = max(lo, f["whole_start"]), min(lo + p.numel(), f["whole_start"] + n)
        if a >= b:
            continue
        for k, v in f["whole"].items():
            buf = parts.setdefault(k, torch.zeros(total, dtype=v.dtype, device=device))
            buf.narrow(0, at + a - lo, b - a).copy_(v.narrow(0, a - f["whole_start"], b - a))
        seen[a - lo:b - lo] = True
    if not bool(seen.all()):
        raise NotReshardable(f"{name}: {int(seen.sum())} of its {p.numel()} momentum elements are in the fragment files")


def _load_all(tag_dir: Path, world: int, load) -> list[dict]:
    files = [Path(tag_dir) / FRAGMENTS.format(rank=r) for r in range(world)]
    missing = [f.name for f in files if not f.exists()]
    if missing:  # damage (a checkpoint that records fragments has one per saving rank): an older one may do
        raise FileNotFoundError(f"fragment files missing: {', '.join(missing[:3])}")
    return [load(str(f)) for f in files]


def load_fragments(zero_opt, named: list[tuple[str, nn.Parameter]], offset: Callable[[str, nn.Parameter], int],
                   tag_dir: Path, saved_world: int, load) -> None:
    """Fill this rank's fp32 partitions and optimizer state from the fragment files of a checkpoint saved
    on ``saved_world`` ranks (``load(path)``: a memory-mapped, weights-only torch.load). Local: no
    collective. Raises NotReshardable when a piece of some parameter is in no file."""
    saved, flats = _load_all(tag_dir, saved_world, load), _flats(zero_opt)
    state: dict[int, dict[str, torch.Tensor]] = {}  # group -> its partition-shaped state, filled piece by piece
    scalars: dict[int, dict] = {}  # group -> its scalar state (step), as saved
    wholes = {i: _whole_layout(zero_opt, i) for i in range(len(flats))}
    with torch.no_grad():
        for name, p, i, lp, hp in _held(zero_opt, named):
            if wholes[i] is not None:
                _fill_whole(saved, name, p, offset(name, p), wholes[i], state.setdefault(i, {}), flats[i].device)
            lo, covered = offset(name, p) + lp.start, 0
            for f in (frags[name] for frags in saved if name in frags):
                a, b = max(lo, f["start"]), min(lo + lp.numel, f["start"] + f["fp32"].numel())
                if a >= b:
                    continue
                dst, src = hp.start + a - lo, a - f["start"]
                flats[i].narrow(0, dst, b - a).copy_(f["fp32"].narrow(0, src, b - a))
                scalars.setdefault(i, f["scalars"])
                for k, v in f["state"].items():
                    if k == MUON_MOMENTUM and wholes[i] is not None:  # a file from before it was saved whole
                        raise NotReshardable(f"{name}: Muon's momentum was written partition-shaped (an older "
                                             f"checkpoint): it resumes at its saved layout only")
                    part = state.setdefault(i, {}).setdefault(k, torch.zeros_like(flats[i]))
                    part.narrow(0, dst, b - a).copy_(v.narrow(0, src, b - a))
                covered += b - a
            if covered != lp.numel:
                raise NotReshardable(f"{name}: {covered} of this rank's {lp.numel} elements are in the fragment "
                                     f"files of {saved_world} ranks")
    for i, parts in state.items():
        if not parts:  # saved before the first step: nothing to restore
            continue
        zero_opt.optimizer.state[flats[i]] = {**parts, **{k: v.clone() if torch.is_tensor(v) else v
                                                          for k, v in scalars[i].items()}}
