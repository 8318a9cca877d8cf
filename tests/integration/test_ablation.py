"""The memory-ablation control arm (sweeps/planning/ablation.py): one-row tables, same compute, lower P_tot;
kept out of the U-curve; full minus ablated reported with a paired-by-seed interval."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from memory.config import EngramConfig
from memory.hashing import NgramHasher
from memory.primes import assign_table_primes
from sweeps.analysis.ablation_fit import ablation_summary
from sweeps.execution.driver import build_sweep, plan_allocation
from sweeps.analysis.summary import overlay_allocation_sweeps, summarize
from sweeps.execution.launchers import LocalLauncher
from sweeps.execution.results import ABLATED_REASON, COMPLETED, RunRecord
from sweeps.execution.runloop import run_sweep

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared helpers
from sweep_contract_trainer import ContractSpec, contract_loss  # noqa: E402

SCRIPT = "tests/sweep_contract_trainer.py"
GAP = 0.01  # the fixture's known memory effect: ablated runs lose this much


# ---- one-row tables in memory/ -------------------------------------------------------------------
def test_base_one_gives_one_row_per_head_and_every_ngram_hashes_to_it():
    assert assign_table_primes([1, 100], 2, [0, 3]) == {0: [[1, 1], [101, 103]], 3: [[1, 1], [107, 109]]}
    assert EngramConfig.from_dict({"table_sizes": [1, 1], "heads_per_ngram": 2, "embed_dim_per_ngram": 8}).table_sizes == [1, 1]
    hasher = NgramHasher(50, 3, 2, [1, 1], [0], pad_id=0, seed=0)
    ids = torch.randint(0, 50, (2, 17))
    assert hasher(ids)[0].abs().sum().item() == 0  # every head reads row 0 of its own one-row table


# ---- the planner -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planned():
    specs, _ = plan_allocation("cpu", 3e12, [1.0, 0.8], ablate_memory=True)
    return {s.to_dict()["name"]: s for s in specs}


def test_ablated_run_keeps_compute_and_drops_only_the_table_rows(planned):
    assert set(planned) == {"cpu-C3e12-rho1", "cpu-C3e12-rho0.8", "cpu-C3e12-rho0.8-ablate"}
    full, abl = planned["cpu-C3e12-rho0.8"].spec, planned["cpu-C3e12-rho0.8-ablate"].spec
    for key in ("forward_flops_per_token", "train_sequences", "train_flops", "active_params", "steps",
                "rho_effective", "n_routed_experts", "engram_dense_params"):
        assert getattr(abl, key) == getattr(full, key), key
    assert abl.optim == full.optim and abl.train == full.train
    eng = abl.model["engram"]
    heads = len(eng["layer_ids"]) * (eng["max_ngram"] - 1) * eng["heads_per_ngram"]
    assert eng["table_sizes"] == [1, 1] and abl.engram_params == heads * eng["embed_dim_per_ngram"] // eng["heads_per_ngram"]
    assert full.total_params - abl.total_params == full.engram_params - abl.engram_params
    assert abl.total_params_error == pytest.approx(abl.total_params / planned["cpu-C3e12-rho1"].spec.total_params - 1)
    assert abl.memory_ablated and abl.to_dict()["memory_ablated"] and not full.memory_ablated
    assert abl.config()["model"]["engram"]["table_sizes"] == [1, 1]  # what its run's config.yaml will say


def test_ablated_model_trains_a_step(planned):
    """The one-row model builds and back-propagates into its table, gate and projections."""
    from assembly import build_model
    from models import ModelConfig
    from sweeps.planning.backbone import for_counting

    torch.manual_seed(0)
    net = build_model(ModelConfig.from_dict(for_counting(planned["cpu-C3e12-rho0.8-ablate"].spec.model)))
    ids = torch.randint(0, 8192, (2, 32))
    out = net(ids, targets=torch.roll(ids, -1, 1))
    out.loss.backward()
    table = next(b.memory.tables.weight for b in net.layers if b.memory is not None)
    assert table.shape[0] == 8 and table.grad is not None and table.grad.abs().sum() > 0


def test_sweep_names_the_ablated_points(planned, tmp_path):
    sweep = build_sweep(list(planned.values()), out=tmp_path, family="cpu", budget=3e12, seeds=[0, 1],
                        wandb_mode="disabled")
    names = sorted(r.run_dir.name for r in sweep.runs)
    assert names == ["rho0.80-ablate-seed0", "rho0.80-ablate-seed1", "rho0.80-seed0", "rho0.80-seed1",
                     "rho1.00-seed0", "rho1.00-seed1"]
    assert all(sweep.record(r).excluded == ABLATED_REASON for r in sweep.runs if "ablate" in r.run_dir.name)


def test_ablate_memory_refused_for_memory_sweeps(capsys):
    from sweeps.run import main

    assert main(["--budget", "3e12", "--mode", "memory", "--slots", "1e4", "--ablate-memory", "--dry-run"]) == 2
    assert "--ablate-memory" in capsys.readouterr().err


# ---- the summary -------------------------------------------------------------------------------------
def _record(rho, seed, loss, ablated=False, excluded=None):
    return RunRecord(sweep="s", mode="allocation", family="f", budget=1.0, rho=rho, seed=seed, run_name="r",
                     run_dir="d", status=COMPLETED, val_loss=loss, excluded=excluded,
                     spec=json.dumps({"memory_ablated": ablated}))


def test_summary_pairs_by_seed_and_needs_two_seeds_for_an_interval():
    one = [_record(1.0, 0, 3.10), _record(0.8, 0, 3.00), _record(0.8, 0, 3.03, True)]
    s = ablation_summary(one)
    assert s["memory_effect"]["diff"] == pytest.approx(0.03) and s["memory_effect"]["ci"] is None
    assert s["verdict"] == "insufficient" and "2 seeds" in s["reason"]
    assert s["per_rho"][0]["structure_effect"]["diff"] == pytest.approx(0.07)
    assert ablation_summary([_record(0.8, 0, 3.0)]) is None  # no control arm, no block
    # a full run off its budget is no fair twin: its ablated partner is left unpaired
    off = [_record(0.8, 0, 3.0, excluded="spent 1.1 FLOPs"), _record(0.8, 0, 3.03, True)]
    assert ablation_summary(off)["memory_effect"] is None


def test_summary_interval_is_over_seeds_not_rho_points():
    recs = []
    for seed, (d1, d2) in enumerate([(0.02, 0.04), (0.00, 0.02), (0.01, 0.03)]):
        recs += [_record(0.8, seed, 3.0), _record(0.8, seed, 3.0 + d1, True),
                 _record(0.5, seed, 3.1), _record(0.5, seed, 3.1 + d2, True)]
    s = ablation_summary(recs)
    pooled = s["memory_effect"]
    assert pooled["n_seeds"] == 3 and pooled["n_pairs"] == 6 and pooled["diff"] == pytest.approx(0.02)
    lo, hi = pooled["ci"]  # seed means 0.03, 0.01, 0.02: sd 0.01, se 0.00577, t(2) 4.303
    assert hi - lo == pytest.approx(2 * 4.303 * 0.01 / 3 ** 0.5, rel=1e-3)
    # the six pairs taken as independent would give [+0.005, +0.035] ("memory helps"); a seed's pairs
    # share its data order, so the seeds are the units and three of them do not exclude 0
    assert lo < 0 < hi and s["verdict"] == "no difference detected"
    assert [p["rho"] for p in s["per_rho"]] == [0.8, 0.5]


class _AblatedContract(ContractSpec):
    """The fixture's run with a known memory effect: GAP nats worse than its full twin."""

    memory_ablated = True

    def config(self):
        return {**super().config(), "contract": {"loss_offset": GAP}}

    def to_dict(self):
        return {**super().to_dict(), "memory_ablated": True}


def test_contract_sweep_reports_the_known_memory_effect_beside_the_u_curve(tmp_path):
    rhos = (1.0, 0.85, 0.7, 0.55, 0.4)
    specs = [ContractSpec(r, 3) for r in rhos] + [_AblatedContract(r, 3) for r in (0.7, 0.4)]
    sweep = build_sweep(specs, out=tmp_path, family="contract", budget=1e9, seeds=[0, 1],
                        settings=["+contract.step_s=0.01"], wandb_mode="disabled")
    records = run_sweep(sweep, LocalLauncher(script=SCRIPT, parallel=2, threads=1), poll_s=0.05, emit=lambda m: None)
    lines = []
    summary = summarize(sweep, records, n_boot=200, wandb_mode="disabled", emit=lines.append)
    saved = json.loads((sweep.dir / "summary.json").read_text())
    assert saved["fit"]["n_points"] == 2 * len(rhos)  # the control arm stays off the U-curve
    assert len(saved["excluded"]) == 4 and {e["reason"] for e in saved["excluded"]} == {ABLATED_REASON}
    ab = saved["ablation"]
    assert ab["memory_effect"]["diff"] == pytest.approx(GAP) and ab["memory_effect"]["n_pairs"] == 4
    lo, hi = ab["memory_effect"]["ci"]
    assert lo - 1e-9 <= GAP <= hi + 1e-9 and ab["verdict"] == "memory helps"
    moe_minus_full = contract_loss(1.0, 0) - contract_loss(0.7, 0)
    assert ab["per_rho"][0]["structure_effect"]["diff"] == pytest.approx(moe_minus_full - GAP, abs=0.005)
    assert any(ln.startswith("memory ablation: memory helps") for ln in lines)
    assert summary["ablation"] == ab
    assert overlay_allocation_sweeps(tmp_path) is not None  # the all-budget figure reads the same summary
