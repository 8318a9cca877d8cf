"""The sweep driver: plan a sweep, launch what is missing, survive failures, collect, fit, summarise.

Layout (deterministic from budget, family, rho / slots and seed, so re-running the same command finds
its own runs)::

    <out>/<family>-<budget>/                       allocation sweep, e.g. cpu-6e12/ (W&B group = dir name)
        plan.json  results.parquet  summary.json  u_curve.png  launch.log  wandb/
        rho0.80-seed0/                             one run_dir of train/main.py (config.yaml, final.json, checkpoints/)
    <out>/<family>-<budget>-memory/                "infinite memory" sweep: fixed backbone, Engram slots swept
        slots1000000-seed0/ ...
    <out>/u_curves.png                             every allocation sweep under <out> overlaid

A run is ``completed`` (final.json), ``failed`` / ``diverged`` (failed.json, written by the trainer or,
when the trainer died without a word, by the driver with the tail of its log), ``interrupted``
(checkpoints or an earlier launch but no outcome: relaunching resumes it) or ``pending``. Completed runs
are never relaunched; failed ones only with ``retry_failed``. The results table is rewritten after
every finished run, so nothing finished is lost when the driver itself dies.

This module names and plans; :mod:`sweeps.execution.runloop` launches and watches,
:mod:`sweeps.analysis.summary` collects and fits, :mod:`sweeps.analysis.planview` shows a plan before
anything runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from sweeps.planning.ablation import ablation_specs
from sweeps.planning.runconfig import refuse_planned, resolve_run_config
from sweeps.execution.sweep import ALLOCATION, MEMORY, Sweep, SweepRun, rho_tag, sweep_name


def build_sweep(specs: Sequence[Any], *, out: Path, family: str, budget: float, seeds: Sequence[int],
                mode: str = ALLOCATION, settings: Sequence[str] = (), wandb_mode: Optional[str] = None,
                wandb_project: Optional[str] = None, warnings: Sequence[str] = ()) -> Sweep:
    """Turn planner specs (objects with ``.rho``, ``.config()``, ``.to_dict()``; memory sweeps also
    ``.slots``) into runs, one per (spec, seed), with deterministic directories and names, each with its
    complete resolved trainer config (``settings``: ``--set KEY=VALUE``, refused on planned keys)."""
    refuse_planned(settings)
    if not specs:
        raise ValueError("the plan has no runs")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
    name = sweep_name(family, budget, mode)
    sweep_dir = Path(out).resolve() / name
    runs, seen = [], set()
    for spec in specs:
        slots = getattr(spec, "slots", None) if mode == MEMORY else None
        if mode == MEMORY and slots is None:
            raise ValueError("a memory sweep needs specs with a slot count (.slots)")
        label = getattr(spec, "requested_slots", slots)
        point = f"slots{int(label)}" if mode == MEMORY else f"rho{rho_tag(float(spec.rho))}"
        point += "-ablate" if getattr(spec, "memory_ablated", False) else ""  # sweeps/planning/ablation.py
        if point in seen:
            raise ValueError(f"two planned runs share the point {point}: give distinct values")
        seen.add(point)
        for seed in seeds:
            run_dir = sweep_dir / f"{point}-seed{seed}"
            run_name = f"{name}-{run_dir.name}"
            meta = {"name": name, "mode": mode, "family": family, "budget": float(budget), "rho": float(spec.rho),
                    "seed": seed, **({} if slots is None else {"slots": int(slots)})}
            wandb = {"group": name, "name": run_name, **({} if wandb_mode is None else {"mode": wandb_mode}),
                     **({} if wandb_project is None else {"project": wandb_project})}
            own = {"run_dir": str(run_dir), "experiment_name": run_name, "train": {"seed": seed, "progress": False},
                   "logging": {"wandb": wandb}, "sweep": meta}
            config = resolve_run_config(spec.config(), settings, own)
            runs.append(SweepRun(float(spec.rho), seed, run_dir, run_name, config, spec.to_dict(),
                                 None if slots is None else int(slots)))
    return Sweep(name, mode, family, float(budget), sweep_dir, runs, list(warnings))


# --------------------------------------------------------------------------------------------------
# Planning from the budget solver
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PlannedRun:
    """A budget-solver run spec as the driver launches it."""

    spec: Any  # sweeps.planning.budget.RunSpec

    @property
    def rho(self) -> float:
        return self.spec.rho

    def config(self) -> dict:
        return self.spec.config(include_name=False)

    @property
    def memory_ablated(self) -> bool:
        return bool(getattr(self.spec, "memory_ablated", False))


@dataclass(frozen=True)
class MemorySpec(_PlannedRun):
    """A memory-sweep point: the budget solver's run spec with Engram tables of ``slots`` rows in all."""

    slots: int = 0  # exact table rows (prime-sized tables)
    requested_slots: int = 0  # what was asked for (names the run directory)
    estimates: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.spec.to_dict(), "slots": self.slots, "requested_slots": self.requested_slots,
                "estimates": self.estimates}


@dataclass(frozen=True)
class _AllocationSpec(_PlannedRun):
    described: dict = field(default_factory=dict)  # its Plan.to_list() entry: spec fields + cost estimates

    def to_dict(self) -> dict:
        return self.described


def plan_allocation(family: str, budget: float, rhos: Sequence[float], *, data_dir: Optional[str] = None,
                    ep_size: int = 1, round_experts_to_ep: bool = False,
                    ablate_memory: bool = False, engram_tables: str = "replicated",
                    n_gpus: Optional[int] = None) -> tuple[list[Any], list[str]]:
    """Run specs of an allocation sweep from the budget solver, and its warnings. ``ablate_memory`` adds
    the control arm: one run per rho < 1 with one-row tables (:mod:`sweeps.planning.ablation`), whose cost
    estimates are its twin's (the same compute; memory a little lower)."""
    from sweeps.planning.budget import solve_plan
    from sweeps.planning.families import load_family

    fam = load_family(family)
    if n_gpus is not None:  # the launch's ranks per run, where the plan must divide them (EP, sharded tables)
        fam = fam.with_hardware(n_gpus=n_gpus)
    plan = solve_plan(fam, float(budget), list(rhos), ep_size=ep_size,
                      round_experts_to_ep=round_experts_to_ep, data_dir=data_dir, engram_tables=engram_tables)
    described = plan.to_list()
    arm = ablation_specs(plan.runs, described) if ablate_memory else []
    return [_AllocationSpec(s, d) for s, d in [*zip(plan.runs, described), *arm]], list(plan.warnings)


def plan_memory(family: str, budget: float, slots: Sequence[int], *,
                data_dir: Optional[str] = None) -> tuple[list[MemorySpec], list[str]]:
    """Run specs of an "infinite memory" sweep (sized by ``sweeps.planning.budget.solve_memory_points``),
    each with its cost estimates."""
    from sweeps.planning.budget import estimate_resources, solve_memory_points
    from sweeps.planning.families import load_family

    fam = load_family(family)
    out = []
    for (spec, exact_slots), requested in zip(solve_memory_points(fam, budget, slots, data_dir=data_dir),
                                              sorted(int(s) for s in slots)):
        res = estimate_resources(spec, fam.hardware)
        est = {"hardware": fam.hardware.name, "n_gpus": fam.hardware.n_gpus, "mfu": fam.hardware.mfu,
               "gpu_hours": res.gpu_hours, "mem_per_gpu_gib": res.total_gib, "fits": res.fits}
        out.append(MemorySpec(spec, exact_slots, requested, est))
    return out, []
