"""Iso-FLOP allocation sweeps: families (conf/family/*.yaml), the budget solver, planning, fitting.

Three subpackages and the commands, each importing only its own and the ones before it
(tests/unit/test_layers.py): ``sweeps.planning`` (families, solver, run specs, resolved run configs) ->
``sweeps.execution`` (run directories, launchers, the run loop, the results table) -> ``sweeps.analysis``
(fits with intervals, plots, summaries) -> the commands in ``sweeps/`` itself (run, plan, study, demo).

The budget math lives in :mod:`sweeps.planning.budget` (which assembles backbone, solver, runspec, resources
and memory_points); :mod:`sweeps.planning.families` loads family configs and
``python -m sweeps.plan`` prints a plan. Names below are imported lazily so that light modules of
this package (fits, plots, results) do not pull in torch.
"""
from __future__ import annotations

from core.lazy import lazy_exports

_FAMILIES, _BUDGET = "sweeps.planning.families", "sweeps.planning.budget"
_EXPORTS = {
    "Family": _FAMILIES, "load_family": _FAMILIES, "available_families": _FAMILIES,
    "Plan": _BUDGET, "RunSpec": _BUDGET, "Resources": _BUDGET, "solve_plan": _BUDGET, "solve_point": _BUDGET,
    "select_backbone": _BUDGET, "experts_for_rho": _BUDGET, "estimate_resources": _BUDGET,
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("sweeps", _EXPORTS)
