"""The Engram layer: gate math, zero-initialised convolution, causality, accounting, groups."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from assembly import build_model
from core.param_groups import group_of
from memory.config import EngramConfig
from memory.engram import Engram
from memory.layers import ShortConv
from models import ModelConfig

torch.set_num_threads(1)

SIZES = [[101, 103, 107], [109, 113, 127]]  # [order][head] rows: orders 2..3, 3 heads
TINY = dict(vocab_size=512, d_model=48, n_layers=3, n_heads=4, ffn_hidden=96, max_seq_len=64)
ENGRAM = dict(layer_ids=[1], max_ngram=3, heads_per_ngram=4, embed_dim_per_ngram=32, table_sizes=[211, 223])


def _ids(B, T, sizes=SIZES, seed=0):
    g = torch.Generator().manual_seed(seed)
    flat = [s for order in sizes for s in order]
    return torch.stack([torch.randint(0, s, (B, T), generator=g) for s in flat], dim=-1)


def _module(G=1, d=32, seed=0, **kw):
    torch.manual_seed(seed)
    return Engram(1, SIZES, embed_dim_per_ngram=24, d_model=d, n_branches=G, **kw)


def _manual_gated_value(m: Engram, h4: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Gate * value written out branch by branch, from the module's raw weights."""
    offsets = torch.tensor([0, 101, 204, 311, 420, 533])
    e = m.tables.weight[ids + offsets].flatten(-2)  # [B, T, E]
    v = e @ m.value_proj.weight.T + m.value_proj.bias
    d = m.d_model
    outs = []
    for g in range(m.n_branches):
        wk = m.key_proj.weight[g * d:(g + 1) * d]
        bk = m.key_proj.bias[g * d:(g + 1) * d]
        k = e @ wk.T + bk
        k = k / torch.sqrt(k.pow(2).mean(-1, keepdim=True) + m.key_norm.eps) * m.key_norm.weight[g]
        q = h4[:, :, g]
        q = q / torch.sqrt(q.pow(2).mean(-1, keepdim=True) + m.query_norm.eps) * m.query_norm.weight[g]
        s = (k * q).sum(-1) / math.sqrt(d)
        s = torch.where(s >= 0, 1.0, -1.0) * torch.sqrt(torch.clamp(s.abs(), min=1e-6))
        outs.append(torch.sigmoid(s).unsqueeze(-1) * v)
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize("G", [1, 3])
def test_starts_as_pure_gated_value_path(G):
    m = _module(G)
    with torch.no_grad():  # non-trivial gains and biases, so the check covers them
        for p in (m.key_norm.weight, m.query_norm.weight, m.key_proj.bias, m.value_proj.bias):
            p.add_(0.3 * torch.randn_like(p))
    assert torch.count_nonzero(m.conv.weight) == 0  # the paper's zero init
    h = torch.randn(2, 10, G, 32) if G > 1 else torch.randn(2, 10, 32)
    ids = _ids(2, 10)
    out = m(h, ids)
    h4 = h if G > 1 else h.unsqueeze(2)
    expected = _manual_gated_value(m, h4, ids)
    torch.testing.assert_close(out, expected if G > 1 else expected.squeeze(2), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        m.conv.weight.normal_()
    assert not torch.allclose(m(h, ids), out)  # once trained, the convolution contributes


def test_short_conv_is_causal_dilated_depthwise():
    torch.manual_seed(0)
    conv = ShortConv(n_branches=2, dim=5, kernel_size=4, dilation=3)
    with torch.no_grad():
        conv.weight.normal_()
    x = torch.randn(1, 20, 2, 5)
    y = conv(x)
    # reference: norm per branch, pad left by (k-1)*dil, depthwise conv, SiLU
    xn = F.rms_norm(x, (5,), eps=conv.norm.eps) * conv.norm.weight
    xc = F.pad(xn.reshape(1, 20, 10).transpose(1, 2), (9, 0))
    manual = torch.zeros(1, 10, 20)
    for t in range(20):
        for j in range(4):  # tap j reads position t - (3 - j) * 3
            manual[:, :, t] += conv.weight[:, 0, j] * xc[:, :, t + j * 3]
    torch.testing.assert_close(y, F.silu(manual).transpose(1, 2).reshape(1, 20, 2, 5), rtol=1e-5, atol=1e-6)
    x2 = x.clone()
    x2[:, 11] += 1.0
    y2 = conv(x2)
    assert torch.equal(y2[:, :11], y[:, :11])
    changed = (y2 - y).abs().sum(dim=(0, 2, 3)) > 0
    assert changed.nonzero().flatten().tolist() == [11, 14, 17]  # dilation 3, taps 0..3


@pytest.mark.parametrize("G", [1, 2])
def test_module_is_causal(G):
    m = _module(G)
    with torch.no_grad():
        m.conv.weight.normal_()
    h = torch.randn(1, 16, G, 32) if G > 1 else torch.randn(1, 16, 32)
    ids = _ids(1, 16)
    base = m(h, ids)
    h2, ids2 = h.clone(), ids.clone()
    h2[:, 9] += 1.0
    ids2[:, 9] = (ids2[:, 9] + 1) % 101
    new = m(h2, ids2)
    assert torch.equal(new[:, :9], base[:, :9])
    assert not torch.allclose(new[:, 9], base[:, 9])


def test_transformer_with_engram_is_causal():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, engram=EngramConfig(**dict(ENGRAM, layer_ids=[0, 2])))).eval()
    for layer in (0, 2):
        with torch.no_grad():
            model.layers[layer].memory.conv.weight.normal_()
    idx = torch.randint(0, 512, (2, 24))
    base = model(idx).logits
    idx2 = idx.clone()
    idx2[:, 13] = (idx2[:, 13] + 7) % 512
    new = model(idx2).logits
    torch.testing.assert_close(new[:, :13], base[:, :13], rtol=0, atol=0)
    assert not torch.allclose(new[:, 13], base[:, 13])


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@pytest.mark.parametrize("G", [1, 4])
def test_module_counts_match_params_and_flop_counter(G):
    m = _module(G, d=64)
    c = m.counts(16)
    n_params = sum(p.numel() for p in m.parameters())
    assert c.total_params == n_params
    assert c.total_params - c.active_params == m.table_params == m.tables.weight.numel()
    assert m.table_params == 24 // 3 * sum(map(sum, SIZES))  # head_dim x rows
    B, T = 2, 16
    h = torch.randn(B, T, G, 64) if G > 1 else torch.randn(B, T, 64)
    measured = _flops(lambda: m(h, _ids(B, T)))
    assert abs(c.flops_per_token * B * T - measured) / measured < 0.02


def test_model_counts_with_engram():
    cfg = ModelConfig(**TINY, engram=EngramConfig(**ENGRAM))
    torch.manual_seed(0)
    with_mem, without = build_model(cfg), build_model(ModelConfig(**TINY))
    mem = with_mem.layers[1].memory
    a, b = with_mem.model_counts(32), without.model_counts(32)
    assert a.total_params - b.total_params == sum(p.numel() for p in mem.parameters())
    assert a.active_params - b.active_params == sum(p.numel() for p in mem.parameters()) - mem.table_params
    assert a.sparse_params - b.sparse_params == mem.table_params  # tables are the only inactive params
    idx = torch.randint(0, 512, (2, 32))
    delta = _flops(lambda: with_mem(idx)) - _flops(lambda: without(idx))
    counted = (a.flops_per_token - b.flops_per_token) * idx.numel()
    assert abs(counted - delta) / delta < 0.02
    assert with_mem.memory_indexer.counts(32).total_params == 0


def test_parameter_groups():
    model = build_model(ModelConfig(**TINY, engram=EngramConfig(**ENGRAM)))
    groups = {n: group_of(p) for n, p in model.named_parameters() if ".memory." in n}
    assert groups.pop("layers.1.memory.tables.weight") == "engram_tables"
    assert groups["layers.1.memory.value_proj.weight"] == "engram_proj"
    assert groups["layers.1.memory.value_proj.bias"] == "bias"
    assert groups["layers.1.memory.key_norm.weight"] == groups["layers.1.memory.conv.norm.weight"] == "norm"
    assert "engram_tables" not in groups.values()


def test_training_steps_reduce_loss_and_update_tables():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, engram=EngramConfig(**ENGRAM)))
    table = model.layers[1].memory.tables.weight
    before = table.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 512, (4, 33))
    losses = []
    for _ in range(15):
        out = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert not torch.equal(table, before)
    assert 0.0 < model.metrics()["engram/layer1/gate_mean"] < 1.0


def test_bad_calls_raise():
    m = _module(2)
    with pytest.raises(ValueError, match="branches"):
        m(torch.randn(1, 4, 32), _ids(1, 4))
    m1 = _module(1)
    with pytest.raises(ValueError, match="hash ids"):
        m1(torch.randn(1, 4, 32), None)
    with pytest.raises(ValueError, match="do not match"):
        m1(torch.randn(1, 4, 32), _ids(1, 5))
    with pytest.raises(ValueError, match="hash ids per token"):
        m1(torch.randn(1, 4, 32), _ids(1, 4)[..., :5])


def test_indexer_hashes_on_the_current_stream_off_gpu():
    """On CPU the indexer returns plain ids (no stream objects): the side stream is a CUDA-only overlap."""
    model = build_model(ModelConfig(**TINY, engram=EngramConfig(**ENGRAM)))
    ids = model.memory_indexer(torch.randint(0, 512, (2, 16)))
    assert type(ids) is dict and set(ids) == {1} and ids[1].shape[:2] == (2, 16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_side_stream_hashing_gives_the_same_model_outputs_and_gradients():
    """Hashing on a side stream (overlapping the embedding and the blocks before the first Engram layer)
    changes nothing: the same hash ids and logits bit for bit as hashing on the main stream, and the same
    gradients (to the roundoff of CUDA's atomic scatter-adds in the table and embedding backward)."""
    from memory.indexer import PendingIds

    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, engram=EngramConfig(**dict(ENGRAM, layer_ids=[0, 2])))).cuda()
    idx = torch.randint(0, 512, (4, 64), device="cuda")
    pending = model.memory_indexer(idx)
    assert isinstance(pending, PendingIds) and set(pending) == {0, 2}
    model.memory_indexer.overlap = False
    plain = model.memory_indexer(idx)
    assert all(torch.equal(pending[k], plain[k]) for k in (0, 2))
    runs = []
    for overlap in (False, True, True):
        model.memory_indexer.overlap = overlap
        model.zero_grad(set_to_none=True)
        out = model(idx[:, :-1], idx[:, 1:], return_logits=True)
        out.loss.backward()
        runs.append((out.logits.detach().clone(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    model.memory_indexer.overlap = True
    for logits, grads in runs[1:]:
        assert torch.equal(logits, runs[0][0])
        assert len(grads) == len(runs[0][1])
        for a, b in zip(grads, runs[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
