"""The fit inside the sweep summary: insufficient sweeps, excluded runs, effective rho, the trend across
budgets in the top-level summary.json, and the dry run's power report."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional

import pytest

from sweep_contract_trainer import ContractSpec
from sweeps.execution.driver import build_sweep
from sweeps.analysis.planview import describe_plan
from sweeps.analysis.summary import overlay_allocation_sweeps, summarize
from sweeps.execution.results import RunRecord


@dataclass
class IsoRecord(RunRecord):
    """RunRecord with the optional fields the iso-FLOP planner adds (issue 10): the fit must use them."""

    rho_eff: Optional[float] = None
    excluded: Optional[str] = None


def make(out, budget=1e9, rhos=(1.0, 0.8, 0.6, 0.4, 0.2), seeds=(0,)):
    return build_sweep([ContractSpec(r) for r in rhos], out=out, family="contract", budget=budget, seeds=seeds,
                       wandb_mode="disabled")


def records(sweep, loss, done=None, extra=None):
    """RunRecords of a sweep; runs whose rho is in ``done`` are completed with loss(rho, seed)."""
    out = []
    for run in sweep.runs:
        ok = done is None or run.rho in done
        rec = IsoRecord(sweep.name, "allocation", "contract", sweep.budget, run.rho, run.seed, run.name,
                        str(run.run_dir), "completed" if ok else "failed", val_loss=loss(run.rho, run.seed) if ok
                        else None, reason=None if ok else "injected")
        for k, v in (extra or {}).get(run.rho, {}).items():
            setattr(rec, k, v)
        out.append(rec)
    return out


def u_loss(rho, seed):
    return 3.0 + 0.3 * (rho - 0.75) ** 2 + 0.002 * math.sin(7 * rho + 3 * seed)


@pytest.mark.parametrize("done", [(), (0.8,), (1.0, 0.6)])
def test_zero_one_or_two_finished_rho_give_insufficient_with_a_reason(tmp_path, done):
    sweep = make(tmp_path)
    summary = summarize(sweep, records(sweep, u_loss, done), n_boot=200, wandb_mode="disabled", emit=lambda m: None)
    fit = summary["fit"]
    assert fit["verdict"] == "insufficient" and f"{len(done)} finished rho" in fit["reason"]
    assert fit["rho_star"] is None and fit["rho_star_ci"] == [None, None]
    assert json.loads((sweep.dir / "summary.json").read_text())["fit"]["verdict"] == "insufficient"


def test_excluded_runs_are_left_out_and_effective_rho_is_fitted(tmp_path):
    sweep = make(tmp_path, seeds=(0, 1))
    extra = {0.8: {"rho_eff": 0.786}, 0.2: {"excluded": "spent FLOPs 0.7% over the budget"}}
    lines = []
    summary = summarize(sweep, records(sweep, u_loss, extra=extra), n_boot=300, wandb_mode="disabled",
                        emit=lines.append)
    fit = summary["fit"]
    assert fit["knots_rho"] == [0.4, 0.6, 0.786, 1.0] and fit["n_points"] == 8
    assert [e["reason"] for e in summary["excluded"]] == ["spent FLOPs 0.7% over the budget"] * 2
    point = next(p for p in summary["points"] if p["rho"] == 0.8)
    assert point["rho_eff"] == 0.786 and "spec" not in point
    assert any(ln.startswith(f"[{sweep.name}] verdict: ") for ln in lines)


def test_two_budgets_write_the_trend_to_the_top_level_summary(tmp_path):
    for budget, shift in ((1e9, 0.0), (1e10, 0.05)):
        sweep = make(tmp_path, budget=budget, seeds=(0, 1, 2))
        summarize(sweep, records(sweep, lambda r, s: u_loss(r - shift, s)), n_boot=300, wandb_mode="disabled",
                  emit=lambda m: None)
    assert overlay_allocation_sweeps(tmp_path) == tmp_path / "u_curves.png"
    top = json.loads((tmp_path / "summary.json").read_text())["trend"]
    assert [p["budget"] for p in top["points"]] == [1e9, 1e10]
    slope = top["rho_star"]["slope_per_decade"]
    assert slope == pytest.approx(0.05, abs=0.02) and top["rho_star"]["slope_ci"][0] < slope
    assert (tmp_path / "trend.png").stat().st_size > 10_000


def test_dry_run_reports_power_from_the_given_or_earlier_noise(tmp_path):
    sweep = make(tmp_path, seeds=(0, 1))
    text = describe_plan(sweep, noise=0.01)
    assert "smallest gain detectable at 80% power" in text and "seeds per rho for a 0.014-nat gain" in text
    assert "no noise level known" in describe_plan(sweep)
    summarize(sweep, records(sweep, u_loss), n_boot=200, wandb_mode="disabled", emit=lambda m: None)
    assert "earlier sweeps'" in describe_plan(make(tmp_path, budget=1e10))


@pytest.mark.parametrize("args,msg", [(["--noise", "-0.01"], "--noise must be a positive"),
                                      (["--n-boot", "10"], "--n-boot must be >= 100")])
def test_bad_power_or_fit_flags_are_refused_before_any_run(tmp_path, capsys, args, msg):
    from sweeps.run import main

    assert main(["--budget", "6e12", "--dry-run", "--out", str(tmp_path), *args]) == 2
    assert msg in capsys.readouterr().err and not any(tmp_path.iterdir())
