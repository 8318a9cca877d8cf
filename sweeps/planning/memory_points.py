"""Points of an "infinite memory" sweep: a fixed MoE backbone with growing Engram tables."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from memory.config import EngramConfig
from memory.sizing import solve_table_sizes
from sweeps.planning.backbone import measure, select_backbone
from sweeps.planning.families import Family
from sweeps.planning.runspec import RunSpec
from sweeps.planning.solver import solve_point


# ---- "infinite memory" sweeps -------------------------------------------------------------------
def solve_memory_points(family: Family, budget: float, slots: Sequence[int],
                        data_dir: Optional[str] = None) -> list[tuple[RunSpec, int]]:
    """Points of an "infinite memory" sweep: the budget's rho = 1 backbone (all its routed experts,
    the tokens of the rho = 1 run) plus the family's Engram with ``slots`` table rows in total (over
    layers, orders and heads; table parameters = slots x per-head memory dims). Only the memory
    grows: P_tot grows with it, and training FLOPs stay those of rho = 1 plus the Engram projections.
    Returns (spec, exact slots of the prime-sized tables) per requested slot count, ascending."""
    slots = [int(s) for s in slots]
    if not slots or min(slots) <= 0 or len(set(slots)) != len(slots):
        raise ValueError(f"slots must be distinct positive integers, got {slots}")
    backbone, _ = select_backbone(family, float(budget))
    base = solve_point(family, backbone, float(budget), 1.0, data_dir=data_dir)
    probe = EngramConfig.from_dict({**family.rung_engram(backbone.rung), "table_params": 1})
    engram, head_dim = probe.to_dict(), probe.head_dim
    out = []
    for s in sorted(slots):
        sizes, exact = solve_table_sizes(s * head_dim, replace(probe, tokenizer=None, pad_id=None))
        model = {**base.model, "engram": {**engram, "table_sizes": [int(b) for b in sizes], "table_params": None}}
        m = measure(model, base.seq_len)
        spec = replace(base, model=model, total_params=m.total, active_params=m.active,
                       embedding_params=m.counts.embedding_params, head_params=m.counts.head_params,
                       engram_params=m.table_params, engram_dense_params=m.total - m.table_params - base.total_params,
                       forward_flops_per_token=m.forward_flops,
                       flops_drift=m.train_flops / (3.0 * base.forward_flops_per_token) - 1.0,
                       total_params_error=m.total / base.total_params - 1.0,
                       active_params_error=m.active / base.active_params - 1.0,
                       # the experts' share of P_sparse falls as the tables join it
                       rho_effective=base.rho_effective * (base.total_params - base.active_params)
                       / (m.total - m.active))
        out.append((spec, int(exact // head_dim)))
    if len({n for _, n in out}) != len(out):
        raise ValueError(f"slot counts {slots} round to the same prime-sized tables; space them further apart")
    return out
