"""Iso-parameter / iso-FLOP budget solver: the one place that turns (budget C, allocation rho) into a model.

Definitions (the Engram paper's). P_tot and P_act are the total and per-token-active parameters
without the vocabulary embedding and the output head; P_sparse = P_tot - P_act. rho is the share of
P_sparse held by routed experts that a token does not use; the rest, (1 - rho) P_sparse, sits in
Engram tables. rho = 1 is the pure MoE baseline.

Procedure for a family, a budget C and a list of rho values:

1. Backbone. Every rung of the family is instantiated on the meta device (no memory) at N = k+1 and
   k+2 routed experts (k = top_k). Its counts are linear in N, so the two builds give the marginal
   cost of one routed expert; the expert count N_1 of the rho = 1 model is the integer whose
   P_tot / P_act is closest to the family's sparsity (checked on the built model). The rung used is
   the one whose rho = 1 model, trained on all of C, sees tokens per active parameter closest (in
   log) to the family's rule.
2. Experts per rho. Lowering rho removes routed experts: N(rho) = k + round(rho (N_1 - k)); the k
   active and the shared experts stay, so the per-token expert compute is unchanged.
3. Engram tables. The model with N(rho) experts and Engram at the smallest possible tables is
   built; everything it holds besides its tables (experts, backbone, Engram projections, norms,
   convolution) is subtracted from P_tot(rho = 1), and :func:`memory.sizing.solve_table_sizes`
   turns the remainder into prime table sizes. P_tot stays within the family's tolerance of the
   rho = 1 model (prime gaps leave a few rows per head).
4. Tokens. Each run trains the whole number of *sequences* whose training FLOPs (3 x forward
   FLOPs per token x tokens, attention and head included, lookups 0) are closest to C; the last
   optimizer step may be short (:func:`sweeps.planning.solver.sequences_for_budget` says why, train/data.py
   how), so every run spends C to a few hundredths of a percent (``tolerances.train_flops``, 0.2%
   by default) and the trainer's ``final.json`` spends exactly what was planned.

Active FLOPs drift and active parameters. At rho < 1 the Engram value/key projections, gate and
convolution are active (+FLOPs per token, +P_act) while the removed experts' router columns are
gone (-FLOPs); both differences are reported per run (``flops_drift``, ``active_params_error``).
Compensation: (a) the iso-FLOP token solve of step 4 charges the drift to the token count, and the
table solve of step 3 charges the extra active parameters to the tables (P_tot stays equal); (b)
if the drift or the P_act difference still exceeds the family's ``tolerances.flops_drift`` /
``tolerances.active_params``, the Engram memory width (embed_dim_per_ngram) is lowered in steps of
heads_per_ngram until both fit, and the freed projection parameters go to the tables; the
reduction is reported. A plan that cannot be brought within every tolerance raises.

All counts come from the modules' own ``counts()`` / ``table_params``; nothing here re-derives a
per-module parameter or FLOP formula (only the activation-memory estimate of the cost report is a
shape-based approximation). Engram table sizes do not depend on the tokenizer, so models
are counted with identity compression and the family's tokenizer is only written into the run.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

from rundir.schema import ENGRAM_TABLE_MODES
from sweeps.planning.backbone import (Backbone, Measured, experts_for_rho, measure, select_backbone,  # noqa: F401
                             solve_backbone)
from sweeps.planning.families import Family, Hardware
from sweeps.planning.memory_points import solve_memory_points  # noqa: F401
from sweeps.planning.resources import GiB, Resources, activation_bytes_per_token, estimate_resources  # noqa: F401
from sweeps.planning.runspec import RunSpec  # noqa: F401
from sweeps.planning.solver import solve_point

# The solver is split by what each part does; this module assembles a plan and re-exports the public
# names (``from sweeps.planning.budget import ...`` keeps working): backbone.py (steps 1-2), solver.py (steps
# 3-4), runspec.py (the run description and the config sections it decides), resources.py (cost estimates),
# memory_points.py ("infinite memory" sweeps).


# ---- the plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """An allocation sweep at one budget: the chosen backbone, one run per rho and its cost estimate."""

    family: Family
    budget: float
    backbone: Backbone
    runs: list[RunSpec]
    resources: list[Resources]
    hardware: Hardware
    ep_size: int = 1
    engram_tables: str = "replicated"
    warnings: list[str] = field(default_factory=list)

    def reference_errors(self, run: RunSpec) -> dict[str, dict[str, float]]:
        """Relative errors against the family's published points at this budget and rho."""
        out: dict[str, dict[str, float]] = {}
        for ref in self.family.reference_points:
            if math.isclose(ref.budget, self.budget, rel_tol=1e-6) and math.isclose(ref.rho, run.rho, abs_tol=1e-9):
                ours = {"total_params": run.total_params, "active_params": run.active_params,
                        "n_routed_experts": run.n_routed_experts}
                for key, published in ref.targets().items():
                    out[key] = {"published": float(published), "ours": float(ours[key]),
                                "rel_error": ours[key] / published - 1.0}
        return out

    @property
    def max_flops_drift(self) -> float:
        return max(abs(r.flops_drift) for r in self.runs)

    def to_list(self) -> list[dict]:
        out = []
        for run, res in zip(self.runs, self.resources):
            d = run.to_dict()
            d["estimates"] = {"hardware": self.hardware.name, "n_gpus": self.hardware.n_gpus,
                              "mfu": self.hardware.mfu, "peak_tflops": self.hardware.peak_tflops,
                              "ep_size": self.ep_size, "engram_tables": self.engram_tables, "gpu_hours": res.gpu_hours, "wall_hours": res.wall_hours,
                              "mem_per_gpu_gib": res.total_gib, "mem_weights_gib": res.weights_gib,
                              "mem_grads_gib": res.grads_gib, "mem_optimizer_gib": res.optimizer_gib,
                              "mem_activations_gib": res.activations_gib, "mem_tables_gib": res.tables_gib,
                              "gpu_mem_gib": res.gpu_mem_gib, "fits": res.fits}
            refs = self.reference_errors(run)
            if refs:
                d["reference"] = refs
            out.append(d)
        return out


def solve_plan(family: Family, budget: float, rhos: Sequence[float], *, ep_size: int = 1,
               round_experts_to_ep: bool = False, data_dir: Optional[str] = None,
               hardware: Optional[Hardware] = None, engram_tables: str = "replicated") -> Plan:
    """Every rho of an allocation sweep at training budget ``budget`` (FLOPs), validated up front.
    ``engram_tables``: the trainer's ``parallel.engram_tables`` for every run (the same for all rho: it
    changes where table rows live, not the model), and the memory estimate's."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number of FLOPs, got {budget!r}")
    rhos = [float(r) for r in rhos]
    if not rhos:
        raise ValueError("rho list is empty")
    bad = [r for r in rhos if not (math.isfinite(r) and 0.0 <= r <= 1.0)]
    if bad:
        raise ValueError(f"rho must lie in [0, 1], got {bad}")
    if len(set(rhos)) != len(rhos):
        raise ValueError(f"rho values repeat: {rhos}")
    if isinstance(ep_size, bool) or int(ep_size) != ep_size or ep_size < 1:
        raise ValueError(f"expert-parallel size must be a positive integer, got {ep_size!r}")
    if engram_tables not in ENGRAM_TABLE_MODES:
        raise ValueError(f"engram_tables must be one of {', '.join(ENGRAM_TABLE_MODES)}, got {engram_tables!r}")
    hardware = hardware or family.hardware
    if hardware.n_gpus % ep_size:
        raise ValueError(f"expert-parallel size {ep_size} does not divide the {hardware.n_gpus} GPUs")
    backbone, _ = select_backbone(family, float(budget), ep_size, round_experts_to_ep)
    runs = [replace(solve_point(family, backbone, float(budget), r, ep_size, round_experts_to_ep, data_dir),
                    engram_tables=engram_tables) for r in rhos]
    plan = Plan(family, float(budget), backbone, runs, [estimate_resources(r, hardware, ep_size) for r in runs],
                hardware, ep_size, engram_tables)
    ns = [r.n_routed_experts for r in runs]
    if len(set(ns)) != len(ns):
        plan.warnings.append(f"several rho values round to the same expert count: {dict(zip(rhos, ns))}")
    for run, res in zip(runs, plan.resources):
        if res.tables_gib > res.gpu_mem_gib:
            raise ValueError(f"rho={run.rho:g}: Engram tables need {res.tables_gib:.1f} GiB per device (weights, "
                             f"grads and optimizer state, {engram_tables}), more than the {res.gpu_mem_gib:.1f} GiB "
                             f"of {hardware.name}" + ("" if engram_tables == "sharded" else
                                                      ": shard them over the GPUs with --engram-tables sharded"))
        if not res.fits:
            plan.warnings.append(f"rho={run.rho:g}: about {res.total_gib:.1f} GiB per device will not fit in "
                                 f"{res.gpu_mem_gib:.1f} GiB ({hardware.name}); raise train.zero_stage, the GPU "
                                 f"count or ep_size, or lower train.micro_batch_size")
    return plan
