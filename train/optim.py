"""The optimizer, built from the groups the model's modules declare (core/param_groups.py).

``optim.kind=adamw``: one torch AdamW over the declared groups (each with its lr multiplier and
weight decay). ``optim.kind=muon`` (conf/optim/muon.yaml, the paper family's default): groups with
``muon: true`` (backbone matrices, experts, Engram projections) get Muon, every other group AdamW
(the Engram tables at 5x lr and no weight decay: Adam); see train/muon_optimizer.py for the update, the lr
mapping and the DeepSpeed ZeRO path. ``optim.table_update=lazy`` leaves Engram table entries that no
token looked up this step untouched (weights and Adam moments); ``dense`` (default) moves them all.
"""
from __future__ import annotations

from collections import Counter
from typing import Mapping

import torch

from core.param_groups import GROUPS, grouped_parameters, owner_path
from train.muon import matrix_shape, muon_shape_factor, zero_lr_scale
from rundir.schema import OptimConfig

TABLE_GROUP = "engram_tables"
STATE_FLOATS = {"muon": 1, "adamw": 2}  # fp32 state tensors per parameter: momentum | exp_avg, exp_avg_sq


def _check_groups(optim: OptimConfig) -> None:
    """Group names are the model side's (core/param_groups.py): keys, types and values were checked by
    the schema (rundir/schema.py)."""
    unknown = sorted(set(optim.groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"optim.groups has entries for undeclared groups {unknown} (declared: {sorted(GROUPS)})")


def _owners(model: torch.nn.Module, names: list[str]) -> str:
    """``RMSNorm x9, BranchRMSNorm x3``: how many modules of each type own a group's parameters."""
    owners: dict[str, str] = {}  # owning module's dotted path -> its type
    for n in names:
        chain, attr = owner_path(model, n).split(":")
        parts = n.split(".")
        owners[".".join(parts[:len(parts) - len(attr.split("."))])] = chain.split(">")[-1]
    c = Counter(owners.values())
    return ", ".join(f"{t} x{k}" for t, k in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def _split_expert_parallel(named: list) -> list[tuple[list, dict]]:
    """A declared group's parameters split into the replicated ones and the expert-parallel ones
    (train/expert_parallel.py marks them); the latter form DeepSpeed MoE groups, which ZeRO reduces and
    partitions over the expert-data-parallel ranks: ``moe: True`` and ``name`` = the DeepSpeed group name."""
    plain = [(n, p) for n, p in named if getattr(p, "allreduce", True) is not False]
    sharded = [(n, p) for n, p in named if getattr(p, "allreduce", True) is False]
    out = [(plain, {})] if plain else []
    for group_name in sorted({p.group_name for _, p in sharded}):
        out.append(([(n, p) for n, p in sharded if p.group_name == group_name], {"moe": True, "ep_group": group_name}))
    return out


def param_groups(model: torch.nn.Module, optim: OptimConfig) -> list[dict]:
    """Optimizer param groups: one per declared group (and per expert-parallel layout); Muon ones split by
    matrix shape."""
    kind, muon, lazy_tables = optim.kind, optim.muon, optim.table_update == "lazy"
    out = []
    for name, all_named in sorted(grouped_parameters(model).items()):
        if name not in optim.groups:
            raise ValueError(f"parameters tagged '{name}' have no optim.groups.{name} entry "
                             f"(configured: {sorted(optim.groups)})")
        g = optim.groups[name]
        base = {"lr_mult": g.lr_mult, "lr": optim.lr * g.lr_mult, "weight_decay": g.weight_decay}
        for named, ep in _split_expert_parallel(all_named):
            label = f"{name}@{ep['ep_group']}" if ep else name
            if kind == "muon" and g.muon:
                by_shape: dict[tuple[int, int], list] = {}
                for n, p in named:
                    by_shape.setdefault(matrix_shape(p), []).append((n, p))
                for shape, items in sorted(by_shape.items()):
                    for _, p in items:
                        p.use_muon = True  # DeepSpeed's ZeRO 1/2 orthogonalise what carries this flag
                    out.append({**base, **_named(f"{label}[{shape[0]}x{shape[1]}]", ep),
                                "params": [p for _, p in items],
                                "owners": _owners(model, [n for n, _ in items]), "use_muon": True,
                                "momentum": muon.momentum, "adjust_lr_fn": muon.adjust_lr_fn,
                                "shape_factor": muon_shape_factor(shape, muon.adjust_lr_fn),
                                "zero_lr_scale": zero_lr_scale(shape, muon.adjust_lr_fn)})
            else:
                for _, p in named:
                    p.use_muon = False
                out.append({**base, **_named(label, ep), "params": [p for _, p in named],
                            "owners": _owners(model, [n for n, _ in named]), "use_muon": False,
                            "betas": tuple(optim.betas), "eps": optim.eps,
                            "lazy": lazy_tables and name == TABLE_GROUP})
    return out


def _named(label: str, ep: dict) -> dict:
    """A group's ``name`` is its label, except for expert-parallel groups: DeepSpeed's ZeRO looks their
    process group up by ``name``, so it is the DeepSpeed group name and the label moves to ``label``."""
    return {"name": ep["ep_group"], "label": label, "moe": True} if ep else {"name": label}


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW (kind=adamw, dense tables) or :class:`train.muon_optimizer.MuonAdamW` (Muon and/or lazy tables).

    A declared group missing from ``optim.groups`` is an error (a new module's parameters are
    never silently mis-optimised), as is an undeclared parameter (core.param_groups). What the
    Muon path supports under each precision / ZeRO stage is checked with the config (rundir/schema.py).
    """
    _check_groups(optim)
    groups = param_groups(model, optim)
    if not any(g["use_muon"] or g["lazy"] for g in groups):
        return torch.optim.AdamW(groups, lr=optim.lr, betas=groups[0]["betas"], eps=groups[0]["eps"])
    from train.muon_optimizer import MuonAdamW  # only here: its DeepSpeed base imports torch's compiler stack

    return MuonAdamW(groups)


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    lr = base_lr * factor
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr


def _kind(g: Mapping) -> str:
    if g.get("use_muon"):
        return "muon"
    return ("adam" if g["weight_decay"] == 0 else "adamw") + ("(lazy)" if g.get("lazy") else "")


def describe_optimizer(optimizer: torch.optim.Optimizer) -> list[str]:
    """One start-up line per optimizer group: name, optimizer, lr, weight decay, parameter count.

    Call it before the DeepSpeed engine is built (ZeRO 1/2 replace the groups' parameters by flat
    partitions). Muon lrs are the configured lr; each matrix moves by lr x the shape factor shown.
    """
    lines = []
    for g in optimizer.param_groups:
        n = sum(p.numel() for p in g["params"])
        extra = f"  lr x{g['shape_factor']:.3g} per matrix ({g['adjust_lr_fn']})" if g.get("use_muon") else ""
        label = g.get("label", g["name"])
        lines.append(f"optim group {label:<22} {_kind(g):<11} lr {g['lr']:.3g}  wd {g['weight_decay']:g}  "
                     f"params {n:,}  [{g.get('owners', '')}]{extra}")
    return lines


def optimizer_memory(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Engram table size and optimizer-state size (fp32 state, all ranks together: ZeRO 1/2 divide
    the state by the data-parallel size). Call before the engine is built, like the lines above."""
    table = sum(p.numel() for g in optimizer.param_groups if g["name"] == TABLE_GROUP for p in g["params"])
    state = {"muon": 0, "adamw": 0}
    for g in optimizer.param_groups:
        state["muon" if g.get("use_muon") else "adamw"] += sum(p.numel() for p in g["params"])
    floats = sum(STATE_FLOATS[k] * n for k, n in state.items())
    return {"table_params": table, "table_bytes_fp32": 4 * table, "table_optimizer_state_bytes": 4 * 2 * table,
            "optimizer_state_bytes": 4 * floats}


def memory_line(mem: Mapping[str, int]) -> str:
    mib = 2.0 ** 20
    if mem.get("engram_tables") == "sharded":  # train/shards.py: this rank's rows only
        world, full = mem["world_size"], mem["table_params_replicated"]
        return (f"memory per rank: Engram tables sharded over {world} ranks: {mem['table_params']:,} params = "
                f"{mem['table_bytes_fp32'] / mib:.2f} MiB fp32 (+{mem['table_optimizer_state_bytes'] / mib:.2f} MiB "
                f"Adam state), {mem['table_params'] / max(full, 1):.3f} of the replicated {full:,} params "
                f"({4 * full / mib:.2f} MiB + {8 * full / mib:.2f} MiB)")
    return (f"memory: Engram tables {mem['table_params']:,} params = {mem['table_bytes_fp32'] / mib:.1f} MiB fp32 "
            f"(+{mem['table_optimizer_state_bytes'] / mib:.1f} MiB Adam state); optimizer state "
            f"{mem['optimizer_state_bytes'] / mib:.1f} MiB in all (fp32, summed over ZeRO shards)")
