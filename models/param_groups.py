"""Optimizer-group tags carried by parameters themselves.

A module that wants its parameters optimised differently (MoE experts, Engram tables) tags them
at construction with :func:`tag`. Untagged parameters fall into ``decay`` (matrices) or
``no_decay`` (vectors: norms, biases, gates' scalars). The trainer maps group names to
(lr multiplier, weight decay) from the ``optim.groups`` config.
"""
from __future__ import annotations

import torch

_ATTR = "_optim_group"
DEFAULT_GROUPS = ("decay", "no_decay")


def tag(param: torch.nn.Parameter, group: str) -> torch.nn.Parameter:
    setattr(param, _ATTR, group)
    return param


def group_of(param: torch.nn.Parameter) -> str:
    explicit = getattr(param, _ATTR, None)
    if explicit is not None:
        return explicit
    return "decay" if param.ndim >= 2 else "no_decay"


def grouped_parameters(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Trainable parameters by group, each with its qualified name (for logging only)."""
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(group_of(p), []).append((name, p))
    return groups
