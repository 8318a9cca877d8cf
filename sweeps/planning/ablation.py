"""The memory-ablation control arm of an allocation sweep: is Engram's gain memory, or structure?

A public report on the reference repository (deepseek-ai/Engram, issue 24) found that shrinking the
hash tables to a single slot kept most of Engram's gain. This arm answers that at every rho < 1 of a
sweep: the *same* model as the full Engram run (same routed experts, same Engram layers, gating,
convolution, projections and norms) with every hash head's table collapsed to **one row** (engram
``table_sizes`` = 1 per order, :mod:`memory.primes`): every n-gram reads the same row, so the module
keeps its context-dependent gate and convolution over the hidden state but retrieves no memory.

Compute and parameters of an ablated run, against its full-memory twin:

- FLOPs: identical. Table lookups are gathers (0 FLOPs), so the FLOPs per token do not change; the
  run trains the twin's exact token count (``train_sequences``), hence the same training FLOPs and the
  same optimizer steps, batch, warm-up and data order. :func:`ablated_run` refuses a model whose FLOPs
  per token differ.
- P_act: identical (the tables are not active parameters).
- P_tot: lower by the freed table parameters (the twin's tables minus one row per head). The arm is
  deliberately *not* iso-parameter: the freed parameters are not given back to experts, because the
  question is what the memory itself buys at fixed model compute. ``total_params_error`` records the
  ablated P_tot against rho = 1 (e.g. -17% at cpu rho = 0.8) and ``memory_ablated`` marks the run.
  ``rho_effective`` is the twin's, so both arms sit at the same x.

Ablated runs live in the allocation sweep's directory (``rho0.80-ablate-seed0``), are kept out of the
U-curve fit (:mod:`sweeps.execution.results` marks them excluded with the reason) and are compared with their
twins in :func:`sweeps.analysis.ablation_fit.ablation_summary`, paired by seed.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from sweeps.planning.runspec import RunSpec

ABLATE_TAG = "ablate"  # run directory / name suffix of an ablated point


def ablated_run(spec: RunSpec, rho_one_total: int) -> RunSpec:
    """The memory ablation of the full Engram run ``spec`` (see the module docstring).

    ``rho_one_total``: P_tot of the sweep's rho = 1 model, for ``total_params_error``."""
    from sweeps.planning.backbone import measure  # builds models: not needed to summarise a sweep

    engram = spec.model.get("engram")
    if not engram:
        raise ValueError(f"{spec.name}: no Engram tables to ablate (rho = 1 has no memory)")
    n_orders = int(engram["max_ngram"]) - 1
    model = {**spec.model, "engram": {**engram, "table_sizes": [1] * n_orders, "table_params": None}}
    m = measure(model, spec.seq_len)
    if m.forward_flops != spec.forward_flops_per_token or m.active != spec.active_params:
        raise ValueError(f"{spec.name}: collapsing the tables changed FLOPs per token ({spec.forward_flops_per_token:.6g}"
                         f" -> {m.forward_flops:.6g}) or P_act ({spec.active_params} -> {m.active}): not the same "
                         f"model compute")
    return dataclasses.replace(spec, model=model, total_params=m.total, engram_params=m.table_params,
                               total_params_error=m.total / rho_one_total - 1.0, memory_ablated=True)


def ablation_specs(runs: Sequence[RunSpec], described: Sequence[dict]) -> list[tuple[RunSpec, dict]]:
    """One ablated run per Engram run of a plan (rho < 1), in the plan's order, each with its
    description: the twin's ``Plan.to_list()`` entry (cost estimates: the same compute, memory a little
    lower) updated with the ablated run's own fields."""
    ones = [r for r in runs if not r.model.get("engram")]
    ref = ones[0].total_params if ones else round(sum(r.total_params / (1 + r.total_params_error) for r in runs)
                                                  / len(runs))
    return [(ablated, {**d, **ablated.to_dict()}) for r, d in zip(runs, described) if r.model.get("engram")
            for ablated in [ablated_run(r, ref)]]
