"""train.deterministic: the switch turns PyTorch's deterministic kernels on, and on a GPU a training step of a
MoE + Engram model (embedding and table scatter-adds, expert dispatch, attention) repeats bit for bit."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.determinism import apply_determinism


@pytest.fixture
def restore_flags(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
              torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[1], before[2]


def test_switch_sets_the_kernels_and_the_cublas_workspace(restore_flags):
    apply_determinism(False)
    assert not torch.are_deterministic_algorithms_enabled() and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    apply_determinism(True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


def test_the_schema_keeps_it_off_by_default_and_out_of_the_trajectory():
    from rundir.schema import TrainConfig
    from train.resume import NOT_TRAJECTORY

    assert TrainConfig().deterministic is False and "deterministic" in NOT_TRAJECTORY


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_moe_engram_training_steps_repeat_bit_for_bit():
    """In a fresh process, as a trainer switches it on: PyTorch reads CUBLAS_WORKSPACE_CONFIG once, at the
    process's first cuBLAS call, which the CUDA tests before this one have made."""
    here = Path(__file__).resolve().parent
    code = f"import sys; sys.path[:0] = [{str(here)!r}]; import test_determinism as t; t.steps_repeat_on_cuda()"
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    p = subprocess.run([sys.executable, "-c", code], cwd=here.parents[1], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]


def steps_repeat_on_cuda() -> None:
    """Three AdamW steps under bf16 autocast, twice from the same seed: the same weights to the bit (an op
    without a deterministic CUDA kernel raises here, naming itself)."""
    from assembly import build_model
    from memory.config import EngramConfig
    from models import ModelConfig
    from models.moe import MoEConfig

    apply_determinism(True)
    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=3, n_heads=4, ffn_hidden=128, max_seq_len=64,
                      moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32,
                                    n_dense_layers=1),
                      engram=EngramConfig(layer_ids=[1], max_ngram=3, heads_per_ngram=4, embed_dim_per_ngram=32,
                                          table_sizes=[211, 223]))
    finals = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model(cfg).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(3):
            idx = torch.randint(0, 512, (8, 65), device="cuda", generator=gen)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(idx[:, :-1], idx[:, 1:]).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        finals.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))
