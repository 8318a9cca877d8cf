"""End to end: `python -m sweeps.run` plans through the budget solver and trains with the real trainer
(train/main.py) on a CPU-sized family; killed mid-sweep, re-run, and re-run again once finished."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from rundir.config import read_run_config
from rundir.locks import is_locked
from sweeps.execution.results import read_results

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

# A one-rung family small enough for a few seconds per run: d_model 64, 2 layers (layer 0 dense,
# layer 1 MoE with Engram), top-2 of ~25 routed experts at rho = 1, P_tot / P_act = 3.
FAMILY = """
name: e2etiny
description: CPU-sized family for the sweep's end-to-end test
vocab_size: 1024
seq_len: 64
sparsity: 3.0
budget_rule: {tokens_per_active_param: 0.1, min_tokens_per_active_param: 0.001, max_tokens_per_active_param: 1000}
model: {n_heads: 2}
moe: {top_k: 2, n_shared_experts: 1, n_dense_layers: 1, expert_hidden: 32, score_func: sigmoid, balance: aux_free}
engram: {max_ngram: 3, heads_per_ngram: 2, embed_dim_per_ngram: 16, layer_ids: [1], tokenizer: null}
rungs:
  - {name: r0, model: {d_model: 64, n_layers: 2}}
train: {global_batch_size: 8, micro_batch_size: 8, eval_tokens: 4096, eval_interval: 1000, ckpt_interval: 4,
        log_interval: 4}
optim: {lr: 3.0e-3}
warmup_frac: 0.1
tolerances: {total_params: 0.05, train_flops: 0.05, flops_drift: 0.2}
"""
BUDGET = "1.2e10"  # about 24 steps of 512 tokens


def cli(family: Path, data: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sweeps.run", "--budget", BUDGET, "--family", str(family), "--rho", "1.0", "0.5",
            "0.2", "--data-dir", str(data), "--out", str(out), "--n-boot", "200", "--wandb-mode", "disabled",
            "--threads", "1"]


def env() -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def marker(run_dir: Path) -> dict:
    return json.loads((run_dir / "sweep_run.json").read_text())


def test_cli_sweep_with_the_real_trainer_survives_a_kill(tiny_data, tmp_path):
    family = tmp_path / "e2etiny.yaml"
    family.write_text(FAMILY)
    out = tmp_path / "out"
    sweep_dir = out / "e2etiny-1.2e10"
    first, second, third = (sweep_dir / f"rho{r}-seed0" for r in ("1.00", "0.50", "0.20"))

    driver = subprocess.Popen(cli(family, tiny_data, out), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    ckpt = second / "checkpoints" / "latest.json"
    while time.time() < deadline and driver.poll() is None:
        if (first / "final.json").exists() and ckpt.exists():
            break
        time.sleep(0.02)
    assert driver.poll() is None, driver.stdout.read()
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.time() + 30
    while is_locked(second) and time.time() < deadline:  # its trainer is told to stop when the driver dies
        time.sleep(0.1)
    assert not is_locked(second) and not (second / "final.json").exists()

    done = subprocess.run(cli(family, tiny_data, out), cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 already completed" in done.stdout
    assert marker(first)["attempts"] == 1  # the finished run was not re-run
    assert marker(second)["attempts"] == 2 and "resumed from" in (second / "launch.log").read_text()
    assert marker(third)["attempts"] == 1
    rows = read_results(sweep_dir / "results.parquet")
    assert [r.status for r in rows] == ["completed"] * 3
    for run_dir in (first, second, third):  # the trainer read the run's config.yaml and was given nothing else
        assert yaml.safe_load((run_dir / "hydra" / "overrides.yaml").read_text()) == []
        assert read_run_config(run_dir)["model"] == OmegaConf.load(run_dir / "hydra" / "config.yaml").model
    for r in rows:
        final = json.loads((Path(r.run_dir) / "final.json").read_text())
        assert r.val_loss == final["val_loss"] and r.tokens == final["tokens"] and r.total_params > 0
        # iso-FLOP: spent (final.json) == planned to 0.1%, within 0.5% of the budget (~190 sequences)
        assert abs(final["train_flops"] / r.planned_flops - 1) <= 1e-3 and r.excluded is None, r
    summary = json.loads((sweep_dir / "summary.json").read_text())
    assert [p["rho"] for p in summary["points"]] == [1.0, 0.5, 0.2]
    fit = summary["fit"]  # 3 rho x 1 seed: no degree of freedom left for the noise, so no verdict
    assert fit["n_points"] == 3 and fit["verdict"] == "insufficient" and "degree of freedom" in fit["reason"]
    assert fit["rho_star"] is None and "verdict: insufficient" in done.stdout
    assert (out / "u_curves.png").exists() and (sweep_dir / "u_curve.png").exists()
    totals = {r.total_params for r in rows}  # iso-parameter: the solver kept P_tot within its tolerance
    assert max(totals) / min(totals) < 1.05

    t0 = time.time()
    again = subprocess.run(cli(family, tiny_data, out), cwd=REPO, env=env(), capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "3 already completed" in again.stdout and "0 to launch" in again.stdout
    assert time.time() - t0 < 30
    assert [marker(d)["attempts"] for d in (first, second, third)] == [1, 2, 1]


def test_submitit_local_executor_runs_a_two_point_sweep_with_the_real_trainer(tiny_data, tmp_path):
    family = tmp_path / "e2etiny.yaml"
    family.write_text(FAMILY)
    out = tmp_path / "out"
    args = cli(family, tiny_data, out)
    i = args.index("--rho")
    args[i + 1:i + 4] = ["1.0", "0.5"]
    done = subprocess.run([*args, "--launcher", "submitit-local"], cwd=REPO, env=env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    sweep_dir = out / "e2etiny-1.2e10"
    rows = read_results(sweep_dir / "results.parquet")
    assert [(r.rho, r.status) for r in rows] == [(1.0, "completed"), (0.5, "completed")]
    for r in rows:
        launched = json.loads((Path(r.run_dir) / "launcher.json").read_text())
        assert launched["cluster"] == "local" and launched["job_id"]
        assert json.loads((Path(r.run_dir) / "final.json").read_text())["val_loss"] == r.val_loss
