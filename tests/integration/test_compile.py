"""train.compile: which devices compile, and a compiled MoE model computes what the eager one does."""
from __future__ import annotations

import copy

import pytest
import torch

from train.compile import compile_blocks, resolve_compile
from rundir.schema import ConfigError


def test_auto_compiles_on_cuda_only_and_bad_modes_are_named():
    assert resolve_compile("auto", torch.device("cuda")) and not resolve_compile("auto", torch.device("cpu"))
    assert resolve_compile("blocks", torch.device("cpu")) and not resolve_compile("off", torch.device("cuda"))
    with pytest.raises(ValueError, match="train.compile='fast' must be one of off, blocks, auto"):
        resolve_compile("fast", torch.device("cpu"))


def test_schema_refuses_an_unknown_compile_mode():
    from core.config_utils import load
    from rundir.schema import Config

    assert load(Config, {"model": {}, "train": {"compile": "blocks"}}).train.compile == "blocks"
    with pytest.raises(ConfigError, match="train.compile='fast' is not one of off, blocks, auto"):
        load(Config, {"model": {}, "train": {"compile": "fast"}})


@pytest.mark.slow
def test_compiled_blocks_match_eager_and_keep_parameter_names():
    from models.config import ModelConfig
    from models.transformer import Transformer

    torch.manual_seed(0)
    moe = dict(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32, n_dense_layers=1)
    eager = Transformer(ModelConfig.from_dict(dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_hidden=96,
                                                   max_seq_len=64, moe=moe)))
    compiled = copy.deepcopy(eager)
    assert compile_blocks(compiled, "blocks", torch.device("cpu")) == 2
    assert torch._dynamo.config.recompile_limit >= 64  # the blocks' variants share one cache (train/compile.py)
    assert list(compiled.state_dict()) == list(eager.state_dict())  # checkpoints interchange
    idx = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    for model in (eager, compiled):
        model(idx, idx.roll(-1, 1)).loss.backward()
    loss_e, loss_c = (m(idx, idx.roll(-1, 1)).loss.item() for m in (eager, compiled))
    assert abs(loss_e - loss_c) < 1e-5, (loss_e, loss_c)
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-4, atol=1e-6, msg=name)
