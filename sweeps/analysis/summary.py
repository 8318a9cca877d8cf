"""Collecting a sweep: its results table, the fit, figures, ``summary.json`` and the W&B summary run, and
the overlay of every allocation sweep under an output root (split from :mod:`sweeps.execution.driver`, which plans
and names the runs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from sweeps.analysis.ablation_fit import ablation_summary
from sweeps.execution.sweep import ALLOCATION, MEMORY, Sweep, budget_tag
from sweeps.analysis.fit import json_safe
from sweeps.execution.results import (COMPLETED, DIVERGED, FAILED, INTERRUPTED, PENDING, RUNNING, RunRecord,
                                      write_results)
from rundir.files import write_record


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
    from sweeps.analysis.fit import fit_power_law, fit_u_curve, verdict_line
    from sweeps.analysis.plots import CurveData, plot_memory_scaling, plot_u_curves
    from sweeps.analysis.wandb_summary import log_summary

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
    summary["ablation"] = ablation_summary(records, level=level, emit=emit)  # control arm (sweeps/planning/ablation.py)
    write_record(sweep.dir / "summary.json", json_safe(summary))
    return summary


def overlay_allocation_sweeps(out: Path, path: Optional[Path] = None) -> Optional[Path]:
    """Every allocation sweep under ``out`` with a summary, in one figure (``<out>/u_curves.png``); with two
    or more budgets, also rho* and the gain against budget (``<out>/trend.png``) and their fitted trend in
    ``<out>/summary.json``."""
    from sweeps.analysis.fit import UCurveFit, fit_trend
    from sweeps.analysis.plots import CurveData, plot_trend, plot_u_curves

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
        write_record(Path(out) / "summary.json", json_safe({"trend": trend, "u_curves": figure.name}))
    return figure
