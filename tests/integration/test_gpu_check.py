"""benchmarks/gpu_check.sh cannot rot before a GPU is lent: its CPU-capable parts run here."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_gpu_check_runs_on_cpu_and_writes_its_table(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--out", str(tmp_path)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    table = (tmp_path / "gpu_check.md").read_text()
    for figure in ("MoE layer / dense SwiGLU", "hashing: ours vs the reference", "framework / bare loop", "MFU",
                   "Engram overhead: step time", "step time sharded / replicated tables"):
        assert figure in table, table
    assert "not measured" not in table, table
    assert "step times: bench_moe" in table and "whole check" in table, table
    # the device tool returns at most 8 files from its output folder: the logs travel as one archive
    assert sorted(f.name for f in tmp_path.iterdir()) == ["bench_engram.json", "bench_moe.json", "bench_tables.json",
                                                          "bench_train.json", "gpu_check.md", "logs.tgz"]


def test_gpu_check_past_its_deadline_still_prints_the_table_naming_what_is_missing(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    p = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", "--out", str(tmp_path), "--deadline", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stdout[-4000:] + p.stderr[-4000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "not measured (step failed or skipped): bench_moe.json, bench_engram.json, bench_train.json" in table, table
    assert "bench_tables skipped" in table and (tmp_path / "logs.tgz").exists()
