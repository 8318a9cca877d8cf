"""Steps 3 and 4 of the budget solver (see :mod:`sweeps.planning.budget`): the run of one rho at a budget:
Engram tables sized from what the removed experts free, drift compensation, and the token solve."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from memory.config import EngramConfig
from memory.sizing import solve_table_sizes
from sweeps.planning.backbone import Backbone, Measured, moe_model, round_half_up, experts_for_rho, measure
from sweeps.planning.families import Family, Tolerances
from sweeps.planning.runspec import RunSpec


# ---- steps 3 and 4: one rho ------------------------------------------------------------------------
def _full_engram(family: Family, rung: int) -> dict:
    """The rung's Engram mapping with every EngramConfig field, tables unset."""
    raw = family.rung_engram(rung)
    if not raw:
        raise ValueError(f"family {family.name} has no engram settings: rho < 1 needs Engram layers and widths")
    cfg = EngramConfig.from_dict({**raw, "table_params": 1}).to_dict()
    cfg["table_params"] = None
    return cfg


def _with_tables(model: dict, engram: dict, base_sizes: Sequence[int]) -> dict:
    return {**model, "engram": {**engram, "table_sizes": [int(b) for b in base_sizes], "table_params": None}}


def _engram_probe(model: dict, engram: dict, seq_len: int) -> Measured:
    """The model with the smallest possible Engram tables (base size 2 per order)."""
    n_orders = int(engram["max_ngram"]) - 1
    return measure(_with_tables(model, engram, [2] * n_orders), seq_len)


def _off_tolerance(m: Measured, base: Measured, tol: Tolerances) -> Optional[str]:
    """Why the active side of ``m`` is out of tolerance against rho = 1 (None when within)."""
    drift = m.train_flops / base.train_flops - 1.0
    if abs(drift) > tol.flops_drift:
        return f"active FLOPs per token drift {drift:+.2%} from rho=1 (tolerance {tol.flops_drift:.1%})"
    active = m.active / base.active - 1.0
    if abs(active) > tol.active_params:
        return f"active params {active:+.2%} from rho=1 (tolerance {tol.active_params:.1%})"
    return None


def _narrow_memory(engram: dict, experts_model: dict, base: Measured, tol: Tolerances, seq_len: int,
                   where: str) -> tuple[dict, Measured, Optional[int]]:
    """Compensation (b): the widest Engram memory (embed_dim_per_ngram, in steps of heads_per_ngram)
    whose model keeps the FLOPs-per-token drift and the active-parameter difference against rho = 1
    within tolerance. Returns (engram, probe, original width or None when the configured width fits)."""
    probe = _engram_probe(experts_model, engram, seq_len)
    why = _off_tolerance(probe, base, tol)
    if why is None:
        return engram, probe, None
    heads, width = int(engram["heads_per_ngram"]), int(engram["embed_dim_per_ngram"])
    for dim in range(width - heads, 0, -heads):
        narrower = {**engram, "embed_dim_per_ngram": dim}
        probe = _engram_probe(experts_model, narrower, seq_len)
        why = _off_tolerance(probe, base, tol)
        if why is None:
            return narrower, probe, width
    raise ValueError(f"{where}: {why} even at the narrowest Engram memory")


def sequences_for_budget(budget: float, train_flops_per_token: float, seq_len: int, global_batch_size: int,
                         micro_batch_size: int) -> int:
    """Training sequences whose FLOPs come closest to ``budget``, in whole sequences.

    Why sequences, not steps: a whole number of steps misses the budget by up to half a step (0.35%
    at the cpu family's 6e12, where every rho got 112 steps), in a direction set by each rho's FLOPs
    per token, so Engram runs got more compute than rho = 1. The trainer ends on a short last step
    instead (train/data.py): same batch size and data order for every rho, DeepSpeed's accumulation
    boundary unchanged (every micro-batch slot keeps at least one sequence, hence a last step of 0
    or at least ``global_batch_size / micro_batch_size`` sequences), the loss re-weighted to the
    step's mean. Choosing steps and batch size together was rejected: a batch size that varies with
    rho changes the optimisation, a confound the sweep must not carry. The remaining error is at
    most half a sequence (or half the slots) over the run's sequences: under 0.03% at cpu 6e12.
    """
    if global_batch_size % micro_batch_size:
        raise ValueError(f"train.global_batch_size={global_batch_size} is not a multiple of "
                         f"train.micro_batch_size={micro_batch_size}")
    exact = budget / (train_flops_per_token * seq_len)
    slots = global_batch_size // micro_batch_size
    candidates = set()
    for n in (math.floor(exact), math.ceil(exact)):
        rest = n % global_batch_size
        candidates |= {n - rest, n - rest + slots} if 0 < rest < slots else {n}
    return min((n for n in candidates if n >= slots), key=lambda n: (abs(n - exact), n))


def _budget_sequences(budget: float, train_flops_per_token: float, seq_len: int, batch: int, train: dict,
                      tol: Tolerances, where: str) -> int:
    """:func:`sequences_for_budget`, checked against ``tolerances.train_flops``."""
    # a family without train.micro_batch_size leaves the trainer's default: assume the worst case (1
    # sequence per micro-batch, so G slots: whole steps only), which any micro-batch size can run
    sequences = sequences_for_budget(budget, train_flops_per_token, seq_len, batch,
                                     int(train.get("micro_batch_size", 1)))
    err = sequences * seq_len * train_flops_per_token / budget - 1.0
    if abs(err) > tol.train_flops:
        raise ValueError(f"{where}: budget {budget:.3g} buys {budget / train_flops_per_token / seq_len:.2f} "
                         f"sequences of {seq_len} tokens; whole sequences (a last step of at least one per "
                         f"micro-batch) miss it by {err:+.2%} (tolerance {tol.train_flops:.1%}): raise the "
                         f"budget or lower train.global_batch_size / raise train.micro_batch_size")
    return sequences


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
        experts_model = moe_model(family, backbone.rung, n)
        engram, probe, dim_from = _narrow_memory(_full_engram(family, backbone.rung), experts_model, base, tol,
                                                 family.seq_len, where)
        without_tables = probe.total - probe.table_params  # experts, backbone and Engram's dense parts
        engram_dense = without_tables - measure(experts_model, family.seq_len).total
        table_budget = base.total - without_tables
        try:
            sized = EngramConfig.from_dict({**engram, "table_params": int(max(1, table_budget)), "tokenizer": None,
                                            "pad_id": None})
            base_sizes, _ = solve_table_sizes(sized.table_params, sized)
        except ValueError as e:
            raise ValueError(f"{where}: the {backbone.n_routed - n} removed experts leave {table_budget:,} params "
                             f"for Engram tables, too few ({e})") from None
        model = _with_tables(experts_model, engram, base_sizes)
        final = measure(model, family.seq_len)
    param_err = final.total / base.total - 1.0
    if abs(param_err) > tol.total_params:
        raise ValueError(f"{where}: P_tot {final.total:,} is {param_err:+.3%} from rho=1 ({base.total:,}), "
                         f"tolerance {tol.total_params:.1%}")
    why = _off_tolerance(final, base, tol)
    if why is not None:
        raise ValueError(f"{where}: {why}")
    train = family.rung_train(backbone.rung)
    batch = int(train.pop("global_batch_size"))
    sequences = _budget_sequences(budget, final.train_flops, family.seq_len, batch, train, tol, where)
    optim = dict(family.optim)
    if family.warmup_frac is not None:
        optim["warmup_steps"] = round_half_up(family.warmup_frac * -(-sequences // batch))
    return RunSpec(
        family=family.name, rung=backbone.name, budget=float(budget), rho=float(rho),
        rho_effective=(n - k) * backbone.expert_sparse_params / (final.total - final.active),
        model=model, seq_len=family.seq_len, global_batch_size=batch, train_sequences=sequences, train=train,
        optim=optim,
        data_dir=data_dir if data_dir is not None else family.data_dir,
        total_params=final.total, active_params=final.active,
        embedding_params=final.counts.embedding_params, head_params=final.counts.head_params,
        routed_expert_params=n * backbone.expert_sparse_params,  # router columns are active, not counted here
        engram_params=final.table_params, engram_dense_params=engram_dense,
        forward_flops_per_token=final.forward_flops, flops_drift=final.train_flops / base.train_flops - 1.0,
        total_params_error=param_err, active_params_error=final.active / base.active - 1.0,
        engram_dim_reduced_from=dim_from, expert_parallel=int(ep_size))
