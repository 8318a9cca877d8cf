"""Budget solver: iso-parameter / iso-FLOP invariants, counts of instantiated models, the paper's
published sweep points, bad input, the resolved run configs and the plan CLI."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from assembly import build_model
from core.param_groups import group_of
from models import ModelConfig
from sweeps.planning.budget import (Plan, estimate_resources, experts_for_rho, select_backbone, solve_backbone,
                           solve_plan)
from sweeps.planning.families import Rung, family_from_dict, load_family
from sweeps.plan import main as plan_main

REPO = Path(__file__).resolve().parents[2]
REQUIRED_KEYS = ("rho", "total_params", "active_params", "n_routed_experts", "top_k", "engram_params",
                 "flops_per_token", "train_tokens", "train_flops")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cpu():
    return load_family("cpu")


@pytest.fixture(scope="module")
def paper():
    return load_family("paper")


def budget_range(family) -> tuple[float, float]:
    """Budgets the family accepts: from its smallest rung at the minimum tokens per active parameter
    to its largest at the maximum (the solver's own bounds)."""
    rule = family.budget_rule
    bbs = [solve_backbone(family, i) for i in range(len(family.rungs))]
    cost = [b.measured.active * b.measured.train_flops for b in bbs]
    return min(cost) * rule.min_tokens_per_active_param, max(cost) * rule.max_tokens_per_active_param


def check_plan_invariants(plan: Plan) -> None:
    tol = plan.family.tolerances
    ref = plan.backbone.measured
    for run in plan.runs:
        assert abs(run.total_params / ref.total - 1) <= tol.total_params
        assert abs(run.train_flops / plan.budget - 1) <= tol.train_flops
        assert abs(run.flops_per_token / ref.train_flops - 1) <= tol.flops_drift
        assert run.train_flops == pytest.approx(run.flops_per_token * run.train_tokens, rel=1e-12)
        assert run.train_tokens == run.train_sequences * run.seq_len
        assert (run.steps - 1) * run.global_batch_size + run.last_step_sequences == run.train_sequences
        slots = run.global_batch_size // int(run.train.get("micro_batch_size", 1))
        assert slots <= run.last_step_sequences <= run.global_batch_size  # the trainer can split it
        assert abs(run.active_params / ref.active - 1) <= tol.active_params
        assert run.active_params_error == pytest.approx(run.active_params / ref.active - 1)
        assert run.top_k <= run.n_routed_experts <= plan.backbone.n_routed
        if run.rho == 1.0:
            assert run.model["engram"] is None and run.engram_params == 0
            assert run.n_routed_experts == plan.backbone.n_routed
        else:
            assert run.n_routed_experts < plan.backbone.n_routed and run.engram_params > 0
            # the tables fill what the removed experts and the Engram projections leave
            removed = (plan.backbone.n_routed - run.n_routed_experts) * plan.backbone.expert_sparse_params
            assert run.engram_params + run.engram_dense_params == pytest.approx(
                removed, abs=tol.total_params * ref.total)
        sparse = run.total_params - run.active_params
        assert run.rho_effective == pytest.approx(
            (run.n_routed_experts - run.top_k) * plan.backbone.expert_sparse_params / sparse)
        # integer experts (multiples of the expert-parallel size when rounded) move rho by at most half
        # a step; the Engram projections' few active parameters shift P_sparse slightly
        half_step = 0.5 * plan.ep_size / (plan.backbone.n_routed - run.top_k)
        assert abs(run.rho_effective - run.rho) <= half_step + 0.01
    order = sorted(plan.runs, key=lambda r: r.rho)
    assert [r.n_routed_experts for r in order] == sorted(r.n_routed_experts for r in order)
    assert [r.engram_params for r in order] == sorted((r.engram_params for r in order), reverse=True)


# ---- experts per rho ------------------------------------------------------------------------------
def test_experts_for_rho_matches_paper_and_edges():
    assert experts_for_rho(106, 6, 1.0) == 106
    assert experts_for_rho(106, 6, 0.4) == 46  # the paper's rho = 0.4 point
    assert experts_for_rho(106, 6, 0.0) == 6  # top-k stay
    assert experts_for_rho(25, 2, 0.5) == 14  # 2 + round(11.5), half rounds up
    for bad in (-0.1, 1.01, float("nan")):
        with pytest.raises(ValueError, match="rho must lie in"):
            experts_for_rho(106, 6, bad)
    with pytest.raises(ValueError, match="not divisible by expert-parallel size 4"):
        experts_for_rho(106, 6, 1.0, ep_size=4)
    assert experts_for_rho(106, 6, 0.75, ep_size=4, round_to_ep=True) == 80  # 81 -> nearest multiple of 4
    assert experts_for_rho(106, 6, 0.8, ep_size=4, round_to_ep=True) == 88  # 86: halfway rounds up
    assert experts_for_rho(106, 6, 0.0, ep_size=4, round_to_ep=True) == 8  # never below top-k


# ---- invariants over many budgets and rho values ---------------------------------------------------
@pytest.mark.slow  # 5-8 s: many solver calls / a CLI process
@pytest.mark.parametrize("family_name,n_cases", [("cpu", 10), ("paper", 6)])
def test_no_rho_violates_tolerances(family_name, n_cases):
    """Property test: random budgets across the family's range, random rho sets; every run of every
    plan keeps P_tot, the training FLOPs and the FLOPs-per-token drift within tolerance."""
    family = load_family(family_name)
    lo, hi = budget_range(family)
    rng = np.random.default_rng(20260112)
    for _ in range(n_cases):
        budget = float(math.exp(rng.uniform(math.log(lo * 1.01), math.log(hi / 1.01))))
        rhos = sorted({1.0, *np.round(rng.uniform(0.0, 0.95, size=4), 3).tolist()}, reverse=True)
        plan = solve_plan(family, budget, rhos)
        check_plan_invariants(plan)


def test_standard_budgets_lie_inside_their_family(cpu, paper):
    assert paper.budgets == tuple(sorted({ref.budget for ref in paper.reference_points}))
    for family in (cpu, paper):
        assert family.budgets
        for budget in family.budgets:
            check_plan_invariants(solve_plan(family, budget, [1.0, 0.5]))
    smallest = solve_plan(cpu, min(cpu.budgets), [1.0]).runs[0]
    assert smallest.train_tokens < 600_000  # ~2-3 minutes at the ~3.5k tokens/s measured on this CPU


def test_rung_choice_follows_tokens_per_param_rule(cpu):
    lo, hi = budget_range(cpu)
    target = math.log(cpu.budget_rule.tokens_per_active_param)
    for budget in np.geomspace(lo * 1.01, hi / 1.01, 7):
        chosen, all_rungs = select_backbone(cpu, float(budget))
        dist = [abs(math.log(b.tokens_per_active_param(budget)) - target) for b in all_rungs]
        assert dist[chosen.rung] == min(dist)
    assert select_backbone(cpu, lo * 1.01)[0].name == "c0"
    assert select_backbone(cpu, hi / 1.01)[0].name == "c2"


def test_sparsity_target_sets_expert_count(cpu, paper):
    for family in (cpu, paper):
        for i in range(len(family.rungs)):
            bb = solve_backbone(family, i)
            ratio = bb.measured.total / bb.measured.active
            # the integer expert count is the one closest to the target ratio
            step_ratio = bb.expert_sparse_params / bb.measured.active
            assert abs(ratio - family.sparsity) <= step_ratio / 2 + 1e-9


# ---- the solver's counts are the instantiated model's counts ---------------------------------------
def test_solver_counts_equal_instantiated_models(cpu):
    plan = solve_plan(cpu, 1e13, [1.0, 0.7, 0.3, 0.0])
    for run in plan.runs:
        model_cfg = dict(run.model)
        if model_cfg["engram"] is not None:  # identity compression: counts do not depend on the tokenizer
            model_cfg["engram"] = {**model_cfg["engram"], "tokenizer": None}
        torch.manual_seed(0)
        net = build_model(ModelConfig.from_dict(model_cfg))  # real weights on the CPU
        numel = sum(p.numel() for p in net.parameters())
        assert numel == run.total_params + run.embedding_params + run.head_params
        tables = sum(p.numel() for p in net.parameters() if group_of(p) == "engram_tables")
        assert tables == run.engram_params
        routed = sum(p.numel() for blk in net.layers if hasattr(blk.ffn, "experts")
                     for p in blk.ffn.experts.parameters())
        assert routed == run.routed_expert_params
        counts = net.model_counts(run.seq_len)
        assert (counts.total_params, counts.active_params) == (run.total_params, run.active_params)
        assert counts.flops_per_token == run.forward_flops_per_token
        # and the model trains: one forward/backward at the run's sequence length
        idx = torch.randint(0, cpu.vocab_size, (1, run.seq_len))
        out = net(idx, idx)
        out.loss.backward()
        assert torch.isfinite(out.loss)


# ---- the paper's published sweep points ------------------------------------------------------------
def test_paper_family_lands_on_published_points(paper):
    p2 = solve_plan(paper, 2e20, [1.0, 0.8, 0.6, 0.4])
    p6 = solve_plan(paper, 6e20, [1.0, 0.8])
    check_plan_invariants(p2)
    check_plan_invariants(p6)
    n = {(plan.budget, run.rho): run.n_routed_experts for plan in (p2, p6) for run in plan.runs}
    assert n[(2e20, 1.0)] == 106 and n[(2e20, 0.4)] == 46 and n[(6e20, 1.0)] == 99
    assert all(run.top_k == 6 for run in p2.runs)
    for plan in (p2, p6):
        errors = [e for run in plan.runs for e in plan.reference_errors(run).values()]
        assert errors, "the paper family must report errors against its published points"
        for e in errors:
            assert abs(e["rel_error"]) < 0.01, e
    r1 = p2.runs[0]
    assert 9.5 < r1.total_params / r1.active_params < 10.5
    assert p2.max_flops_drift < paper.tolerances.flops_drift


# ---- drift compensation ------------------------------------------------------------------------------
@pytest.mark.slow  # 5-8 s: many solver calls / a CLI process
def test_wide_engram_memory_is_narrowed_to_keep_flops_drift(cpu):
    rungs = list(cpu.rungs)
    rungs[0] = replace(rungs[0], engram={**rungs[0].engram, "embed_dim_per_ngram": 512})
    wide = replace(cpu, rungs=tuple(rungs))
    plan = solve_plan(wide, 1e13, [1.0, 0.5])
    run = plan.runs[1]
    assert run.engram_dim_reduced_from == 512
    assert run.model["engram"]["embed_dim_per_ngram"] < 512
    assert run.model["engram"]["embed_dim_per_ngram"] % run.model["engram"]["heads_per_ngram"] == 0
    check_plan_invariants(plan)
    strict = replace(wide, tolerances=replace(wide.tolerances, flops_drift=1e-5))
    with pytest.raises(ValueError, match="drift"):
        solve_plan(strict, 1e13, [1.0, 0.5])


# ---- bad input ---------------------------------------------------------------------------------------
def test_bad_input_fails_before_anything_runs(cpu):
    lo, hi = budget_range(cpu)
    with pytest.raises(ValueError, match=r"rho must lie in \[0, 1\]"):
        solve_plan(cpu, 1e13, [1.0, 1.2])
    with pytest.raises(ValueError, match="rho must lie in"):
        solve_plan(cpu, 1e13, [-0.1])
    with pytest.raises(ValueError, match="below family cpu's smallest model"):
        solve_plan(cpu, lo / 2, [1.0])
    with pytest.raises(ValueError, match="above family cpu's largest model"):
        solve_plan(cpu, hi * 2, [1.0])
    with pytest.raises(ValueError, match="budget must be a positive"):
        solve_plan(cpu, -1.0, [1.0])
    with pytest.raises(ValueError, match="not divisible by expert-parallel size"):
        solve_plan(replace(cpu, hardware=replace(cpu.hardware, n_gpus=8)), 1e13, [1.0, 0.5], ep_size=8)
    with pytest.raises(ValueError, match="frees no routed expert"):
        solve_plan(cpu, 1e13, [1.0, 0.99])
    with pytest.raises(ValueError, match="does not divide"):
        solve_plan(cpu, 1e13, [1.0], ep_size=2)  # 1 device cannot hold 2 expert-parallel ranks
    tiny_memory = cpu.with_hardware(gpu_mem_gib=0.01)
    with pytest.raises(ValueError, match="Engram tables need"):
        solve_plan(tiny_memory, 1e13, [1.0, 0.0])
    with pytest.raises(ValueError, match="repeat"):
        solve_plan(cpu, 1e13, [1.0, 1.0])


def test_expert_parallel_rounding(cpu):
    fam = cpu.with_hardware(n_gpus=4)
    plan = solve_plan(fam, 1e13, [1.0, 0.8, 0.5, 0.2], ep_size=4, round_experts_to_ep=True)
    assert all(run.n_routed_experts % 4 == 0 for run in plan.runs)
    check_plan_invariants(plan)


def test_family_validation():
    raw = {"name": "x", "vocab_size": 512, "seq_len": 64, "sparsity": 4,
           "budget_rule": {"tokens_per_active_param": 1, "min_tokens_per_active_param": 0.5,
                           "max_tokens_per_active_param": 2},
           "moe": {"top_k": 2, "n_shared_experts": 1}, "engram": {"max_ngram": 3},
           "train": {"global_batch_size": 4},
           "rungs": [{"model": {"d_model": 64, "n_layers": 2, "n_heads": 2}, "moe": {"expert_hidden": 32},
                      "engram": {"layer_ids": [1], "embed_dim_per_ngram": 16}}]}
    fam = family_from_dict(raw)
    assert fam.rungs[0] == Rung("rung0", {"d_model": 64, "n_layers": 2, "n_heads": 2}, {"expert_hidden": 32},
                                {"layer_ids": [1], "embed_dim_per_ngram": 16}, {})
    assert fam.rung_model(0)["ffn_hidden"] == (2 + 1) * 32  # dense layers: the width a token sees in MoE
    for key, value, msg in (("moe", {"top_k": 2, "n_routed_experts": 8}, "solver derives"),
                            ("engram", {"table_params": 100}, "solver derives"),
                            ("sparsity", 1.0, "must exceed 1"),
                            ("extra", 1, "family x: unknown config key extra"),
                            ("vocab_size", "big", "family x: config key vocab_size"),
                            ("moe", {"top_k": 2, "n_shared_experts": 1, "top_kk": 3},
                             "unknown config key moe.top_kk; did you mean moe.top_k"),
                            ("engram", {"max_ngram": "three"}, "config key engram.max_ngram"),
                            ("hardware", {"n_gpu": 8}, "unknown config key hardware.n_gpu; did you mean hardware.n_gpus"),
                            ("budget_rule", {"tokens_per_active_param": 1}, "min_tokens_per_active_param"),
                            ("rungs", [{"model": {"d_model": 64}, "moe": {"expert_hidden": 32, "hidden": 1}}],
                             r"family x: unknown config key rungs\[0\]\.moe\.hidden \(known: n_routed"),
                            ("rungs", [], "non-empty")):
        with pytest.raises(ValueError, match=msg):
            family_from_dict({**raw, key: value})
    with pytest.raises(ValueError, match="unknown family 'nope'"):
        load_family("nope")


# ---- cost estimates ----------------------------------------------------------------------------------
def test_resource_estimates(paper):
    plan = solve_plan(paper, 2e20, [1.0, 0.4])
    run = plan.runs[1]
    hw = paper.hardware
    mem = {z: estimate_resources(replace(run, train={**run.train, "zero_stage": z}), hw) for z in (0, 1, 2)}
    assert mem[0].total_gib > mem[1].total_gib > mem[2].total_gib
    assert mem[0].weights_gib == mem[2].weights_gib  # ZeRO-1/2 never shard the weights
    res = plan.resources[1]
    assert res.gpu_hours == pytest.approx(run.train_flops / (hw.mfu * hw.peak_tflops * 1e12) / 3600)
    assert res.wall_hours == pytest.approx(res.gpu_hours / hw.n_gpus)
    ep = estimate_resources(run, replace(hw, n_gpus=8), ep_size=8)
    assert ep.weights_gib < estimate_resources(run, replace(hw, n_gpus=8)).weights_gib  # experts split over EP
    cramped = solve_plan(paper.with_hardware(n_gpus=1).with_train(zero_stage=0), 2e20, [1.0])
    assert any("will not fit" in w for w in cramped.warnings)


# ---- the resolved run config and the plan CLI ----------------------------------------------------------
def test_run_config_is_what_the_trainer_composes(cpu, paper, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from rundir.config import write_run_config
    from sweeps.planning.runconfig import hydra_block, resolve_run_config
    from rundir.schema import check
    from train.trainer import step_schedule

    runs = solve_plan(cpu, 1e13, [1.0, 0.4]).runs + solve_plan(paper, 2e20, [0.8]).runs
    for i, run in enumerate(runs):
        write_run_config(tmp_path / str(i), resolve_run_config(run.config()), hydra_block())
        with initialize_config_dir(config_dir=str(tmp_path / str(i)), version_base="1.3"):
            cfg = compose("config")  # as train/main.py --config-dir <run_dir> --config-name config reads it
        raw = OmegaConf.to_container(cfg.model, resolve=True)  # also the schema's defaults (n_branches: null)
        assert {k: raw[k] for k in run.model} == run.model
        assert check(cfg).model.to_dict() == run.model  # the trainer's typed tree takes the moe/engram dicts
        assert step_schedule(cfg) == (run.steps, run.last_step_sequences)
        assert (cfg.train.seq_len, cfg.train.global_batch_size) == (run.seq_len, run.global_batch_size)
        assert cfg.train.train_tokens == run.train_tokens
        assert cfg.experiment_name == run.name
        for key, value in run.train.items():
            assert cfg.train[key] == value
        for key, value in run.optim.items():
            assert cfg.optim[key] == value
        assert cfg.data.dir == (run.data_dir or "data/stdlib_bpe8k")


def test_plan_cli_json_and_table(capsys, tmp_path):
    assert plan_main(["--budget", "1e13", "--family", "cpu", "--rho", "1.0,0.6,0.2", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rho"] for r in rows] == [1.0, 0.6, 0.2]
    for r in rows:
        assert all(k in r for k in REQUIRED_KEYS)
        assert r["train_flops"] == pytest.approx(r["flops_per_token"] * r["train_tokens"])
    assert plan_main(["--budget", "1e13", "--family", "cpu", "--rho", "1.0,0.5", "--configs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GiB/GPU" in out and out.count("python train/main.py --config-dir") == 2
    assert len(list(tmp_path.glob("*/config.yaml"))) == 2
    assert plan_main(["--budget", "1e13", "--family", "cpu", "--rho", "1.0,1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # 5-8 s: many solver calls / a CLI process
def test_plan_module_command_for_the_paper():
    proc = subprocess.run([sys.executable, "-m", "sweeps.plan", "--budget", "2e20", "--family", "paper",
                           "--rho", "1.0,0.8,0.6,0.4", "--json"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["n_routed_experts"] for r in rows] == [106, 86, 66, 46]
    assert rows[0]["reference"]["active_params"]["published"] == 568e6
    text = subprocess.run([sys.executable, "-m", "sweeps.plan", "--budget", "2e20", "--family", "paper",
                           "--rho", "1.0,0.4"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert text.returncode == 0 and "published points" in text.stdout
