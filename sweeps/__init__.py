"""Iso-FLOP allocation sweeps: families (conf/family/*.yaml), the budget solver, planning, fitting.

Modules come in four groups, each importing only its own and the ones before it (tests/unit/test_layers.py):
planning (families, solver, run specs, resolved run configs) -> execution (run directories, launchers, the
run loop, the results table) -> analysis (fits with intervals, plots, summaries) -> commands (the CLIs).

The budget math lives in :mod:`sweeps.budget` (which assembles backbone, solver, runspec, resources
and memory_points); :mod:`sweeps.families` loads family configs and
``python -m sweeps.plan`` prints a plan. Names below are imported lazily so that light modules of
this package (fits, plots, results) do not pull in torch.
"""
from __future__ import annotations

from core.lazy import lazy_exports

_EXPORTS = {
    "Family": "sweeps.families", "load_family": "sweeps.families", "available_families": "sweeps.families",
    "Plan": "sweeps.budget", "RunSpec": "sweeps.budget", "Resources": "sweeps.budget",
    "solve_plan": "sweeps.budget", "solve_point": "sweeps.budget", "select_backbone": "sweeps.budget",
    "experts_for_rho": "sweeps.budget", "estimate_resources": "sweeps.budget",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("sweeps", _EXPORTS)
