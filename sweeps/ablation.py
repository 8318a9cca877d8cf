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
U-curve fit (:mod:`sweeps.results` marks them excluded with the reason) and are compared with their
twins in :func:`ablation_summary`, paired by seed.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Optional, Sequence

from scipy import stats

from sweeps.results import ABLATED_REASON
from sweeps.runspec import RunSpec

ABLATE_TAG = "ablate"  # run directory / name suffix of an ablated point


def ablated_run(spec: RunSpec, rho_one_total: int) -> RunSpec:
    """The memory ablation of the full Engram run ``spec`` (see the module docstring).

    ``rho_one_total``: P_tot of the sweep's rho = 1 model, for ``total_params_error``."""
    from sweeps.backbone import measure  # builds models: not needed to summarise a sweep

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


# ---- the summary: full vs ablated, paired by seed ------------------------------------------------
def _t_interval(diffs: Sequence[float], level: float) -> tuple[float, Optional[list[float]], Optional[float]]:
    """Mean, t interval (None with fewer than 2 values) and standard error of paired differences."""
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return mean, None, None
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1) / n)
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * se
    return mean, [mean - half, mean + half], se


def _verdict(ci: Optional[list[float]]) -> str:
    if ci is None:
        return "insufficient"
    if ci[0] > 0:
        return "memory helps"
    if ci[1] < 0:
        return "ablation better"
    return "no difference detected"


def _paired(records: Sequence[Any]) -> dict[float, dict[int, dict[str, float]]]:
    """{rho: {seed: {"full"|"ablated"|"moe": val_loss}}} of completed runs (rho = 1 runs under every rho)."""
    arms: dict[float, dict[int, dict[str, float]]] = {}
    moe: dict[int, float] = {}
    for r in records:
        if r.status != "completed" or r.val_loss is None:
            continue
        ablated = bool(json.loads(r.spec or "{}").get("memory_ablated"))
        if getattr(r, "excluded", None) not in (None, ABLATED_REASON):
            continue  # off its budget: not a fair twin
        if r.rho >= 1.0 and not ablated:
            moe[r.seed] = float(r.val_loss)
            continue
        arms.setdefault(round(r.rho, 9), {}).setdefault(r.seed, {})["ablated" if ablated else "full"] = r.val_loss
    for per_seed in arms.values():
        for seed, losses in per_seed.items():
            if seed in moe:
                losses["moe"] = moe[seed]
    return arms


def _compare(per_seed: dict[int, dict[str, float]], hi: str, lo: str, level: float) -> Optional[dict]:
    """loss[hi] - loss[lo] over the seeds that have both, with its t interval (paired by seed)."""
    seeds = sorted(s for s, v in per_seed.items() if hi in v and lo in v)
    if not seeds:
        return None
    mean, ci, se = _t_interval([per_seed[s][hi] - per_seed[s][lo] for s in seeds], level)
    return {"diff": mean, "ci": ci, "se": se, "n_seeds": len(seeds), "seeds": seeds}


def ablation_summary(records: Sequence[Any], level: float = 0.95,
                     emit: Optional[Callable[[str], None]] = None) -> Optional[dict]:
    """Full vs memory-ablated Engram at each rho and pooled over rho, or None without ablated runs.

    ``memory_effect`` = loss(ablated) - loss(full): positive when the memory itself lowers the loss.
    ``structure_effect`` = loss(rho = 1) - loss(ablated): what gating/conv/projections alone buy over
    pure MoE (only where the sweep has rho = 1 at the same seed). Per rho, the interval is a t interval
    over seeds of the paired differences (n_seeds - 1 dof). Pooled: each seed's differences are
    averaged over rho first, then a t interval over seeds, so the seeds (not the rho points, which share
    a seed's data order) are the independent units. One seed gives points but no interval."""
    arms = _paired(records)
    if not any("ablated" in v for per_seed in arms.values() for v in per_seed.values()):
        return None
    per_rho, pooled_mem, pooled_struct = [], {}, {}
    for rho in sorted(arms, reverse=True):
        if not any("ablated" in v for v in arms[rho].values()):
            continue  # a rho without its control arm
        mem = _compare(arms[rho], "ablated", "full", level)
        struct = _compare(arms[rho], "moe", "ablated", level)
        per_rho.append({"rho": rho, "memory_effect": mem, "structure_effect": struct})
        for seed, v in arms[rho].items():
            if "ablated" in v and "full" in v:
                pooled_mem.setdefault(seed, []).append(v["ablated"] - v["full"])
            if "ablated" in v and "moe" in v:
                pooled_struct.setdefault(seed, []).append(v["moe"] - v["ablated"])

    def pool(by_seed: dict[int, list[float]]) -> Optional[dict]:
        if not by_seed:
            return None
        mean, ci, se = _t_interval([sum(v) / len(v) for v in by_seed.values()], level)
        return {"diff": mean, "ci": ci, "se": se, "n_seeds": len(by_seed), "n_pairs": sum(map(len, by_seed.values()))}

    pooled = pool(pooled_mem)
    out = {"level": level, "per_rho": per_rho, "memory_effect": pooled, "structure_effect": pool(pooled_struct),
            "verdict": _verdict(pooled["ci"] if pooled else None),
            "reason": None if pooled and pooled["ci"] else "paired intervals need >= 2 seeds with both arms",
            "definition": "memory_effect = loss(ablated) - loss(full Engram), paired by seed; "
                          "structure_effect = loss(rho=1) - loss(ablated)"}
    line = ablation_line(out)
    if emit is not None and line:
        emit(line)
    return out


def ablation_line(summary: Optional[dict]) -> Optional[str]:
    """One line for the console: the pooled memory effect with its interval and the verdict."""
    if not summary or not summary["memory_effect"]:
        return None
    m = summary["memory_effect"]
    ci = "[no interval: one seed]" if m["ci"] is None else f"[{m['ci'][0]:+.4f}, {m['ci'][1]:+.4f}]"
    return (f"memory ablation: {summary['verdict']}; loss(ablated) - loss(full) = {m['diff']:+.4f} nats {ci} "
            f"({100 * summary['level']:.0f}%, {m['n_seeds']} seed(s), {m['n_pairs']} pair(s))")
