"""AdamW over named parameter groups (each with its own lr multiplier and weight decay)."""
from __future__ import annotations

from typing import Mapping

import torch

from models.param_groups import grouped_parameters


def build_optimizer(model: torch.nn.Module, optim_cfg: Mapping) -> torch.optim.Optimizer:
    """One torch AdamW whose param groups come from the parameters' own group tags.

    ``optim_cfg.groups.<name>`` gives ``lr_mult`` and ``weight_decay``; a tagged group missing
    from the config is an error (so a new module's parameters are never silently mis-optimised).
    """
    groups_cfg = optim_cfg.get("groups") or {}
    param_groups = []
    for name, named in sorted(grouped_parameters(model).items()):
        if name not in groups_cfg:
            raise ValueError(f"parameters tagged '{name}' have no optim.groups.{name} entry "
                             f"(configured: {sorted(groups_cfg)})")
        g = groups_cfg[name]
        param_groups.append({
            "params": [p for _, p in named],
            "name": name,
            "lr_mult": float(g.get("lr_mult", 1.0)),
            "weight_decay": float(g.get("weight_decay", optim_cfg.get("weight_decay", 0.0))),
            "lr": float(optim_cfg["lr"]) * float(g.get("lr_mult", 1.0)),
        })
    return torch.optim.AdamW(param_groups, lr=float(optim_cfg["lr"]), betas=tuple(optim_cfg["betas"]),
                             eps=float(optim_cfg.get("eps", 1e-8)))


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> float:
    lr = base_lr * factor
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return lr
