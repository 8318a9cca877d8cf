"""The gpu family plans its standard budgets on one GPU, and a bare budget picks the family whose range holds it."""
from __future__ import annotations

import pytest

from sweeps.planning.autofamily import family_for_budget
from sweeps.planning.budget import solve_plan
from sweeps.planning.families import load_family


@pytest.mark.parametrize("budget,rung", [(1e17, "g00"), (3e17, "g0"), (1e18, "g0")])
def test_gpu_family_standard_budgets_fit_one_gpu(budget, rung):
    fam = load_family("gpu")
    plan = solve_plan(fam, budget, [1.0, 0.75])
    base, engram = plan.runs
    assert base.rung == engram.rung == rung
    assert base.model["vocab_size"] == 129280 and base.model["moe"]["top_k"] == 6
    assert base.model["moe"]["n_shared_experts"] == 2
    assert engram.engram_params > 0 and base.engram_params == 0
    for run in plan.runs:
        assert abs(run.train_flops_error) < fam.tolerances.train_flops, run.train_flops_error
        assert 2.0 <= run.tokens_per_active_param <= 60.0, run.tokens_per_active_param
        hours = run.train_flops / (0.4 * 989e12) / 3600  # one H100 at 40% MFU: minutes, not hours
        assert hours < 1.0, f"{run.name} would take {hours:.2f} h on one GPU"


@pytest.mark.parametrize("budget,family", [(6e12, "cpu"), (3e17, "gpu"), (1e20, "paper")])
def test_budget_picks_the_family_whose_range_holds_it(budget, family):
    assert family_for_budget(budget) == family


def test_budget_outside_every_family_names_each_refusal():
    with pytest.raises(ValueError, match=r"no family plans a budget of 1e\+16.*cpu:.*gpu:.*paper:"):
        family_for_budget(1e16)


def test_auto_family_names_its_pick_and_refuses_mixed_budgets():
    from sweeps.planning.autofamily import resolve_family

    assert resolve_family("cpu", [1e20]) == ("cpu", None)  # a named family is taken as given
    name, line = resolve_family("auto", [3e17, 1e18])
    assert name == "gpu" and "family gpu (auto" in line and "--family" in line
    with pytest.raises(ValueError, match=r"different families \(6e\+12 -> cpu, 3e\+17 -> gpu\)"):
        resolve_family("auto", [6e12, 3e17])
