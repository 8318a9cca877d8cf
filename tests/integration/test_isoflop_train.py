"""Iso-FLOP in the real trainer: it trains exactly the planned tokens (a short last step, gradient re-weighted) on 1 and 2 ranks."""
from __future__ import annotations

import json
import math

import pytest


CPU_RHOS = [1.0, 0.8, 0.6, 0.4, 0.2]
PAPER_RHOS = [1.0, 0.8, 0.6, 0.4]
RUN_TOL, SWEEP_TOL = 0.001, 0.002  # the limits: planned vs spent, and every run vs the budget


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_trainer_spends_exactly_the_planned_tokens_on_a_short_last_step(tiny_data, tmp_path, nproc):
    """train_tokens of 5 full steps + 3 sequences: 6 steps, the last one short (2 slots of 4-sequence
    micro-batches: 2 + 1 sequences, over accumulation on 1 rank or over ranks on 2); final.json
    holds exactly those tokens and their FLOPs."""
    from trainer_utils import final, losses, run_train

    tokens = (5 * 8 + 3) * 64
    run_dir = tmp_path / "run"
    run_train(tiny_data, run_dir, f"train.train_tokens={tokens}", "train.eval_interval=1000",
              "train.ckpt_interval=1000", nproc=nproc)
    f = final(run_dir)
    assert f["steps"] == 6 and f["tokens"] == tokens
    assert f["train_flops"] == pytest.approx(f["flops_per_token"] * tokens, rel=1e-12)
    ls = losses(run_dir)
    assert sorted(ls) == list(range(1, 7)) and all(math.isfinite(v) for v in ls.values())
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["train/tokens"] for m in logged if "train/tokens" in m][-1] == tokens

