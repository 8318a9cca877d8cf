"""The dry-run view of a sweep (every run's shape, cost and state, the first run's command, the power
line) and its plan record, ``plan.json`` (split from :mod:`sweeps.execution.driver`)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from sweeps.execution.sweep import ALLOCATION, Sweep
from sweeps.analysis.fit import json_safe
from rundir.files import write_record


def _power_report(sweep: Sweep, noise: Optional[float]) -> list[str]:
    """Dry-run power lines: from ``noise`` or from finished sweeps of the same family under the output root."""
    from sweeps.analysis.power import noise_from_earlier, power_lines

    n_rho = len({round(r.rho, 9) for r in sweep.runs})
    n_seeds = len({r.seed for r in sweep.runs})
    if noise is not None:
        return power_lines(noise, "given", n_rho, n_seeds)
    earlier = noise_from_earlier(sweep.dir.parent, sweep.family)
    if earlier is None:
        return power_lines(None, "", n_rho, n_seeds)
    return power_lines(earlier[0], f"earlier sweeps' ({earlier[1]} dof)", n_rho, n_seeds)


def describe_plan(sweep: Sweep, noise: Optional[float] = None, command: Optional[Sequence[str]] = None) -> str:
    """The dry-run view: every run's shape, cost and state, the command of the first one (``command``: as the
    chosen launcher would start it; default a one-process run) and, for an allocation sweep, the smallest
    gain it could detect (noise sd ``noise``, else from earlier sweeps)."""
    import shlex
    import sys

    from rundir.config import trainer_args
    from sweeps.planning.runconfig import TRAIN_SCRIPT

    lines = [f"sweep {sweep.name} ({sweep.mode}): {len(sweep.runs)} runs in {sweep.dir}"]
    lines += [f"warning: {w}" for w in sweep.warnings]
    head = (f"{'run':<24} {'state':<11} {'rho_eff':>7} {'P_tot':>9} {'P_act':>9} {'experts':>7} {'engram':>9} "
            f"{'tokens':>9} {'tok/Pact':>8} {'tok/Ptot':>8} {'lkp/row':>8} {'FLOPs':>10} {'C err':>8} {'drift':>7} "
            f"{'GPU-h':>8} {'GiB/dev':>7}")
    lines += [head, "-" * len(head)]
    total_hours = 0.0
    for run in sweep.runs:
        s = run.spec
        est = s.get("estimates") or {}
        total_hours += est.get("gpu_hours", 0.0)
        rec = sweep.record(run)
        lines.append(f"{run.run_dir.name:<24} {rec.status:<11} {s.get('rho_effective', math.nan):>7.3f} "
                     f"{s.get('total_params', 0):>9.3g} {s.get('active_params', 0):>9.3g} "
                     f"{s.get('n_routed_experts', '-'):>7} {s.get('engram_params', 0):>9.3g} "
                     f"{s.get('train_tokens', 0):>9.3g} {s.get('tokens_per_active_param', math.nan):>8.3g} "
                     f"{s.get('tokens_per_total_param', math.nan):>8.3g} "
                     f"{s.get('lookups_per_row') or math.nan:>8.3g} {s.get('train_flops', 0):>10.5g} "
                     f"{s.get('train_flops_error', math.nan):>+8.3%} {s.get('flops_drift', 0):>+7.2%} "
                     f"{est.get('gpu_hours', math.nan):>8.3g} {est.get('mem_per_gpu_gib', math.nan):>7.3g}")
    if total_hours:
        est = sweep.runs[0].spec["estimates"]
        lines.append(f"total: {total_hours:.4g} GPU-hours on {est['hardware']} at {est['mfu']:.0%} MFU "
                     f"(the family's assumptions)")
    first = sweep.runs[0]
    lines.append(f"command of {first.run_dir.name} (its config.yaml is written at launch):\n  "
                 f"{shlex.join(command or [sys.executable, TRAIN_SCRIPT, *trainer_args(first.run_dir)])}")
    if sweep.mode == ALLOCATION:
        lines += _power_report(sweep, noise)
    return "\n".join(lines)


def write_plan(sweep: Sweep) -> None:
    sweep.dir.mkdir(parents=True, exist_ok=True)
    write_record(sweep.dir / "plan.json", json_safe({
        "sweep": sweep.name, "mode": sweep.mode, "family": sweep.family, "budget": sweep.budget,
        "warnings": sweep.warnings,
        "runs": [{"name": r.name, "run_dir": str(r.run_dir), "rho": r.rho, "seed": r.seed, "slots": r.slots,
                  "config": r.config, "spec": r.spec} for r in sweep.runs]}))
