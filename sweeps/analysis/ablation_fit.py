"""The memory-ablation control arm's summary (the arm itself is planned in :mod:`sweeps.planning.ablation`): each
full-memory run against its one-row-table twin of the same seed, paired differences with a t interval,
and the one-line verdict."""
from __future__ import annotations

import json
import math
from typing import Any, Callable, Optional, Sequence

from scipy import stats

from sweeps.execution.results import ABLATED_REASON


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
