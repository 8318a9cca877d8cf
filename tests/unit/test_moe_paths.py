"""DeepSeekMoE layer: expert compute paths (batched, grouped_mm, bf16, empty experts), reported counts against the instantiated module and FlopCounterMode, parameter groups, config validation, the Hydra model."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from core.param_groups import group_of, grouped_parameters
from models.config import ModelConfig
from models.moe import MoEConfig, MoEFFN, build_moe_ffn
from models.transformer import Transformer
from moe_utils import make_layer, naive_moe

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


def test_grouped_mm_and_batched_paths_agree_on_cpu():
    outs = []
    for impl in ("batched", "grouped_mm"):
        layer = make_layer(seed=2, impl=impl, n_routed_experts=16, top_k=4)
        torch.manual_seed(3)
        x = torch.randn(2, 24, 32, requires_grad=True)
        y = layer(x)
        outs.append((y, torch.autograd.grad(y.square().sum(), [x] + list(layer.parameters()))))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_bf16_module_runs_both_paths_close_to_fp32():
    x = torch.randn(2, 16, 32)
    ref = make_layer(seed=4)(x)
    for impl in ("batched", "grouped_mm"):
        layer = make_layer(seed=4, impl=impl).bfloat16()
        xb = x.bfloat16().requires_grad_()
        y = layer(xb)
        y.float().square().sum().backward()
        assert y.dtype == torch.bfloat16 and layer.experts.w1.grad.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.02)


def test_impl_resolution_and_unsupported_grouped_mm():
    layer = make_layer()
    x = torch.randn(4, 32)
    assert layer.experts.resolve_impl("auto", x) == "batched"  # CPU: deterministic batched path
    odd = make_layer(d=30, impl="grouped_mm")  # 30 fp32 = 120 bytes: not 16-byte aligned
    with pytest.raises(ValueError, match="16-byte"):
        odd(torch.randn(1, 4, 30))


def test_padded_group_layout_for_grouped_mm():
    from models.moe.experts import padded_group_layout
    counts = torch.tensor([5, 0, 8, 1, 3])
    dest, offs, total = padded_group_layout(counts, 17, align=4)
    assert total == 32 and offs.dtype == torch.int32  # round_up(17 + 5 * 3, 4)
    assert offs.tolist() == [8, 8, 16, 20, 32]  # 8, 0, 8, 4 rows; the last group takes the slack
    starts = [0, 8, 8, 16, 20]
    expected = [starts[e] + i for e, c in enumerate(counts.tolist()) for i in range(c)]
    assert dest.tolist() == expected


@pytest.mark.parametrize("impl", ["batched", "grouped_mm"])
def test_every_expert_empty_but_two_and_dropless(impl):
    layer = make_layer(balance="none", top_k=2, impl=impl)
    layer.router.expert_bias.copy_(torch.tensor([9.0, 9.0, 0, 0, 0, 0, 0, 0]))  # all tokens -> 0 and 1
    x = torch.randn(3, 50, 32)
    ref, _ = naive_moe(layer, x[:, :4])
    y = layer(x)
    torch.testing.assert_close(y[:, :4], ref, rtol=1e-5, atol=1e-6)
    layer.on_optimizer_step()
    assert layer.metrics()["moe/layer1/load_max_over_mean"] == pytest.approx(4.0)  # 300 rows on 2 of 8


def test_reported_params_equal_instantiated_parameters():
    layer = make_layer(n_routed_experts=8, n_shared_experts=2, top_k=3, expert_hidden=24)
    c = layer.counts(64)
    total = sum(p.numel() for p in layer.parameters())
    routed = sum(p.numel() for p in layer.experts.parameters())
    per_expert = sum(p[0].numel() for p in layer.experts.parameters())
    shared = sum(p.numel() for p in layer.shared.parameters())
    router = layer.router.weight.numel()
    assert c.total_params == total
    assert c.active_params == shared + router + 3 * per_expert
    assert routed == 8 * per_expert and per_expert == 3 * 32 * 24
    assert "expert_bias" not in dict(layer.named_parameters())

    cfg = ModelConfig(vocab_size=512, d_model=32, n_layers=3, n_heads=4, ffn_hidden=64, max_seq_len=32,
                      moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=16,
                                    n_dense_layers=1))
    model = Transformer(cfg)
    mc = model.model_counts(32)
    core = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("tok_emb", "head")))
    assert mc.total_params == core
    inactive = sum(6 * 3 * 32 * 16 for blk in model.layers if isinstance(blk.ffn, MoEFFN))
    assert mc.total_params - mc.active_params == inactive  # 6 idle experts per MoE layer
    assert [isinstance(b.ffn, MoEFFN) for b in model.layers] == [False, True, True]


def test_reported_flops_match_flop_counter():
    layer = make_layer(n_routed_experts=8, n_shared_experts=2, top_k=3, expert_hidden=24)
    x = torch.randn(4, 64, 32)
    with FlopCounterMode(display=False) as fc:
        layer(x)
    measured = fc.get_total_flops() / (4 * 64)
    reported = layer.counts(64).flops_per_token
    assert measured == pytest.approx(reported, rel=0.02)

    cfg = ModelConfig(vocab_size=512, d_model=64, n_layers=3, n_heads=4, ffn_hidden=128, max_seq_len=64,
                      moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32,
                                    n_dense_layers=1))
    model = Transformer(cfg)
    idx = torch.randint(0, 512, (2, 64))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:  # math SDPA: scores counted
        model(idx)
    per_module = {name: sum(v.values()) / idx.numel() for name, v in fc.get_flop_counts().items()}
    for i, blk in enumerate(model.layers):
        if isinstance(blk.ffn, MoEFFN):
            for sub in ("ffn", "ffn.router", "ffn.experts", "ffn.shared"):
                module = blk.get_submodule(sub)
                assert per_module[f"Transformer.layers.{i}.{sub}"] == pytest.approx(
                    module.counts(64).flops_per_token, rel=0.02), sub
    assert per_module["Global"] == pytest.approx(model.model_counts(64).flops_per_token, rel=0.02)


def test_parameter_groups_and_checkpointed_fp32_bias():
    layer = make_layer()
    groups = {n: group_of(p) for n, p in layer.named_parameters()}
    assert groups["router.weight"] == "router"
    assert all(g == "experts" for n, g in groups.items() if n.startswith(("experts.", "shared.")))
    layer.router.expert_bias.copy_(torch.arange(8.0) * 1e-3)
    sd = layer.state_dict()
    assert "router.expert_bias" in sd
    layer.bfloat16()
    assert layer.experts.w1.dtype == torch.bfloat16 and layer.router.expert_bias.dtype == torch.float32
    fresh = make_layer(seed=9)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.router.expert_bias, torch.arange(8.0) * 1e-3)


def test_config_validation_and_dense_layers():
    assert build_moe_ffn(MoEConfig(n_dense_layers=2), 32, 1, 0.02, 0.02) is None
    assert isinstance(build_moe_ffn(MoEConfig(n_dense_layers=2), 32, 2, 0.02, 0.02), MoEFFN)
    bad = [dict(top_k=20, n_routed_experts=8), dict(score_func="relu"), dict(balance="loss"),
           dict(impl="triton"), dict(expert_hidden=0), dict(n_shared_experts=-1), dict(foo=1),
           dict(balance="aux_loss", aux_loss_coef=0.0), dict(balance="aux_free", bias_update_rate=0.0),
           dict(top_k="two"), dict(norm_topk="maybe")]
    for b in bad:
        with pytest.raises(ValueError):
            MoEConfig.from_dict(b)
    with pytest.raises(ValueError, match="expects"):
        make_layer()(torch.randn(2, 3, 16))


def test_hydra_model_moe_builds_and_trains():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        # Only the model group (tiny backbone + moe mapping), so that this test depends on no other group.
        cfg = compose(overrides=["+model=moe", "model.max_seq_len=32"])
    model_cfg = ModelConfig.from_dict(cfg.model)
    assert isinstance(model_cfg.moe, MoEConfig)  # every key is a MoEConfig field, typed
    torch.manual_seed(0)
    model = Transformer(model_cfg)
    n_moe = sum(isinstance(b.ffn, MoEFFN) for b in model.layers)
    assert n_moe == model_cfg.n_layers - model_cfg.moe.n_dense_layers > 0
    assert {"experts", "router"} <= set(grouped_parameters(model))

    # A few AdamW steps on a fixed repeating batch: the loss must fall and metrics must appear.
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, model_cfg.vocab_size, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(12):
        out = model(idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.on_optimizer_step()
        losses.append(out.ce_loss.item())
    assert losses[-1] < losses[0] - 0.5 and all(math.isfinite(v) for v in losses)
    metrics = model.metrics()
    assert sum(k.endswith("load_max_over_mean") for k in metrics) == n_moe

