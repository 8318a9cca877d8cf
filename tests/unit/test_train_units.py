"""Unit tests of the trainer's pure parts: schedules, data order, optimizer groups."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.config_utils import load
from core.param_groups import tag
from models import ModelConfig, Transformer
from train.data import TrainBatches
from train.optim import build_optimizer
from rundir.schema import OptimConfig
from train.schedule import lr_factor


class ArraySplit:
    """A token split held in memory, with the reader's `read` contract."""

    def __init__(self, n: int):
        self.tokens = np.arange(n, dtype=np.int64)
        self.n_tokens = n

    def read(self, start: int, length: int) -> np.ndarray:
        assert 0 <= start and start + length <= self.n_tokens
        return self.tokens[start:start + length]


def test_schedules():
    assert lr_factor(0, 100, "cosine", 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, "cosine", 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(99, 100, "cosine", 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(50, 100, "wsd", 10, 0.0, decay_frac=0.2) == 1.0
    assert lr_factor(99, 100, "wsd", 10, 0.0, decay_frac=0.2) == pytest.approx(0.0)
    assert lr_factor(89, 100, "wsd", 10, 0.0, decay_frac=0.2) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="unknown optim.schedule"):
        lr_factor(0, 10, "linear", 0, 0.0)


def test_batches_are_a_function_of_step_and_independent_of_world_size():
    split = ArraySplit(10_000)
    one = TrainBatches(split, seq_len=16, micro_batch_size=4, global_batch_size=8, rank=0, world_size=1, seed=3)
    two = [TrainBatches(split, 16, 2, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    for step in (0, 5, 700):  # 700 steps crosses several epochs
        a = torch.cat([one.get(step, m)[0] for m in range(one.accum_steps)])
        b = torch.cat([two[r].get(step, m)[0] for m in range(two[0].accum_steps) for r in range(2)])
        assert torch.equal(a, b)
        x, y = one.get(step, 0)
        assert torch.equal(x[:, 1:], y[:, :-1])
    # every window exactly once per epoch
    per_epoch = one.n_windows // 8
    starts = torch.cat([one.get(s, m)[0][:, 0] for s in range(per_epoch) for m in range(2)])
    assert len(set(starts.tolist())) == len(starts)
    other_seed = TrainBatches(split, 16, 4, 8, 0, 1, seed=4)
    assert not torch.equal(one.get(0, 0)[0], other_seed.get(0, 0)[0])


def test_bad_batch_geometry():
    with pytest.raises(ValueError, match="not a multiple"):
        TrainBatches(ArraySplit(10_000), 16, 3, 8, 0, 1, 0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainBatches(ArraySplit(100), 16, 4, 8, 0, 1, 0)


def test_optimizer_groups_follow_tags():
    m = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, ffn_hidden=64, max_seq_len=16))
    groups = {"matrix": {"lr_mult": 1.0, "weight_decay": 0.1}, "norm": {"weight_decay": 0.0},
              "embed": {"weight_decay": 0.0}, "head": {"lr_mult": 0.5}}
    opt = build_optimizer(m, load(OptimConfig, {"lr": 1e-3, "betas": [0.9, 0.95], "weight_decay": 0.1,
                                                "groups": groups}))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["head"]["lr"] == pytest.approx(5e-4)
    assert by_name["norm"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
    tag(m.layers[0].ffn.w1.weight, "residual_mix")
    with pytest.raises(ValueError, match="optim.groups.residual_mix"):
        build_optimizer(m, load(OptimConfig, {"lr": 1e-3, "betas": [0.9, 0.95], "groups": groups}))
