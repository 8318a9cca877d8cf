"""The FLOP convention: the full T x T attention count (the budget's) and the causal one (MFU's),
each checked against FlopCounterMode of a path that computes exactly that."""
from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from assembly import build_model
from core.accounting import ModelCounts, attention_core_counts
from models import ModelConfig
from models.attention import Attention


def _attention(n_heads: int, n_kv_heads: int, head_dim: int = 8, d_model: int = 32, seq: int = 24) -> Attention:
    torch.manual_seed(0)
    return Attention(d_model, n_heads, n_kv_heads, head_dim, seq, 10000.0, 0.02, 0.02)


def _rowwise_causal(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The same attention, each query multiplied only with the keys at or before it: the work a causal
    kernel does (x: [B, T, d] -> [B, T, d])."""
    B, T, _ = x.shape
    H, D, rep = attn.n_heads, attn.head_dim, attn.n_heads // attn.n_kv_heads
    q = attn.rotary(attn.wq(x).view(B, T, H, D).transpose(1, 2))  # [B, H, T, D]
    k = attn.rotary(attn.wk(x).view(B, T, attn.n_kv_heads, D).transpose(1, 2)).repeat_interleave(rep, dim=1)
    v = attn.wv(x).view(B, T, attn.n_kv_heads, D).transpose(1, 2).repeat_interleave(rep, dim=1)
    rows = []
    for t in range(T):
        s = q[:, :, t:t + 1] @ k[:, :, :t + 1].transpose(-1, -2) / math.sqrt(D)  # [B, H, 1, t+1]
        rows.append(s.softmax(-1) @ v[:, :, :t + 1])  # [B, H, 1, D]
    y = torch.cat(rows, dim=2)  # [B, H, T, D]
    return attn.wo(y.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("n_heads,n_kv_heads", [(4, 4), (4, 2)])
def test_full_and_causal_attention_counts_match_flop_counter(n_heads, n_kv_heads):
    attn, B, T = _attention(n_heads, n_kv_heads), 2, 24
    x = torch.randn(B, T, attn.d_model)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as full:
        y = attn(x)
    with FlopCounterMode(display=False) as causal:
        y_rows = _rowwise_causal(attn, x)
    torch.testing.assert_close(y_rows, y, rtol=1e-4, atol=1e-5)  # the row-wise path is the same function
    c = attn.counts(T)
    assert full.get_total_flops() == pytest.approx(c.flops_per_token * B * T, rel=1e-9)
    assert causal.get_total_flops() == pytest.approx(c.flops_per_token_causal * B * T, rel=1e-9)
    core = attention_core_counts(T, n_heads * attn.head_dim)
    assert core.flops_per_token_causal / core.flops_per_token == pytest.approx((T + 1) / (2 * T))


def test_model_reports_both_numbers_and_the_budget_keeps_the_full_one():
    cfg = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=4, ffn_hidden=64, max_seq_len=64)
    model = build_model(cfg)
    T, q_dim = 64, 4 * 8
    mc = model.model_counts(T)
    assert mc.flops_per_token - mc.flops_per_token_causal == pytest.approx(3 * 2 * (T - 1) * q_dim)
    assert mc.train_flops_per_token == 3 * mc.flops_per_token
    assert mc.train_flops_per_token_causal == 3 * mc.flops_per_token_causal
    idx = torch.randint(0, 256, (2, T))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        model(idx)
    assert fc.get_total_flops() / idx.numel() == pytest.approx(mc.flops_per_token, rel=1e-9)
    # The budget's count: full attention (changing it would move every planned run's token count).
    from sweeps.planning.budget import measure

    measured = measure(cfg.to_dict(), T)
    assert measured.forward_flops == mc.flops_per_token and measured.train_flops == mc.train_flops_per_token
    assert ModelCounts(1, 1, 0, 0, 10.0).flops_per_token_causal == 10.0  # no attention: one number




@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_attention_runs_on_the_cuda_flash_kernel_in_bf16(n_kv_heads):
    """Training attention is SDPA's flash kernel on a GPU (bf16, causal, grouped KV heads): allowed only that
    backend, it runs (a refused backend raises "No available kernel") and agrees with the math backend."""
    attn = _attention(4, n_kv_heads, head_dim=64, d_model=256, seq=512).cuda().to(torch.bfloat16)
    x = torch.randn(2, 512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        y = attn(x)
        y.float().square().mean().backward()
    with sdpa_kernel(SDPBackend.MATH):
        ref = attn(x)
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=2e-2)
