"""Which family a budget belongs to, so that ``make sweep BUDGET=1e20`` needs no ``FAMILY``.

Families are tried from the smallest scale up (cpu, gpu, paper, then any other in name order); the
first whose budget range holds the budget wins. A family's range is the solver's (its rungs and its
tokens-per-active-parameter rule, :func:`sweeps.planning.budget.select_backbone`), so nothing here re-derives
budget math: a budget outside every range gets each family's own refusal in the message.
"""
from __future__ import annotations

from typing import Optional, Sequence

from sweeps.planning.budget import select_backbone
from sweeps.planning.families import available_families, load_family

SCALE_ORDER = ("cpu", "gpu", "paper")


def family_for_budget(budget: float) -> str:
    """The name of the first family (by scale) that plans ``budget``; ValueError naming all refusals."""
    names = [n for n in SCALE_ORDER if n in available_families()]
    names += [n for n in available_families() if n not in SCALE_ORDER]
    refusals = []
    for name in names:
        try:
            select_backbone(load_family(name), budget)
        except ValueError as e:
            refusals.append(f"{name}: {str(e).splitlines()[0]}")
            continue
        return name
    raise ValueError(f"no family plans a budget of {budget:.3g} FLOPs; pass --family. " + " | ".join(refusals))


AUTO = "auto"


def resolve_family(name: str, budgets: Sequence[float]) -> tuple[str, Optional[str]]:
    """``name``, or for ``auto`` the family that holds every budget, with a line saying which and why."""
    if name != AUTO:
        return name, None
    picks = {b: family_for_budget(b) for b in budgets}
    if len(set(picks.values())) > 1:
        found = ", ".join(f"{b:g} -> {f}" for b, f in picks.items())
        raise ValueError(f"the budgets lie in different families ({found}): run them separately or pass --family")
    family = next(iter(picks.values()))
    return family, (f"family {family} (auto: the first family, by scale, whose budget range holds "
                    f"{', '.join(f'{b:g}' for b in budgets)} FLOPs; pass --family to choose)")
