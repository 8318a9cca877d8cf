"""The sweep driver: plan a sweep, launch what is missing, survive failures, collect, fit, summarise.

Layout (deterministic from budget, family, rho / slots and seed, so re-running the same command finds
its own runs)::

    <out>/<family>-<budget>/                       allocation sweep, e.g. cpu-6e12/ (W&B group = dir name)
        plan.json  results.parquet  summary.json  u_curve.png  launch.log  wandb/
        rho0.80-seed0/                             one run_dir of train/main.py (final.json, checkpoints/, ...)
    <out>/<family>-<budget>-memory/                "infinite memory" sweep: fixed backbone, Engram slots swept
        slots1000000-seed0/ ...
    <out>/u_curves.png                             every allocation sweep under <out> overlaid

A run is ``completed`` (final.json), ``failed`` / ``diverged`` (failed.json, written by the trainer or,
when the trainer died without a word, by the driver with the tail of its log), ``interrupted``
(checkpoints or an earlier launch but no outcome: relaunching resumes it) or ``pending``. Completed runs
are never relaunched; failed ones only with ``retry_failed``. The results table is rewritten after
every finished run, so nothing finished is lost when the driver itself dies.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from sweeps.ablation import ablation_specs, ablation_summary
from sweeps.runconfig import refuse_planned, resolve_run_config
from sweeps.fit import json_safe
from rundir.outcome import launch_attempts, read_outcome
from sweeps.runloop import (SWEEP_LOCK, SweepLocked, _SweepLock, _write_json,  # noqa: F401  re-exported
                            check_plan_unchanged, log_tail_reason, run_sweep, run_sweeps)
from sweeps.results import (COMPLETED, DIVERGED, FAILED, INTERRUPTED, PENDING, RUNNING,  # noqa: F401
                            RunRecord, spec_json, write_results)

ALLOCATION, MEMORY = "allocation", "memory"


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
def budget_tag(budget: float) -> str:
    """1e13 -> '1e13', 2.5e20 -> '2.5e20', 3e+18 -> '3e18'."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive number of FLOPs, got {budget!r}")
    mant, exp = f"{float(budget):.3e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def rho_tag(rho: float) -> str:
    """Two decimals, more only when needed: 0.8 -> '0.80', 0.825 -> '0.825'."""
    two = f"{rho:.2f}"
    return two if abs(float(two) - rho) < 1e-9 else f"{rho:.6f}".rstrip("0")


def sweep_name(family: str, budget: float, mode: str = ALLOCATION) -> str:
    if mode not in (ALLOCATION, MEMORY):
        raise ValueError(f"sweep mode must be {ALLOCATION} or {MEMORY}, got {mode!r}")
    if not family or not all(c.isalnum() or c in "_.-" for c in family):
        raise ValueError(f"family name {family!r} must be letters, digits, '_', '.' or '-' (it names directories)")
    return f"{family}-{budget_tag(budget)}" + ("-memory" if mode == MEMORY else "")


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------
@dataclass
class SweepRun:
    """One (rho or slots, seed) point: what to run and where."""

    rho: float
    seed: int
    run_dir: Path
    name: str  # W&B run name: <sweep>-<dir name>
    config: dict  # the complete resolved trainer config: <run_dir>/config.yaml
    spec: dict  # the planner's description (to_dict())
    slots: Optional[int] = None


@dataclass
class Sweep:
    name: str
    mode: str
    family: str
    budget: float
    dir: Path
    runs: list[SweepRun]
    warnings: list[str] = field(default_factory=list)

    def record(self, run: SweepRun) -> RunRecord:
        """The run's current record, from its directory."""
        status, info = read_outcome(run.run_dir)
        attempts = launch_attempts(run.run_dir)
        return RunRecord(sweep=self.name, mode=self.mode, family=self.family, budget=self.budget, rho=run.rho,
                         seed=run.seed, run_name=run.name, run_dir=str(run.run_dir), status=status,
                         slots=run.slots, attempts=attempts, spec=spec_json(run.spec), **info)

    def records(self) -> list[RunRecord]:
        return [self.record(r) for r in self.runs]

    def label(self, run: SweepRun) -> str:
        return f"[{self.name}] {run.run_dir.name}"


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
        point += "-ablate" if getattr(spec, "memory_ablated", False) else ""  # sweeps/ablation.py
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

    spec: Any  # sweeps.budget.RunSpec

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
                    ablate_memory: bool = False) -> tuple[list[Any], list[str]]:
    """Run specs of an allocation sweep from the budget solver, and its warnings. ``ablate_memory`` adds
    the control arm: one run per rho < 1 with one-row tables (:mod:`sweeps.ablation`), whose cost
    estimates are its twin's (the same compute; memory a little lower)."""
    from sweeps.budget import solve_plan
    from sweeps.families import load_family

    plan = solve_plan(load_family(family), float(budget), list(rhos), ep_size=ep_size,
                      round_experts_to_ep=round_experts_to_ep, data_dir=data_dir)
    described = plan.to_list()
    arm = ablation_specs(plan.runs, described) if ablate_memory else []
    return [_AllocationSpec(s, d) for s, d in [*zip(plan.runs, described), *arm]], list(plan.warnings)


def plan_memory(family: str, budget: float, slots: Sequence[int], *,
                data_dir: Optional[str] = None) -> tuple[list[MemorySpec], list[str]]:
    """Run specs of an "infinite memory" sweep (sized by ``sweeps.budget.solve_memory_points``),
    each with its cost estimates."""
    from sweeps.budget import estimate_resources, solve_memory_points
    from sweeps.families import load_family

    fam = load_family(family)
    out = []
    for (spec, exact_slots), requested in zip(solve_memory_points(fam, budget, slots, data_dir=data_dir),
                                              sorted(int(s) for s in slots)):
        res = estimate_resources(spec, fam.hardware)
        est = {"hardware": fam.hardware.name, "n_gpus": fam.hardware.n_gpus, "mfu": fam.hardware.mfu,
               "gpu_hours": res.gpu_hours, "mem_per_gpu_gib": res.total_gib, "fits": res.fits}
        out.append(MemorySpec(spec, exact_slots, requested, est))
    return out, []


# --------------------------------------------------------------------------------------------------
# Collecting: results table, fit, figures, summary.json, W&B
# --------------------------------------------------------------------------------------------------
def _fit_inputs(records: Sequence[RunRecord], x_name: str) -> tuple[list, list, list, list[dict]]:
    """(x, seed, loss) of completed runs that the fit may use, and the excluded ones with their reason.
    Allocation sweeps fit on the run's effective rho when the planner recorded one."""
    xs, seeds, losses, excluded = [], [], [], []
    for r in records:
        if r.status != COMPLETED or r.val_loss is None:
            continue
        why = getattr(r, "excluded", None)
        if why:
            excluded.append({"run_name": r.run_name, "rho": r.rho, "seed": r.seed, "reason": why})
            continue
        x = getattr(r, x_name)
        if x_name == "rho" and getattr(r, "rho_eff", None) is not None:
            x = r.rho_eff
        xs.append(x), seeds.append(r.seed), losses.append(r.val_loss)
    return xs, seeds, losses, excluded


def _points(records: Sequence[RunRecord], fit: Any) -> list[dict]:
    """Every record's fields (spec aside) plus the fit's noise estimate and the seeds finished at its rho."""
    per_rho: dict[float, int] = {}
    for r in records:
        if r.status == COMPLETED and r.val_loss is not None and not getattr(r, "excluded", None):
            per_rho[round(r.rho, 9)] = per_rho.get(round(r.rho, 9), 0) + 1
    sigma = getattr(fit, "sigma", None)
    out = []
    for r in records:
        d = {k: v for k, v in r.as_dict().items() if k != "spec"}
        d["seeds_at_rho"] = per_rho.get(round(r.rho, 9), 0)
        d["noise_sd"] = sigma
        out.append(d)
    return out


def summarize(sweep: Sweep, records: Sequence[RunRecord], *, n_boot: int = 4000, level: float = 0.95,
              rho_ref: float = 1.0, wandb_mode: str = "offline", wandb_project: str = "isoflop-engram",
              wandb_entity: Optional[str] = None, emit: Callable[[str], None] = print) -> dict:
    """Fit what the completed runs allow and write results.parquet, summary.json, the figure and the W&B
    summary run into the sweep directory. Returns the summary."""
    from sweeps.fit import fit_power_law, fit_u_curve, verdict_line
    from sweeps.plots import CurveData, plot_memory_scaling, plot_u_curves
    from sweeps.wandb_summary import log_summary

    write_results(records, sweep.dir / "results.parquet")
    x_name = "slots" if sweep.mode == MEMORY else "rho"
    xs, seeds, losses, excluded = _fit_inputs(records, x_name)
    fit, fit_error, figure, curve = None, None, None, None
    data = CurveData(f"{sweep.family} {budget_tag(sweep.budget)} FLOPs", xs, losses, len(records) - len(xs))
    if sweep.mode == MEMORY:
        try:
            fit = fit_power_law(xs, losses, n_boot=n_boot, level=level)
            curve = {"x": sorted(xs), "loss": [float(v) for v in fit.predict(sorted(xs))], "x_name": "slots"}
        except ValueError as e:  # too few completed points for the fit
            fit_error = str(e)
            emit(f"[{sweep.name}] no fit: {fit_error}")
        if xs:
            figure = plot_memory_scaling(data, fit, sweep.dir / "memory_scaling.png")
    else:
        fit = fit_u_curve(xs, losses, seeds, rho_ref=rho_ref, n_boot=n_boot, level=level)
        data.outliers = list(fit.outliers)
        if fit.verdict == "insufficient":
            fit_error = fit.reason
        if xs:
            figure = plot_u_curves([(data, fit)], sweep.dir / "u_curve.png", title=f"{sweep.name}: loss vs rho")
        curve = {"x": fit.band_rho, "loss": [float(v) for v in fit.predict(fit.band_rho)], "lo": fit.band_lo,
                 "hi": fit.band_hi, "x_name": "rho"} if fit.band_rho else None
        emit(f"[{sweep.name}] {verdict_line(fit.to_dict())}")
    counts = {s: sum(r.status == s for r in records) for s in (COMPLETED, FAILED, DIVERGED, PENDING, INTERRUPTED,
                                                                RUNNING)}
    fit_dict = fit.to_dict() if fit is not None else None
    summary = {"sweep": sweep.name, "mode": sweep.mode, "family": sweep.family, "budget": sweep.budget,
               "points": _points(records, fit), "fit": fit_dict, "fit_error": fit_error, "excluded": excluded,
               "counts": counts, "results_table": "results.parquet", "figures": [figure.name] if figure else [],
               "warnings": sweep.warnings}
    wandb_dir = None
    try:
        wandb_dir = log_summary(
            sweep.dir, sweep.name, records, fit_dict, curve, [figure] if figure else [],
            {"sweep": sweep.name, "mode": sweep.mode, "family": sweep.family, "budget": sweep.budget,
             "n_runs": len(records)}, project=wandb_project, entity=wandb_entity, mode=wandb_mode)
    except Exception as e:  # W&B trouble must not lose the sweep's results
        emit(f"[{sweep.name}] W&B summary not logged: {type(e).__name__}: {e}")
    state = sweep.dir / "wandb_summary.json"
    if wandb_dir is None and state.exists():  # unchanged since it was last logged: point at that run
        wandb_dir = json.loads(state.read_text()).get("location")
    if wandb_dir:
        summary["wandb_summary_dir"] = wandb_dir
    summary["ablation"] = ablation_summary(records, level=level, emit=emit)  # control arm (sweeps/ablation.py)
    _write_json(sweep.dir / "summary.json", json_safe(summary))
    return summary


def overlay_allocation_sweeps(out: Path, path: Optional[Path] = None) -> Optional[Path]:
    """Every allocation sweep under ``out`` with a summary, in one figure (``<out>/u_curves.png``); with two
    or more budgets, also rho* and the gain against budget (``<out>/trend.png``) and their fitted trend in
    ``<out>/summary.json``."""
    from sweeps.fit import UCurveFit, fit_trend
    from sweeps.plots import CurveData, plot_trend, plot_u_curves

    curves = []
    for summary_path in sorted(Path(out).glob("*/summary.json"), key=lambda p: p.parent.name):
        s = json.loads(summary_path.read_text())
        if s.get("mode") != ALLOCATION:
            continue
        done = [p for p in s["points"] if p["status"] == COMPLETED and p["val_loss"] is not None
                and not p.get("excluded")]  # as in the fit: off-budget runs and the ablation arm stay off
        if not done:
            continue
        fit = UCurveFit.from_dict(s["fit"]) if s.get("fit") else None
        data = CurveData(f"{s['family']} {budget_tag(s['budget'])} FLOPs",
                         [p.get("rho_eff") or p["rho"] for p in done], [p["val_loss"] for p in done],
                         len(s["points"]) - len(done))
        curves.append((s["budget"], s["family"], data, fit, s.get("fit")))
    if not curves:
        return None
    curves.sort(key=lambda c: c[0])
    figure = plot_u_curves([(d, f) for _, _, d, f, _ in curves], path or Path(out) / "u_curves.png",
                           title="Allocation sweeps: loss vs rho, all budgets")
    budgets = [c[0] for c in curves]
    if len(set(budgets)) >= 2:
        trend = fit_trend(budgets, [c[4] for c in curves])
        trend["families"] = sorted({c[1] for c in curves})
        if len(trend["points"]) >= 2:
            trend["figure"] = plot_trend(trend, Path(out) / "trend.png").name
        _write_json(Path(out) / "summary.json", json_safe({"trend": trend, "u_curves": figure.name}))
    return figure


def _power_report(sweep: Sweep, noise: Optional[float]) -> list[str]:
    """Dry-run power lines: from ``noise`` or from finished sweeps of the same family under the output root."""
    from sweeps.power import noise_from_earlier, power_lines

    n_rho = len({round(r.rho, 9) for r in sweep.runs})
    n_seeds = len({r.seed for r in sweep.runs})
    if noise is not None:
        return power_lines(noise, "given", n_rho, n_seeds)
    earlier = noise_from_earlier(sweep.dir.parent, sweep.family)
    if earlier is None:
        return power_lines(None, "", n_rho, n_seeds)
    return power_lines(earlier[0], f"earlier sweeps' ({earlier[1]} dof)", n_rho, n_seeds)


def describe_plan(sweep: Sweep, noise: Optional[float] = None) -> str:
    """The dry-run view: every run's shape, cost and state, the command of the first one and, for an
    allocation sweep, the smallest gain it could detect (noise sd ``noise``, else from earlier sweeps)."""
    import shlex
    import sys

    from rundir.config import trainer_args
    from sweeps.runconfig import TRAIN_SCRIPT

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
                 f"{shlex.join([sys.executable, TRAIN_SCRIPT, *trainer_args(first.run_dir)])}")
    if sweep.mode == ALLOCATION:
        lines += _power_report(sweep, noise)
    return "\n".join(lines)


def write_plan(sweep: Sweep) -> None:
    sweep.dir.mkdir(parents=True, exist_ok=True)
    _write_json(sweep.dir / "plan.json", json_safe({
        "sweep": sweep.name, "mode": sweep.mode, "family": sweep.family, "budget": sweep.budget,
        "warnings": sweep.warnings,
        "runs": [{"name": r.name, "run_dir": str(r.run_dir), "rho": r.rho, "seed": r.seed, "slots": r.slots,
                  "config": r.config, "spec": r.spec} for r in sweep.runs]}))
