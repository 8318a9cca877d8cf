"""The MoE layer and the Engram module trained through the real trainer on real text."""
from __future__ import annotations

import json

import numpy as np
import pytest

from trainer_utils import final, losses, run_train

pytestmark = pytest.mark.slow

MOE = ["model=moe", "model.moe.n_routed_experts=8", "model.moe.top_k=2", "model.moe.expert_hidden=40",
       "model.moe.n_shared_experts=1", "model.moe.n_dense_layers=1"]
ENGRAM = ["memory=engram_tiny", "model.engram.layer_ids=[1]", "model.engram.embed_dim_per_ngram=32",
          "model.engram.heads_per_ngram=2", "model.engram.table_sizes=[1000,1000]", "model.engram.tokenizer=data"]


def _falls(run_dir, first=range(1, 6), last=range(26, 31), margin=0.5):
    ls = losses(run_dir)
    assert np.mean([ls[s] for s in first]) > np.mean([ls[s] for s in last]) + margin, ls


def test_moe_two_rank_zero2_loss_falls(tiny_data, tmp_path):
    run_dir = tmp_path / "moe"
    run_train(tiny_data, run_dir, *MOE, "train.max_steps=30", "train.zero_stage=2",
              "train.eval_interval=100", "train.ckpt_interval=100", nproc=2)
    _falls(run_dir)
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(k.startswith("moe/") for k in recs[-2]), "per-layer expert load metrics are logged"
    f = final(run_dir)
    assert f["total_params"] > f["active_params"]


def test_engram_model_loss_falls(tiny_data, tmp_path):
    run_dir = tmp_path / "engram"
    run_train(tiny_data, run_dir, *MOE, *ENGRAM, "train.max_steps=30", "train.eval_interval=100",
              "train.ckpt_interval=100")
    _falls(run_dir)
    f = final(run_dir)
    assert f["total_params"] - f["active_params"] > 6 * 1000 * 16  # tables are sparse parameters
