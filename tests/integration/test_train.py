"""End-to-end trainer tests on real text: loss falls, 2-rank ZeRO-2, exact resume, bad input."""
from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from trainer_utils import (REPO, assert_real_grad_norms, env, final, kill_after_checkpoint, losses, run_train,
                           train_cmd)

pytestmark = pytest.mark.slow


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_single_process_trains_and_reruns_as_noop(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_train(tiny_data, run_dir, "train.max_steps=40", "train.eval_interval=20", "train.ckpt_interval=20")
    f = final(run_dir)
    assert f["status"] == "completed" and f["steps"] == 40 and f["tokens"] == 40 * 8 * 64
    assert f["val_loss"] < math.log(1024) - 0.5  # well below the uniform-guess loss
    ls = losses(run_dir)
    assert np.mean([ls[s] for s in range(1, 6)]) > np.mean([ls[s] for s in range(36, 41)]) + 0.5
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 40 and (run_dir / "checkpoints" / latest["tag"]).is_dir()
    startup = [ln for ln in (run_dir / "rank0.log").read_text().splitlines() if "start-up: read/verify" in ln]
    assert len(startup) == 1 and all(part in startup[0] for part in ("model build", "engine init", "first step"))
    before = tree_digest(run_dir / "checkpoints")
    t0 = time.time()
    p = run_train(tiny_data, run_dir, "train.max_steps=40")
    assert "run already completed" in p.stdout and time.time() - t0 < 60
    assert tree_digest(run_dir / "checkpoints") == before


def test_two_rank_zero2_loss_decreases(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_train(tiny_data, run_dir, "train.max_steps=30", "train.zero_stage=2", "train.eval_interval=100",
              "train.ckpt_interval=100", nproc=2)
    ls = losses(run_dir)
    assert np.mean([ls[s] for s in range(1, 6)]) > np.mean([ls[s] for s in range(26, 31)]) + 0.5
    assert sorted(p.name for p in run_dir.glob("rank*.log")) == ["rank0.log", "rank1.log"]
    assert final(run_dir)["steps"] == 30
    assert_real_grad_norms(run_dir)  # fp32 ZeRO 2: DeepSpeed's norm


@pytest.mark.parametrize("length", ["train.max_steps=24", f"train.train_tokens={(23 * 8 + 3) * 64}"],
                         ids=["whole-steps", "short-last-step"])
def test_kill_and_resume_is_exact(tiny_data, tmp_path, length):
    """2N uninterrupted steps == N steps, SIGKILL, resume to 2N (fp32, CPU): identical losses, also when
    the run ends on a short last step (train_tokens to the sequence)."""
    n = 12
    common = [length, f"train.ckpt_interval={n}", "train.eval_interval=1000"]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    run_train(tiny_data, ref_dir, *common)

    kill_after_checkpoint(tiny_data, cut_dir, n, *common, "train.log_interval=1")

    run_train(tiny_data, cut_dir, *common)
    ref, cut = losses(ref_dir), losses(cut_dir)
    assert sorted(cut) == list(range(1, 2 * n + 1))
    assert [ref[s] for s in sorted(ref)] == [cut[s] for s in sorted(cut)]
    assert final(ref_dir)["val_loss"] == final(cut_dir)["val_loss"]


def test_wandb_offline_run_id_survives_resume(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    extra = {"WANDB_MODE": None, "WANDB_SILENT": "true"}
    common = ["logging.wandb.mode=offline", "train.ckpt_interval=5", "train.eval_interval=100"]
    run_train(tiny_data, run_dir, "train.max_steps=5", *common, extra_env=extra)
    first_id = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["wandb_run_id"]
    assert first_id and list(run_dir.glob(f"wandb/offline-run-*-{first_id}"))
    os.unlink(run_dir / "final.json")  # extend the finished run: it resumes from its checkpoint
    run_train(tiny_data, run_dir, "train.max_steps=8", "train.allow_config_change=true", *common, extra_env=extra)
    assert final(run_dir)["wandb_run_id"] == first_id


def _one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, p.stderr[-3000:]
    return errors[0]


def test_unknown_experiment_is_one_line_error(tiny_data, tmp_path):
    p = run_train(tiny_data, tmp_path / "run", "+experiment=no_such_thing", check=False)
    msg = _one_line_error(p)
    assert "no_such_thing" in msg and "demo" in msg
    assert not (tmp_path / "run").exists()


def test_missing_data_dir_is_one_line_error(tmp_path):
    p = run_train(tmp_path / "nowhere", tmp_path / "run", check=False)
    assert "nowhere" in _one_line_error(p)


def test_corrupt_shard_is_one_line_error(tiny_data, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in tiny_data.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = sorted(bad.glob("train*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:-6])  # truncated
    p = run_train(bad, tmp_path / "run", check=False)
    assert shard.name in _one_line_error(p)


def test_checkpoint_from_other_model_config_refused_and_kept(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_train(tiny_data, run_dir, "train.max_steps=20", "train.ckpt_interval=10", "train.eval_interval=100")
    os.unlink(run_dir / "final.json")
    before = tree_digest(run_dir / "checkpoints")
    p = run_train(tiny_data, run_dir, "train.max_steps=20", "model.d_model=96", "model.n_heads=3", check=False)
    assert "different model config" in _one_line_error(p)
    assert tree_digest(run_dir / "checkpoints") == before


def test_deepspeed_launcher_two_ranks(tiny_data, tmp_path):
    """The DeepSpeed launcher (with --no_local_rank, as Hydra needs) drives the same entry point."""
    launcher = Path(sys.executable).with_name("deepspeed")
    run_dir = tmp_path / "run"
    cmd = [str(launcher), "--no_local_rank", "--num_gpus", "2", *train_cmd(tiny_data, run_dir, "train.max_steps=6",
                                                                           "train.eval_interval=100")[1:]]
    e = env()
    e["DS_ACCELERATOR"] = "cpu"
    p = subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert final(run_dir)["steps"] == 6
    assert sorted(x.name for x in run_dir.glob("rank*.log")) == ["rank0.log", "rank1.log"]


def test_bf16_zero1_trains(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_train(tiny_data, run_dir, "train.max_steps=30", "train.precision=bf16", "train.zero_stage=1",
              "train.eval_interval=100", "train.ckpt_interval=100")
    ls = losses(run_dir)
    assert np.mean([ls[s] for s in range(1, 6)]) > np.mean([ls[s] for s in range(26, 31)]) + 0.5
    assert math.isfinite(final(run_dir)["val_loss"])
    assert_real_grad_norms(run_dir)  # bf16 ZeRO 1
