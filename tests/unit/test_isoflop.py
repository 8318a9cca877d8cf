"""Iso-FLOP at every scale: the planner solves tokens to the sequence, the trainer trains exactly those
tokens (a short last step, gradient re-weighted), and the sweep's records carry planned and spent
FLOPs, the per-point figures and the exclusion of a point that missed its budget."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from assembly import build_model
from models import ModelConfig
from sweeps.planning.budget import solve_plan
from sweeps.planning.families import load_family
from sweeps.execution.results import FLOPS_EXCLUDE, SCHEMA, RunRecord, read_results, spec_json, write_results
from sweeps.planning.solver import sequences_for_budget
from train.data import TrainBatches, run_length

CPU_RHOS = [1.0, 0.8, 0.6, 0.4, 0.2]
PAPER_RHOS = [1.0, 0.8, 0.6, 0.4]
RUN_TOL, SWEEP_TOL = 0.001, 0.002  # the limits: planned vs spent, and every run vs the budget


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def standard_plans():
    """Every standard budget of the cpu family and the paper's 2e20 / 6e20 points."""
    plans = []
    for name, rhos in (("cpu", CPU_RHOS), ("paper", PAPER_RHOS)):
        family = load_family(name)
        assert family.budgets
        plans += [solve_plan(family, b, rhos) for b in family.budgets]
    return plans


class ArraySplit:
    def __init__(self, n: int):
        self.tokens = np.arange(n, dtype=np.int64)
        self.n_tokens = n

    def read(self, start: int, length: int) -> np.ndarray:
        return self.tokens[start:start + length]


# ---- the planner ----------------------------------------------------------------------------------
def test_every_standard_budget_is_iso_flop_and_the_trainer_trains_the_planned_tokens(standard_plans):
    lines = []
    for plan in standard_plans:
        for run in plan.runs:
            micro = int(run.train["micro_batch_size"])
            steps, last = run_length(run.train_tokens, run.seq_len, run.global_batch_size, micro)
            spent = ((steps - 1) * run.global_batch_size + last) * run.seq_len * run.flops_per_token
            planned_vs_spent = spent / run.train_flops - 1
            lines.append(f"{run.name}: planned {run.train_flops:.6g} ({run.train_flops_error:+.4%} of budget), "
                         f"spent-planned {planned_vs_spent:+.2e}, P_act {run.active_params_error:+.2%}")
            assert (steps, last) == (run.steps, run.last_step_sequences), run.name
            assert abs(planned_vs_spent) <= RUN_TOL, lines[-1]
            assert abs(spent / plan.budget - 1) <= SWEEP_TOL, lines[-1]
    print("\n".join(lines))


def test_active_params_spread_is_recorded_and_within_the_family_tolerance(standard_plans):
    for plan in standard_plans:
        tol = plan.family.tolerances.active_params
        errors = {run.rho: run.active_params_error for run in plan.runs}
        print(f"{plan.family.name} {plan.budget:.3g}: P_act vs rho=1 {errors}")
        assert errors[1.0] == 0.0
        assert all(abs(e) <= tol for e in errors.values()), (errors, tol)
        if plan.family.name == "paper":
            assert all(abs(e) <= 0.01 for e in errors.values()), errors  # within 1% without narrowing
        for run in plan.runs:
            assert run.to_dict()["active_params_error"] == run.active_params_error


def test_per_point_figures_come_from_the_built_model(standard_plans):
    plan = standard_plans[0]
    for run in plan.runs:
        assert run.tokens_per_active_param == pytest.approx(run.train_tokens / run.active_params)
        assert run.tokens_per_total_param == pytest.approx(run.train_tokens / run.total_params)
        eng = run.model["engram"]
        if eng is None:
            assert run.lookups_per_row is None
            continue
        head_dim = eng["embed_dim_per_ngram"] // eng["heads_per_ngram"]
        cfg = dict(run.model, engram={**eng, "tokenizer": None, "pad_id": None})
        with torch.device("meta"):
            net = build_model(ModelConfig.from_dict(cfg))
        rows = sum(sum(blk.memory.tables.sizes) for blk in net.layers if blk.memory is not None)
        assert rows * head_dim == run.engram_params
        per_token = len(eng["layer_ids"]) * (eng["max_ngram"] - 1) * eng["heads_per_ngram"]
        assert run.lookups_per_row == pytest.approx(run.train_tokens * per_token / rows)


def test_sequence_solve_meets_the_budget_with_a_splittable_last_step():
    rng = np.random.default_rng(7)
    for _ in range(2000):
        batch = int(rng.choice([8, 16, 64, 512]))
        micro = int(rng.choice([d for d in (1, 2, 4, 8) if batch % d == 0]))
        fpt, seq = float(rng.uniform(1e6, 1e10)), int(rng.choice([64, 256, 4096]))
        want = float(rng.uniform(batch // micro, 5000))  # sequences the budget buys (at least one step)
        n = sequences_for_budget(want * fpt * seq, fpt, seq, batch, micro)
        rest = n % batch
        assert rest == 0 or rest >= batch // micro
        assert n >= batch // micro
        assert abs(n - want) <= max(0.5, (batch // micro) / 2) + 1e-9, (n, want, batch, micro)
    with pytest.raises(ValueError, match="not a multiple"):
        sequences_for_budget(1e12, 1e6, 64, 10, 4)


# ---- the trainer's short last step ------------------------------------------------------------------
def test_run_length_rounds_up_to_what_the_trainer_can_run():
    assert run_length(10 * 64 * 8, 64, 8, 4) == (10, 8)  # whole steps
    assert run_length((9 * 8 + 3) * 64, 64, 8, 4) == (10, 3)  # short last step
    assert run_length((9 * 8 + 1) * 64, 64, 8, 4) == (10, 2)  # at least one sequence per slot (2 slots)
    assert run_length(9 * 8 * 64 + 1, 64, 8, 4) == (10, 2)  # a partial sequence rounds up
    with pytest.raises(ValueError, match="positive"):
        run_length(0, 64, 8, 4)


@pytest.mark.parametrize("world,micro", [(1, 4), (2, 2), (2, 4), (4, 2)])
def test_short_last_step_covers_its_samples_once_and_weights_its_slots(world, micro):
    split, batch, steps, last = ArraySplit(50_000), 8, 5, 5
    ranks = [TrainBatches(split, 16, micro, batch, r, world, 3, steps, last) for r in range(world)]
    accum = ranks[0].accum_steps
    for step, expected in ((steps - 2, batch), (steps - 1, last)):
        ids = np.concatenate([b.sample_ids(step, m) for m in range(accum) for b in ranks])
        assert sorted(ids.tolist()) == list(range(step * batch, step * batch + expected))
        for b in ranks:  # DeepSpeed's 1 / (accum x world) per slot, re-weighted: each sequence counts 1 / expected
            for m in range(accum):
                share = b.loss_weight(step, m) / (accum * world)
                assert share == pytest.approx(len(b.sample_ids(step, m)) / expected)
    assert ranks[0].tokens_through(steps) == ((steps - 1) * batch + last) * 16
    assert ranks[0].tokens_through(steps - 1) == (steps - 1) * batch * 16
    with pytest.raises(ValueError, match="last step"):
        TrainBatches(split, 16, micro, batch, 0, world, 3, steps, batch // micro - 1)


@pytest.mark.parametrize("world,micro", [(1, 2), (2, 2)])
def test_short_step_gradient_is_the_mean_over_its_sequences(world, micro):
    """DeepSpeed's arithmetic (each micro-batch's mean loss / accumulation steps, summed, then averaged
    over ranks) with the trainer's weights gives the gradient of the mean over the step's sequences."""
    torch.manual_seed(0)
    split, batch, steps, last, seq = ArraySplit(10_000), 8, 3, 5, 8
    w = torch.randn(seq, requires_grad=True)

    def loss_of(x):  # a mean over sequences, like the model's cross-entropy
        return ((x.float() / 1000 * w).sum(-1) ** 2).mean()

    ranks = [TrainBatches(split, seq, micro, batch, r, world, 1, steps, last) for r in range(world)]
    accum = ranks[0].accum_steps
    total = torch.zeros(seq)
    for b in ranks:
        for m in range(accum):
            x, _ = b.get(steps - 1, m)
            (g,) = torch.autograd.grad(loss_of(x) * b.loss_weight(steps - 1, m) / accum, w)
            total += g / world
    all_x = torch.cat([b.get(steps - 1, m)[0] for b in ranks for m in range(accum)])
    assert len(all_x) == last
    (want,) = torch.autograd.grad(loss_of(all_x), w)
    torch.testing.assert_close(total, want)


# ---- the sweep's records ----------------------------------------------------------------------------
def _record(spec: dict, budget: float, mode: str = "allocation", **outcome) -> RunRecord:
    return RunRecord("s", mode, "cpu", budget, spec["rho"], 0, spec["name"], "/r", "completed", val_loss=3.0,
                     spec=spec_json(spec), **outcome)


def test_records_carry_planned_and_spent_flops_and_flag_a_missed_budget(standard_plans, tmp_path):
    plan = standard_plans[0]
    engram = next(r for r in plan.to_list() if r["rho"] < 1)
    run = next(r for r in plan.runs if r.rho == engram["rho"])
    exact = _record(engram, plan.budget, tokens=run.train_tokens, train_flops=run.train_flops,
                    active_params=run.active_params, total_params=run.total_params)
    assert exact.planned_flops == run.train_flops and exact.rho_eff == run.rho_effective
    assert exact.flops_error == pytest.approx(run.train_flops_error) and exact.excluded is None
    assert exact.tokens_per_active_param == pytest.approx(run.tokens_per_active_param)
    assert exact.tokens_per_total_param == pytest.approx(run.tokens_per_total_param)
    assert exact.lookups_per_row == pytest.approx(run.lookups_per_row)
    assert exact.active_params_error == run.active_params_error
    # a run that trained whole steps of the old plan (up to half a step over) stays in; 1% over is out
    over = _record(engram, plan.budget, tokens=round(run.train_tokens * 1.01), train_flops=plan.budget * 1.01)
    assert over.flops_error == pytest.approx(0.01) and "+1.00% from the budget" in over.excluded
    assert over.lookups_per_row == pytest.approx(run.lookups_per_row * 1.01, rel=1e-5)
    assert _record(engram, plan.budget, train_flops=plan.budget * (1 + FLOPS_EXCLUDE * 0.9)).excluded is None
    assert _record(engram, plan.budget, "memory", train_flops=plan.budget * 1.01).excluded is None
    pending = RunRecord("s", "allocation", "cpu", plan.budget, 0.8, 0, "n", "/r", spec=spec_json(engram))
    assert pending.flops_error is None and pending.excluded is None and pending.planned_flops == run.train_flops
    back = read_results(write_results([exact, over, pending], tmp_path / "results.parquet"))
    assert back == [exact, over, pending]


def test_results_tables_written_before_the_iso_columns_still_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    old = [n for n in SCHEMA.names if n not in ("rho_eff", "planned_flops", "flops_error", "excluded",
                                                "tokens_per_active_param", "tokens_per_total_param",
                                                "lookups_per_row", "active_params_error")]
    row = {n: None for n in old}
    row.update(sweep="s", mode="allocation", family="f", budget=1e13, rho=0.8, seed=0, run_name="n", run_dir="/r",
               status="completed", attempts=1, spec=json.dumps({"train_flops": 1e13, "rho_effective": 0.79}),
               train_flops=1.004e13)
    pq.write_table(pa.Table.from_pylist([row], schema=pa.schema([SCHEMA.field(n) for n in old])),
                   tmp_path / "old.parquet")
    (rec,) = read_results(tmp_path / "old.parquet")
    assert rec.rho_eff == 0.79 and rec.planned_flops == 1e13
    assert math.isclose(rec.flops_error, 0.004) and rec.excluded is None


