"""Run directories written before runs carried their own config.yaml (a committed study's finished
points: final.json, run.json, sweep_run.json with override strings, hydra/config.yaml) stay finished.

The fixture is a real run's files (cpu family, 3e12 FLOPs, rho 0.8, seed 0) as the sweep driver and
the trainer wrote them at commit db87788, before the run configuration became one resolved file."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from sweeps.execution.driver import build_sweep, plan_allocation
from sweeps.execution.runloop import check_plan_unchanged, run_sweeps
from sweeps.execution.launchers import Launcher

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_run_cpu-3e12_rho0.80-seed0"


class NeverLaunch(Launcher):
    """A launcher that fails the test if the driver launches anything."""

    name = "never"
    capacity = 1

    def launch(self, req):
        raise AssertionError(f"the driver launched {req.name}: a finished legacy run must not train again")


def legacy_sweep(tmp_path: Path, **kwargs):
    specs, warnings = plan_allocation("cpu", 3e12, [0.8])
    sweep = build_sweep(specs, out=tmp_path, family="cpu", budget=3e12, seeds=[0], wandb_mode="offline",
                        wandb_project="isoflop-engram", warnings=warnings, **kwargs)
    shutil.copytree(LEGACY, sweep.runs[0].run_dir)
    return sweep


def test_legacy_finished_run_is_finished_under_the_same_plan(tmp_path):
    sweep = legacy_sweep(tmp_path)
    assert sweep.runs[0].run_dir.name == "rho0.80-seed0"
    check_plan_unchanged(sweep)  # the plan it was launched under equals today's
    [records] = run_sweeps([sweep], NeverLaunch(), poll_s=0.01, emit=lambda line: None)
    assert records[0].status == "completed" and records[0].val_loss == pytest.approx(6.285826206207275)


def test_legacy_run_under_a_changed_plan_is_refused_naming_the_key(tmp_path):
    sweep = legacy_sweep(tmp_path, settings=["optim.lr=0.01"])
    with pytest.raises(ValueError, match=r"plan changed since these runs were launched: rho0.80-seed0 \(optim.lr\)"):
        check_plan_unchanged(sweep)


def test_legacy_record_is_hydras_resolved_config():
    from rundir.config import read_run_config

    cfg = read_run_config(LEGACY)  # no config.yaml: hydra/config.yaml, interpolations resolved
    assert cfg["optim"]["groups"]["matrix"]["weight_decay"] == 0.1 and cfg["train"]["train_tokens"] == 228608
    assert cfg["model"]["moe"]["n_routed_experts"] == 20 and "hydra" not in cfg
