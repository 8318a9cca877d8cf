"""Sharded Engram tables as a planned choice: `--engram-tables sharded` reaches every run config of a sweep,
and the memory estimate charges each device 1/n of the tables (fp32, outside ZeRO) instead of a copy."""
from __future__ import annotations

import pytest

from sweeps.planning.budget import solve_plan
from sweeps.planning.families import load_family
from sweeps.planning.resources import GiB


def test_sharded_tables_reach_every_run_and_divide_the_table_memory():
    fam = load_family("paper")  # bf16, ZeRO 2, 8 GPUs: replicated tables cost 2 + (2 + 12) / 8 bytes per param
    rep, sha = (solve_plan(fam, 2e20, [1.0, 0.4], engram_tables=m) for m in ("replicated", "sharded"))
    assert [r.config().get("parallel") for r in rep.runs] == [None, None]
    assert [r.config().get("parallel") for r in sha.runs] == [{"engram_tables": "sharded"}] * 2
    assert [r.to_dict()["engram_tables"] for r in sha.runs] == ["sharded", "sharded"]
    run, r_rep, r_sha = sha.runs[1], rep.resources[1], sha.resources[1]
    n = fam.hardware.n_gpus
    assert run.engram_params > 3e9  # the paper's 2e20 point at rho = 0.4: 3.1B table parameters
    assert r_rep.tables_gib == pytest.approx(run.engram_params * (2 + 14 / n) / GiB)
    assert r_sha.tables_gib == pytest.approx(run.engram_params * 16 / n / GiB)
    # the owners hold a step's row gradients until the accumulation boundary: memory_dim fp32 + 2 ids per head
    e = run.model["engram"]
    per_token = len(e["layer_ids"]) * (4 * (e["max_ngram"] - 1) * e["embed_dim_per_ngram"]
                                       + 16 * (e["max_ngram"] - 1) * e["heads_per_ngram"])
    pending = run.global_batch_size * run.seq_len / n * per_token / GiB
    assert r_sha.activations_gib - r_rep.activations_gib == pytest.approx(pending)
    assert pending > 1.0  # 2.1M tokens per step over 8 GPUs: not negligible next to the tables' 5.7 GiB
    assert r_rep.total_gib - r_sha.total_gib == pytest.approx(r_rep.tables_gib - r_sha.tables_gib - pending)
    assert sha.resources[0].total_gib == rep.resources[0].total_gib  # rho = 1 has no tables
    assert sha.to_list()[1]["estimates"]["engram_tables"] == "sharded"


def test_tables_that_do_not_fit_replicated_point_to_sharding():
    fam = load_family("paper").with_hardware(gpu_mem_gib=8.0)
    with pytest.raises(ValueError, match="replicated.*--engram-tables sharded"):
        solve_plan(fam, 2e20, [0.4])
    with pytest.raises(ValueError, match="engram_tables must be one of replicated, sharded"):
        solve_plan(fam, 2e20, [0.4], engram_tables="striped")


def test_sweep_cli_passes_the_table_mode_to_the_trainer_config(tmp_path):
    from sweeps.run import _plan, parser

    args = parser().parse_args(["--family", "cpu", "--budget", "6e12", "--rho", "1", "0.5", "--engram-tables",
                                "sharded", "--out", str(tmp_path)])
    args.rho = [1.0, 0.5]  # what main() flattens the repeated option to
    sweep = _plan(args, "cpu", 6e12, [0])  # checked against the trainer's schema there
    assert [r.config["parallel"]["engram_tables"] for r in sweep.runs] == ["sharded", "sharded"]


def test_sweep_cli_plans_expert_parallelism_on_the_runs_ranks(tmp_path):
    """--ep-size is planned against a run's ranks (--procs-per-run x --nodes), not the family's device count
    (1 for the cpu and gpu families); an EP size that does not divide them is one line before any compute."""
    from sweeps.run import _check_args, _plan, parser

    argv = ["--family", "cpu", "--budget", "6e12", "--rho", "1", "0.5", "--ep-size", "2", "--round-experts-to-ep",
            "--out", str(tmp_path)]
    args = parser().parse_args([*argv, "--procs-per-run", "2"])
    args.rho = [1.0, 0.5]
    sweep = _plan(args, "cpu", 6e12, [0])
    assert [r.config["parallel"]["expert"] for r in sweep.runs] == [2, 2]
    assert all(r.config["model"]["moe"]["n_routed_experts"] % 2 == 0 for r in sweep.runs)
    with pytest.raises(ValueError, match="--ep-size 2 must divide a run's ranks"):
        _check_args(parser().parse_args(argv))
