"""Optimizer groups declared by the module that owns each parameter, never guessed from its shape.

Every module that creates a parameter tags it at construction with :func:`tag` and one of
:data:`GROUPS`. A parameter without a tag is an error (:func:`group_of` raises), so a new module
cannot slip its weights into whatever group their shape happens to suggest: the shape rule this
replaces put Engram's [G, d] norm gains under weight decay, a bias against every Engram run.
The trainer maps group names to optimizer, lr multiplier and weight decay (``optim.groups``).
"""
from __future__ import annotations

import torch
from torch import nn

_ATTR = "_optim_group"

# What a parameter is -> the group it is optimised in. The optimizer configs (conf/optim/*.yaml)
# must give every one of these an entry.
GROUPS = {
    "matrix": "hidden 2-D weight of the backbone (attention projections, dense SwiGLU)",
    "experts": "MoE expert weights: routed [E, out, in] and shared SwiGLU",
    "router": "MoE router gate [E, d]",
    "embed": "token embedding",
    "head": "output head",
    "norm": "RMSNorm gains (backbone and Engram)",
    "bias": "additive biases",
    "engram_proj": "Engram key / value projection weights",
    "engram_conv": "Engram depthwise short-conv kernel",
    "engram_tables": "Engram hashed n-gram tables",
    "residual_mix": "multi-branch residual (hyper-connection) mixing weights",
}


class UndeclaredParameter(ValueError):
    """A trainable parameter whose owning module did not declare its optimizer group."""


def tag(param: torch.nn.Parameter, group: str) -> torch.nn.Parameter:
    """Declare ``param``'s optimizer group (call it in the module that creates the parameter)."""
    if group not in GROUPS:
        raise ValueError(f"unknown optimizer group {group!r}; declared groups: {sorted(GROUPS)}")
    setattr(param, _ATTR, group)
    return param


def tag_module(module: nn.Module, **groups: str) -> nn.Module:
    """``tag_module(lin, weight="matrix", bias="bias")``: tag a child module's own parameters;
    a name given for a parameter the module does not have (e.g. a disabled bias) is skipped."""
    for name, group in groups.items():
        p = getattr(module, name, None)
        if p is not None:
            tag(p, group)
    return module


def group_of(param: torch.nn.Parameter, name: str = "<unnamed>") -> str:
    group = getattr(param, _ATTR, None)
    if group is None:
        raise UndeclaredParameter(
            f"parameter {name} {tuple(param.shape)} has no declared optimizer group: tag it with "
            f"core.param_groups.tag(param, group) in the module that creates it (groups: {sorted(GROUPS)})")
    return group


def grouped_parameters(model: nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """Trainable parameters by declared group, each with its qualified name."""
    groups: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(group_of(p, name), []).append((name, p))
    return groups


def owner_path(model: nn.Module, name: str) -> str:
    """Where a parameter lives, by module type: ``Transformer>Block>Engram>BranchRMSNorm:weight``.

    The chain lists the project's own module classes from the root down; torch built-ins
    (nn.Linear, nn.ModuleList...) stay in the attribute path after the colon. Layer indices are
    dropped, so the key is the same for every layer (what the group table in the tests lists).
    """
    parts = name.split(".")
    chain, rest, module = [type(model).__name__], [], model
    for part in parts[:-1]:
        module = getattr(module, part)
        if isinstance(module, nn.ModuleList):
            continue
        if type(module).__module__.startswith("torch."):
            rest.append(part)
        else:
            chain.append(type(module).__name__)
            rest = []
    return ">".join(chain) + ":" + ".".join(rest + parts[-1:])
