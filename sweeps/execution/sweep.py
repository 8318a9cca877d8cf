"""A sweep and its runs, as records: what to run where, and the names that make re-running the same
command find its own runs. Below the driver (which plans them) and the run loop (which launches them)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rundir.outcome import launch_attempts, read_outcome
from sweeps.execution.results import RunRecord, spec_json

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
