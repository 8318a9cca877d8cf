"""The Muon recipe through the real trainer: start-up group lines, exact resume after a kill (CPU,
fp32, ZeRO 0 and 1), a 2-rank ZeRO-2 run whose loss falls."""
from __future__ import annotations

import numpy as np
import pytest

from test_train_sparse import ENGRAM, MOE
from trainer_utils import final, kill_after_checkpoint, losses, run_train

pytestmark = pytest.mark.slow

MUON = ["optim=muon", *MOE, *ENGRAM]


def _falls(run_dir, n, margin=0.2):
    """The mean loss of the last 3 steps is below the first 3 by ``margin`` (step-to-step noise here is
    ~0.03; the margin was 0.3 before the window order became a Feistel permutation, which changed the
    batches: the fall measured then was 0.26)."""
    ls = losses(run_dir)
    assert np.mean([ls[s] for s in range(1, 4)]) > np.mean([ls[s] for s in range(n - 2, n + 1)]) + margin, ls


# ZeRO 1 and 2 save and load Muon's state through the same DeepSpeed optimizer (stage_1_and_2.py): one of
# them here; ZeRO 2 trains on 2 ranks below
@pytest.mark.parametrize("zero", [[], ["train.zero_stage=1", "train.grad_clip=0"]], ids=["zero0", "zero1"])
def test_muon_kill_and_resume_is_exact_and_lists_groups(tiny_data, tmp_path, zero):
    n = 8
    common = [*MUON, *zero, "optim.table_update=lazy", f"train.max_steps={2 * n}", f"train.ckpt_interval={n}",
              "train.eval_interval=1000"]
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    p = run_train(tiny_data, ref_dir, *common)
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "optim group" in ln]
    norm = next(ln for ln in lines if "optim group norm " in ln)
    assert "BranchRMSNorm" in norm and " wd 0 " in norm
    assert any("experts[" in ln and " muon " in ln for ln in lines)
    assert any("engram_tables" in ln and "adam(lazy)" in ln and " wd 0 " in ln for ln in lines)
    mem = final(ref_dir)["memory"]  # table and optimizer-state memory, as the start-up line reports it
    table = int(next(ln for ln in lines if "engram_tables" in ln).split(" params ")[1].split()[0].replace(",", ""))
    assert mem["table_params"] == table > 0 and mem["table_optimizer_state_bytes"] == 8 * table
    assert f"Engram tables {table:,} params" in p.stdout + p.stderr
    kill_after_checkpoint(tiny_data, cut_dir, n, *common)
    run_train(tiny_data, cut_dir, *common)
    ref, cut = losses(ref_dir), losses(cut_dir)
    assert sorted(cut) == list(range(1, 2 * n + 1))
    assert [ref[s] for s in sorted(ref)] == [cut[s] for s in sorted(cut)]
    assert final(ref_dir)["val_loss"] == final(cut_dir)["val_loss"]
    _falls(ref_dir, 2 * n)


def test_muon_two_rank_zero2_trains(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_train(tiny_data, run_dir, *MUON, "train.max_steps=20", "train.zero_stage=2", "train.grad_clip=0",
              "train.eval_interval=100", "train.ckpt_interval=100", nproc=2, timeout=900)
    _falls(run_dir, 20)
