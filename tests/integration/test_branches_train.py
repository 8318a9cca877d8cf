"""A 4-branch (hyper-connected) MoE + Engram model trained through the real trainer on real text."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from assembly import build_model
from models import ModelConfig
from test_train_sparse import ENGRAM, MOE
from trainer_utils import final, losses, run_train

pytestmark = pytest.mark.slow


def _counts(model: dict, seq_len: int):
    with torch.device("meta"):
        net = build_model(ModelConfig.from_dict({**model, "engram": {**model["engram"], "tokenizer": None}}))
    return net, net.model_counts(seq_len)


def test_four_branch_moe_engram_model_trains(tiny_data, tmp_path):
    run_dir = tmp_path / "hc4"
    run_train(tiny_data, run_dir, *MOE, *ENGRAM, "+model.n_branches=4", "train.max_steps=30",
              "train.eval_interval=100", "train.ckpt_interval=100")
    ls = losses(run_dir)
    assert np.mean([ls[s] for s in range(1, 6)]) > np.mean([ls[s] for s in range(26, 31)]) + 0.5, ls
    f = final(run_dir)
    assert np.isfinite(f["val_loss"])
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("engram/layer1/gate_mean" in r for r in recs)

    # The trainer built and counted the hyper-connected model: its final.json counts are those of
    # the composed config at 4 branches, above the same config at 1 branch by the HC modules and
    # Engram's per-branch keys, norms and conv taps.
    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "hydra" / "config.yaml"), resolve=True)
    net, four = _counts(cfg["model"], cfg["train"]["seq_len"])
    _, one = _counts({**cfg["model"], "n_branches": 1}, cfg["train"]["seq_len"])
    assert net.cfg.n_branches == 4 and all(blk.attn_hc is not None for blk in net.layers)
    assert (f["total_params"], f["active_params"]) == (four.total_params, four.active_params)
    hc = sum(p.numel() for blk in net.layers for m in (blk.attn_hc, blk.ffn_hc) for p in m.parameters())
    assert four.total_params - one.total_params > hc > 0
    assert f["flops_per_token"] == pytest.approx(four.train_flops_per_token)
