"""Steps 1 and 2 of the budget solver (see :mod:`sweeps.planning.budget`): counting models built on the meta
device, the rho = 1 backbone of each rung, the rung for a budget, and the routed experts kept at rho."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from assembly import build_model
from core.accounting import ModelCounts
from models import ModelConfig
from models.moe import MoEConfig
from sweeps.planning.families import Family


# ---- counting instantiated models ----------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """Counts of one model built on the meta device."""

    counts: ModelCounts
    table_params: int  # Engram table parameters over all layers (0 without Engram)

    @property
    def total(self) -> int:
        return self.counts.total_params

    @property
    def active(self) -> int:
        return self.counts.active_params

    @property
    def forward_flops(self) -> float:
        return self.counts.flops_per_token

    @property
    def train_flops(self) -> float:
        return self.counts.train_flops_per_token


def for_counting(model: Mapping[str, Any]) -> dict:
    """The config with Engram on identity compression: table sizes and counts do not depend on the
    tokenizer, and counting must not load one."""
    model = dict(model)
    if model.get("engram") is not None:
        model["engram"] = {**model["engram"], "tokenizer": None, "pad_id": None}
    return model


def measure(model: Mapping[str, Any], seq_len: int) -> Measured:
    """Build the model of ``model`` on the meta device (assembly.build_model) and read its counts."""
    cfg = ModelConfig.from_dict(for_counting(model))
    with torch.device("meta"):
        net = build_model(cfg)
    tables = sum(int(blk.memory.table_params) for blk in net.layers if blk.memory is not None)
    return Measured(net.model_counts(seq_len), tables)


# ---- step 1: the rho = 1 backbone of a rung --------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    """A rung's rho = 1 (pure MoE) model with its expert count solved for the family's sparsity."""

    rung: int
    name: str
    model: dict  # full ModelConfig mapping, moe included, engram None
    measured: Measured
    top_k: int
    n_routed: int
    expert_sparse_params: int  # P_sparse added by one more routed expert (its weights in all MoE layers)

    @property
    def inactive_experts(self) -> int:
        return self.n_routed - self.top_k

    def tokens_per_active_param(self, budget: float) -> float:
        return budget / self.measured.train_flops / self.measured.active


def moe_model(family: Family, rung: int, n_routed: int) -> dict:
    """Every ModelConfig / MoEConfig field spelled out (runs do not depend on config defaults)."""
    moe = MoEConfig.from_dict({**family.rung_moe(rung), "n_routed_experts": int(n_routed)}).to_dict()
    return ModelConfig.from_dict({**family.rung_model(rung), "moe": moe, "engram": None}).to_dict()


def round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def solve_backbone(family: Family, rung: int, ep_size: int = 1, round_experts_to_ep: bool = False) -> Backbone:
    """Expert count of rung ``rung`` at rho = 1: P_tot / P_act closest to ``family.sparsity``
    (a multiple of ``ep_size`` when ``round_experts_to_ep``; divisibility of the counts actually run
    is checked per rho by :func:`experts_for_rho`)."""
    name = family.rungs[rung].name
    k = int(family.rung_moe(rung)["top_k"])
    m1, m2 = (measure(moe_model(family, rung, n), family.seq_len) for n in (k + 1, k + 2))
    d_tot, d_act = m2.total - m1.total, m2.active - m1.active
    d_sparse = d_tot - d_act
    if d_sparse <= 0:
        raise ValueError(f"family {family.name}, rung {name}: adding a routed expert adds no inactive parameters "
                         f"(does the rung have any MoE layer?)")
    s = family.sparsity
    # P_tot(n) = a + d_tot n, P_act(n) = c + d_act n; solve P_tot / P_act = s for n.
    a, c = m1.total - (k + 1) * d_tot, m1.active - (k + 1) * d_act
    denom = d_tot - s * d_act
    n_star = (s * c - a) / denom if denom > 0 else math.inf
    if not math.isfinite(n_star) or n_star > 1e6:
        raise ValueError(f"family {family.name}, rung {name}: sparsity {s} is out of reach (router columns "
                         f"grow P_act as fast as experts grow P_tot)")
    step = ep_size if round_experts_to_ep else 1
    lowest = step * math.ceil((k + 1) / step)
    candidates = sorted({max(lowest, step * math.floor(n_star / step)), max(lowest, step * math.ceil(n_star / step))})
    best = None
    for n in candidates:
        m = measure(moe_model(family, rung, n), family.seq_len)
        err = abs(math.log(m.total / m.active / s))
        if best is None or err < best[0]:
            best = (err, n, m)
    _, n1, m = best
    return Backbone(rung, name, moe_model(family, rung, n1), m, k, n1, d_sparse)


def select_backbone(family: Family, budget: float, ep_size: int = 1,
                    round_experts_to_ep: bool = False) -> tuple[Backbone, list[Backbone]]:
    """The rung for ``budget`` (tokens per active parameter closest to the rule) and all rungs."""
    rule = family.budget_rule
    backbones = [solve_backbone(family, i, ep_size, round_experts_to_ep) for i in range(len(family.rungs))]
    by_size = sorted(backbones, key=lambda b: b.measured.active)
    smallest, largest = by_size[0], by_size[-1]
    if smallest.tokens_per_active_param(budget) < rule.min_tokens_per_active_param:
        need = rule.min_tokens_per_active_param * smallest.measured.active * smallest.measured.train_flops
        raise ValueError(f"budget {budget:.3g} FLOPs is below family {family.name}'s smallest model (rung "
                         f"{smallest.name}, {smallest.measured.active / 1e6:.3g}M active params would see "
                         f"{smallest.tokens_per_active_param(budget):.3g} tokens per active param, minimum "
                         f"{rule.min_tokens_per_active_param:g}); use a budget >= {need:.3g}")
    if largest.tokens_per_active_param(budget) > rule.max_tokens_per_active_param:
        most = rule.max_tokens_per_active_param * largest.measured.active * largest.measured.train_flops
        raise ValueError(f"budget {budget:.3g} FLOPs is above family {family.name}'s largest model (rung "
                         f"{largest.name} would see {largest.tokens_per_active_param(budget):.3g} tokens per "
                         f"active param, maximum {rule.max_tokens_per_active_param:g}); use a budget <= {most:.3g}")
    target = math.log(rule.tokens_per_active_param)
    chosen = min(backbones, key=lambda b: abs(math.log(b.tokens_per_active_param(budget)) - target))
    return chosen, backbones


# ---- step 2: experts per rho --------------------------------------------------------------------
def experts_for_rho(n_routed: int, top_k: int, rho: float, ep_size: int = 1, round_to_ep: bool = False) -> int:
    """Routed experts kept at ``rho``: k + round(rho (N_1 - k)); a multiple of ep_size, or an error."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    ideal = top_k + rho * (n_routed - top_k)
    if not round_to_ep:
        n = top_k + round_half_up(rho * (n_routed - top_k))
        if n % ep_size:
            raise ValueError(f"rho={rho:g} keeps {n} routed experts, not divisible by expert-parallel size "
                             f"{ep_size} (pass round_experts_to_ep / --round-experts-to-ep to round)")
        return n
    n = ep_size * round_half_up(ideal / ep_size)
    return min(max(n, ep_size * math.ceil(top_k / ep_size)), n_routed)
