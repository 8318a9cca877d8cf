"""Steps 3 and 4 of the budget solver (see :mod:`sweeps.budget`): the run of one rho at a budget:
Engram tables sized from what the removed experts free, drift compensation, and the token solve."""
from __future__ import annotations

from typing import Optional, Sequence

from memory.config import EngramConfig
from memory.sizing import solve_table_sizes
from sweeps.backbone import Backbone, Measured, _moe_model, _round_half_up, experts_for_rho, measure
from sweeps.families import Family
from sweeps.runspec import RunSpec


# ---- steps 3 and 4: one rho ------------------------------------------------------------------------
def _full_engram(family: Family, rung: int) -> dict:
    """The rung's Engram mapping with every EngramConfig field, tables unset."""
    raw = family.rung_engram(rung)
    if not raw:
        raise ValueError(f"family {family.name} has no engram settings: rho < 1 needs Engram layers and widths")
    cfg = EngramConfig.from_any({**raw, "table_params": 1}).to_dict()
    cfg["table_params"] = None
    return cfg


def _with_tables(model: dict, engram: dict, base_sizes: Sequence[int]) -> dict:
    return {**model, "engram": {**engram, "table_sizes": [int(b) for b in base_sizes], "table_params": None}}


def _engram_probe(model: dict, engram: dict, seq_len: int) -> Measured:
    """The model with the smallest possible Engram tables (base size 2 per order)."""
    n_orders = int(engram["max_ngram"]) - 1
    return measure(_with_tables(model, engram, [2] * n_orders), seq_len)


def _narrow_memory_for_drift(engram: dict, moe_model: dict, base: Measured, tol: float, seq_len: int,
                             where: str) -> tuple[dict, Measured, Optional[int]]:
    """Compensation (b): the widest Engram memory (embed_dim_per_ngram, in steps of heads_per_ngram)
    whose model keeps |FLOPs per token / rho=1 - 1| <= tol. Returns (engram, probe, original width
    or None when the configured width already fits)."""
    probe = _engram_probe(moe_model, engram, seq_len)
    drift = probe.train_flops / base.train_flops - 1.0
    if abs(drift) <= tol:
        return engram, probe, None
    heads, width = int(engram["heads_per_ngram"]), int(engram["embed_dim_per_ngram"])
    for dim in range(width - heads, 0, -heads):
        narrower = {**engram, "embed_dim_per_ngram": dim}
        probe = _engram_probe(moe_model, narrower, seq_len)
        drift = probe.train_flops / base.train_flops - 1.0
        if abs(drift) <= tol:
            return narrower, probe, width
    raise ValueError(f"{where}: active FLOPs per token drift {drift:+.2%} from rho=1 even at the narrowest "
                     f"Engram memory (tolerance {tol:.0%})")


def _steps_for_budget(budget: float, train_flops_per_token: float, tokens_per_step: int, tol: float,
                      where: str) -> int:
    """Whole optimizer steps whose training FLOPs are closest to ``budget`` (within ``tol``)."""
    exact = budget / (train_flops_per_token * tokens_per_step)
    steps = max(1, _round_half_up(exact))
    err = steps / exact - 1.0
    if abs(err) > tol:
        raise ValueError(f"{where}: budget {budget:.3g} buys {exact:.2f} steps of {tokens_per_step:,} tokens; whole "
                         f"steps miss it by {err:+.1%} (tolerance {tol:.0%}): raise the budget or lower "
                         f"train.global_batch_size")
    return steps


def solve_point(family: Family, backbone: Backbone, budget: float, rho: float, ep_size: int = 1,
                round_experts_to_ep: bool = False, data_dir: Optional[str] = None) -> RunSpec:
    """The run of allocation ``rho`` at ``budget`` on ``backbone`` (all tolerances checked)."""
    tol = family.tolerances
    base = backbone.measured
    k = backbone.top_k
    n = experts_for_rho(backbone.n_routed, k, rho, ep_size, round_experts_to_ep)
    where = f"family {family.name}, rung {backbone.name}, rho={rho:g}"
    dim_from = None
    if n == backbone.n_routed:
        if rho < 1.0:
            step = (ep_size if round_experts_to_ep else 1) / backbone.inactive_experts
            raise ValueError(f"{where}: frees no routed expert ({n} kept of {backbone.n_routed}; the smallest "
                             f"step in rho is {step:.3g}): use rho=1 or a lower rho")
        model, final, engram_dense = backbone.model, base, 0
    else:
        moe_model = _moe_model(family, backbone.rung, n)
        engram, probe, dim_from = _narrow_memory_for_drift(_full_engram(family, backbone.rung), moe_model, base,
                                                           tol.flops_drift, family.seq_len, where)
        without_tables = probe.total - probe.table_params  # experts, backbone and Engram's dense parts
        engram_dense = without_tables - measure(moe_model, family.seq_len).total
        table_budget = base.total - without_tables
        try:
            base_sizes, _ = solve_table_sizes(max(1, table_budget), {**engram, "table_params": max(1, table_budget),
                                                                     "tokenizer": None, "pad_id": None})
        except ValueError as e:
            raise ValueError(f"{where}: the {backbone.n_routed - n} removed experts leave {table_budget:,} params "
                             f"for Engram tables, too few ({e})") from None
        model = _with_tables(moe_model, engram, base_sizes)
        final = measure(model, family.seq_len)
    param_err = final.total / base.total - 1.0
    if abs(param_err) > tol.total_params:
        raise ValueError(f"{where}: P_tot {final.total:,} is {param_err:+.3%} from rho=1 ({base.total:,}), "
                         f"tolerance {tol.total_params:.1%}")
    drift = final.train_flops / base.train_flops - 1.0
    if abs(drift) > tol.flops_drift:
        raise ValueError(f"{where}: FLOPs per token drift {drift:+.2%} exceeds {tol.flops_drift:.0%}")

    train = family.rung_train(backbone.rung)
    batch = int(train.pop("global_batch_size"))
    steps = _steps_for_budget(budget, final.train_flops, batch * family.seq_len, tol.train_flops, where)
    optim = dict(family.optim)
    if family.warmup_frac is not None:
        optim["warmup_steps"] = _round_half_up(family.warmup_frac * steps)
    return RunSpec(
        family=family.name, rung=backbone.name, budget=float(budget), rho=float(rho),
        rho_effective=(n - k) * backbone.expert_sparse_params / (final.total - final.active),
        model=model, seq_len=family.seq_len, global_batch_size=batch, steps=steps, train=train, optim=optim,
        data_dir=data_dir if data_dir is not None else family.data_dir,
        total_params=final.total, active_params=final.active,
        embedding_params=final.counts.embedding_params, head_params=final.counts.head_params,
        routed_expert_params=n * backbone.expert_sparse_params,  # router columns are active, not counted here
        engram_params=final.table_params, engram_dense_params=engram_dense,
        forward_flops_per_token=final.forward_flops, flops_drift=drift, total_params_error=param_err,
        engram_dim_reduced_from=dim_from)
