"""Multi-branch residual (hyper-connections): one branch is the plain model, n branches run, train,
start as the plain model, stay causal, and are counted (params and FLOPs) like everything else."""
from __future__ import annotations

from dataclasses import asdict, replace

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from assembly import build_model
from core.param_groups import group_of
from memory.config import EngramConfig
from models import ModelConfig, Transformer
from models.hyper_connections import HyperConnection
from models.moe.config import MoEConfig

torch.set_num_threads(1)

TINY = dict(vocab_size=512, d_model=48, n_layers=3, n_heads=4, ffn_hidden=96, max_seq_len=64)
MOE = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=16, n_dense_layers=1)
ENGRAM = EngramConfig(layer_ids=[1], max_ngram=3, heads_per_ngram=4, embed_dim_per_ngram=32, table_sizes=[211, 223])
# ModelConfig(**TINY, moe=<MOE with every MoEConfig field spelled out, as conf/model/moe.yaml, the
# experiments and every plan write it>).fingerprint() before n_branches existed (commit 9646c3d; the
# same at db87788): checkpoints written then must still resume.
OLD_FINGERPRINT = "f523fee690607659"


def _model(G: int, engram: bool = True, seed: int = 0, moe: MoEConfig = MOE) -> Transformer:
    torch.manual_seed(seed)
    return build_model(ModelConfig(**TINY, n_branches=G, moe=moe, engram=ENGRAM if engram else None))


def _plain_forward(model: Transformer, idx: torch.Tensor) -> torch.Tensor:
    """The single-stream pre-norm residual written out from the model's parts: the reference."""
    mem = model.memory_indexer(idx) if model.memory_indexer is not None else {}
    h = model.tok_emb(idx)
    for blk in model.layers:
        if blk.memory is not None:
            h = h + blk.memory(h, mem[blk.layer_id])
        h = h + blk.attn(blk.attn_norm(h))
        h = h + blk.ffn(blk.ffn_norm(h))
    return model.head(model.norm(h))


# ---- n_branches = 1 is the model as it was ----------------------------------------------------------
def test_one_branch_is_the_plain_residual_model():
    model = _model(1)
    assert ModelConfig(**TINY, moe=MOE).fingerprint() == OLD_FINGERPRINT
    assert "n_branches" not in ModelConfig(**TINY).to_dict()
    assert all(blk.attn_hc is None and blk.ffn_hc is None for blk in model.layers)
    assert not [n for n in model.state_dict() if "_hc" in n]
    torch.manual_seed(0)  # same seed, n_branches left at its default: same parameters, bit for bit
    default = build_model(ModelConfig(**TINY, moe=MOE, engram=ENGRAM))
    sd, sd_default = model.state_dict(), default.state_dict()
    assert sd.keys() == sd_default.keys() and all(torch.equal(sd[k], sd_default[k]) for k in sd)
    idx = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx).logits, _plain_forward(model, idx), rtol=0, atol=0)
    parts = model.norm.counts(64) + model.memory_indexer.counts(64)
    for blk in model.layers:
        for m in (blk.attn_norm, blk.attn, blk.ffn_norm, blk.ffn, blk.memory):
            if m is not None:
                parts = parts + m.counts(64)
    core = model.core_counts(64)
    assert (core.total_params, core.active_params, core.flops_per_token) == (
        parts.total_params, parts.active_params, parts.flops_per_token)


def test_fresh_multi_branch_model_computes_the_single_stream_function():
    """Same seed, no Engram: identical backbone weights (HC init draws no random numbers) and the
    4-branch model's logits equal the 1-branch model's (identity mixing, one-hot read)."""
    one, four = _model(1, engram=False), _model(4, engram=False)
    sd4 = four.state_dict()
    for k, v in one.state_dict().items():
        assert torch.equal(sd4[k], v), k
    idx = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(four(idx).logits, one(idx).logits, rtol=1e-6, atol=1e-6)


# ---- the hyper-connection itself --------------------------------------------------------------------
def test_hyper_connection_matches_the_formula_branch_by_branch():
    torch.manual_seed(0)
    n, d = 3, 16
    hc = HyperConnection(n, d, sublayer_index=4)
    assert torch.equal(hc.static_read.detach(), torch.tensor([0.0, 1.0, 0.0]))  # 4 mod 3
    with torch.no_grad():
        for p in hc.parameters():
            p.add_(0.3 * torch.randn_like(p))  # leave the identity init
    lin = torch.nn.Linear(d, d)
    h = torch.randn(2, 5, n, d)
    out = hc(h, lin)
    g = hc.dyn_scale.detach()
    want = torch.empty_like(h)
    for b in range(2):
        for t in range(5):
            H = h[b, t]  # [n, d]
            dyn = torch.tanh(F.rms_norm(H, (d,), hc.norm_weight, hc.eps) @ hc.dyn_weight.T)  # [n, n + 2]
            a = hc.static_read + g[0] * dyn[:, 0]
            bw = hc.static_write + g[1] * dyn[:, 1]
            R = hc.static_res + g[0] * dyn[:, 2:]
            y = lin(sum(a[i] * H[i] for i in range(n)))
            for j in range(n):
                want[b, t, j] = sum(R[i, j] * H[i] for i in range(n)) + bw[j] * y
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        hc(torch.randn(2, 5, d), lin)


def test_multi_branch_model_is_causal():
    model = _model(4).eval()
    with torch.no_grad():  # leave the identity init and the zero conv, so every path is live
        model.layers[1].memory.conv.weight.normal_()
        for blk in model.layers:
            for hc in (blk.attn_hc, blk.ffn_hc):
                hc.dyn_weight.normal_(std=0.1)
    idx = torch.randint(0, 512, (2, 24))
    later = idx.clone()
    later[:, 13] = (later[:, 13] + 7) % 512
    moved = (model(idx).logits - model(later).logits).abs().amax(dim=(0, 2))  # [T]: change per position
    assert moved[:13].eq(0).all() and moved[13] > 0, moved


# ---- forward / backward / training ------------------------------------------------------------------
@pytest.mark.parametrize("G", [1, 4])
def test_forward_backward_with_moe_and_engram(G):
    model = _model(G, moe=replace(MOE, balance="both"))  # bias and aux loss: both paths through the HC
    assert model.layers[1].memory.n_branches == G
    idx = torch.randint(0, 512, (4, 33))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(12):
        out = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                assert p.grad is not None and torch.isfinite(p.grad).all(), name
                # W = 0 at init: the dynamic scales and norm gain get gradient once W has moved
                if "_hc." in name and not name.endswith(("dyn_scale", "norm_weight")):
                    assert p.grad.abs().sum() > 0, name
        opt.step()
        model.on_optimizer_step()
        losses.append(out.ce_loss.item())
    assert out.aux_loss is not None  # MoE reports its auxiliary loss through the HC-wrapped FFN
    assert losses[-1] < losses[0] - 0.5, losses
    if G > 1:
        hc = model.layers[2].ffn_hc
        assert hc.dyn_scale.grad.abs().sum() > 0 and hc.norm_weight.grad.abs().sum() > 0
        assert not torch.equal(hc.static_res.detach(), torch.eye(G))


def test_hyper_connection_parameters_are_residual_mix():
    model = _model(4)
    hc_params = {n: group_of(p) for n, p in model.named_parameters() if "_hc." in n}
    names = {n.rsplit(".", 1)[1] for n in hc_params}
    assert names == {"static_read", "static_write", "static_res", "norm_weight", "dyn_weight", "dyn_scale"}
    assert set(hc_params.values()) == {"residual_mix"}
    assert len(hc_params) == 6 * 2 * TINY["n_layers"]


# ---- accounting --------------------------------------------------------------------------------------
def _flops_per_token(fn, n_tokens: int) -> dict[str, float]:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # math SDPA: scores counted
        fn()
    return {name: sum(v.values()) / n_tokens for name, v in fc.get_flop_counts().items()}


@pytest.mark.parametrize("G", [1, 4])
def test_counts_match_parameters_and_flop_counter(G):
    model = _model(G)
    mc = model.model_counts(64)
    core = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("tok_emb", "head")))
    assert mc.total_params == core
    assert mc.sparse_params == model.layers[1].memory.table_params + sum(
        6 * 3 * 48 * 16 for blk in model.layers[1:])  # tables + 6 idle experts in each MoE layer
    idx = torch.randint(0, 512, (2, 64))
    measured = _flops_per_token(lambda: model(idx), idx.numel())
    assert measured["Global"] == pytest.approx(mc.flops_per_token, rel=0.02)
    if G > 1:
        for i, blk in enumerate(model.layers):
            for sub in ("attn_hc", "ffn_hc"):
                hc = blk.get_submodule(sub)
                own = _flops_per_token(lambda: hc(torch.randn(2, 64, G, 48), lambda x: x), 128)["Global"]
                assert own == pytest.approx(hc.counts(64).flops_per_token, rel=1e-9)
                assert hc.counts(64).total_params == sum(p.numel() for p in hc.parameters())


def test_branch_overhead_is_counted_by_the_budget_measure():
    from sweeps.planning.budget import measure

    base = dict(TINY, moe=asdict(MOE), engram=asdict(ENGRAM))
    one, four = measure(base, 64), measure({**base, "n_branches": 4}, 64)
    hc = HyperConnection(4, 48, 0).counts(64)
    n_hc = 2 * TINY["n_layers"]
    # Engram's per-branch parts: key projection E=64 -> d (+ bias), key/query/conv norms, 4 conv taps
    engram_extra = (4 - 1) * (64 * 48 + 48 + 3 * 48 + 4 * 48)
    assert four.total - one.total == n_hc * hc.total_params + engram_extra
    assert four.forward_flops > one.forward_flops + n_hc * hc.flops_per_token
    assert four.table_params == one.table_params


# ---- configuration ------------------------------------------------------------------------------------
def test_branch_config_errors():
    with pytest.raises(ValueError, match="n_branches must be an integer >= 1"):
        ModelConfig(**TINY, n_branches=0)
    with pytest.raises(ValueError, match="disagrees with model.n_branches=4"):
        ModelConfig(**TINY, n_branches=4, engram=replace(ENGRAM, n_branches=1))
    ModelConfig(**TINY, n_branches=4, engram=replace(ENGRAM, n_branches=4))  # agreeing is fine
    assert ModelConfig(**TINY, n_branches=4).to_dict()["n_branches"] == 4
    assert ModelConfig(**TINY, n_branches=4).fingerprint() != ModelConfig(**TINY).fingerprint()
