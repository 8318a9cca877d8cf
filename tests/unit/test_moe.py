"""DeepSeekMoE layer: reference equality, dense equivalence, balancing, determinism, accounting."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.ffn import SwiGLU
from moe_utils import grads_of, make_layer, naive_moe

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)


@pytest.mark.parametrize("moe", [
    dict(score_func="sigmoid", norm_topk=True, route_scale=1.0, n_shared_experts=1, balance="aux_free"),
    dict(score_func="softmax", norm_topk=False, route_scale=2.5, n_shared_experts=2, balance="both"),
    dict(score_func="sigmoid", norm_topk=False, route_scale=1.0, n_shared_experts=0, balance="aux_loss",
         aux_loss_coef=0.01, top_k=3),
    dict(score_func="sigmoid", norm_topk=True, route_scale=1.0, n_shared_experts=1, impl="grouped_mm"),
])
def test_layer_matches_naive_per_token_loop_in_values_and_gradients(moe):
    layer = make_layer(**moe)
    layer.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))  # selection-only bias in play
    torch.manual_seed(1)
    x = torch.randn(2, 12, 32, requires_grad=True)
    gy = torch.randn(2, 12, 32)

    out = layer(x)
    ref, ref_aux = naive_moe(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    if layer.cfg.uses_aux_loss:
        torch.testing.assert_close(layer.aux_loss, ref_aux, rtol=1e-5, atol=1e-8)
    else:
        assert layer.aux_loss is None
    g_layer = grads_of(layer, x, out, layer.aux_loss, gy)
    g_ref = grads_of(layer, x, ref, ref_aux, gy)
    names = ["x"] + [n for n, _ in layer.named_parameters()]
    for name, a, b in zip(names, g_layer, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"grad of {name}: {m}")


def test_bias_changes_selection_but_not_combine_weights():
    layer = make_layer(score_func="sigmoid", norm_topk=False)
    x = torch.randn(64, 32)
    before = layer.router(x)
    layer.router.expert_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))
    after = layer.router(x)
    assert (after.expert_ids.sort(-1).values == torch.tensor([0, 1])).all()  # bias forces experts 0, 1
    torch.testing.assert_close(after.weights, after.scores.gather(1, after.expert_ids))  # raw scores
    assert not torch.equal(before.expert_ids, after.expert_ids)


@pytest.mark.parametrize("score_func,norm", [("softmax", False), ("sigmoid", True)])
def test_one_expert_top1_moe_equals_dense_swiglu(score_func, norm):
    torch.manual_seed(0)
    d, h = 32, 48
    dense = SwiGLU(d, h, 0.1, 0.05)
    layer = make_layer(d=d, n_routed_experts=1, top_k=1, n_shared_experts=0, expert_hidden=h,
                       score_func=score_func, norm_topk=norm, balance="none")
    with torch.no_grad():
        layer.experts.w1[0].copy_(dense.w1.weight)
        layer.experts.w3[0].copy_(dense.w3.weight)
        layer.experts.w2[0].copy_(dense.w2.weight)
    x = torch.randn(3, 10, d, requires_grad=True)
    y_moe, y_dense = layer(x), dense(x)
    torch.testing.assert_close(y_moe, y_dense, rtol=0, atol=1e-6)
    gy = torch.randn_like(y_moe)
    gx_moe, gw1_moe = torch.autograd.grad((y_moe * gy).sum(), [x, layer.experts.w1])
    gx_dense, gw1_dense = torch.autograd.grad((y_dense * gy).sum(), [x, dense.w1.weight])
    torch.testing.assert_close(gx_moe, gx_dense, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw1_moe[0], gw1_dense, rtol=1e-5, atol=1e-7)


# ---- balancing ---------------------------------------------------------------------------------
def run_skewed_router(balance: str, steps: int):
    """Router rows 0, 1 aligned with the input mean: without balancing they take most tokens."""
    layer = make_layer(d=32, n_routed_experts=8, top_k=2, balance=balance, bias_update_rate=2e-3)
    layer.train()
    gen = torch.Generator().manual_seed(7)
    mu = F.normalize(torch.randn(32, generator=gen), dim=0)
    with torch.no_grad():
        layer.router.weight[:2] += mu
    history = []
    for _ in range(steps):
        x = torch.randn(8, 128, 32, generator=gen) + 2.0 * mu
        layer(x)  # a training-step forward (grad enabled) accumulates the counts
        layer.on_optimizer_step()
        history.append(layer.metrics())
    return layer, history


def test_bias_balancing_brings_skewed_load_toward_uniform():
    layer, hist = run_skewed_router("aux_free", steps=250)
    mx, mn = "moe/layer1/load_max_over_mean", "moe/layer1/load_min_over_mean"
    assert hist[0][mx] > 3.0 and hist[0][mn] < 0.1
    late_max = sum(h[mx] for h in hist[-50:]) / 50
    late_min = sum(h[mn] for h in hist[-50:]) / 50
    assert late_max < 1.2 and late_min > 0.8, (late_max, late_min)
    assert hist[-1]["moe/layer1/bias_norm"] > 0.05
    assert abs(layer.router.expert_bias.sum().item()) < 1e-5  # re-centred
    # control: the same skew stays skewed without the bias update
    _, hist_none = run_skewed_router("none", steps=50)
    assert min(h[mx] for h in hist_none) > 3.0 and hist_none[-1]["moe/layer1/bias_norm"] == 0.0


def test_counts_accumulate_over_micro_batches_and_reset_each_step():
    layer = make_layer(balance="aux_free", bias_update_rate=0.01)
    torch.manual_seed(3)
    xs = [torch.randn(2, 16, 32) for _ in range(3)]
    expected = torch.zeros(8)
    for x in xs:
        layer(x)
        ids = layer.router(x.reshape(-1, 32)).expert_ids
        expected += torch.bincount(ids.reshape(-1), minlength=8).float()
    layer.on_optimizer_step()
    m = layer.metrics()
    assert m["moe/layer1/load_max_over_mean"] == pytest.approx((expected.max() / expected.mean()).item())
    assert m["moe/layer1/load_min_over_mean"] == pytest.approx((expected.min() / expected.mean()).item())
    sign = torch.sign(expected.mean() - expected)
    torch.testing.assert_close(layer.router.expert_bias, 0.01 * (sign - sign.mean()))
    bias = layer.router.expert_bias.clone()
    layer.on_optimizer_step()  # nothing routed since: no update, metrics kept
    assert torch.equal(layer.router.expert_bias, bias) and layer.metrics() == m


def test_eval_and_no_grad_forwards_leave_balancing_state_alone():
    layer = make_layer(balance="both")
    x = torch.randn(2, 8, 32)
    layer.eval()
    layer(x)
    assert layer.aux_loss is None
    layer.train()
    with torch.no_grad():
        layer(x)
    assert layer.aux_loss is None
    layer.on_optimizer_step()
    assert torch.count_nonzero(layer.router.expert_bias) == 0 and layer.metrics() == {}
    layer(x)
    assert layer.aux_loss is not None and layer.aux_loss.requires_grad


def test_aux_loss_is_coef_for_a_balanced_sequence():
    layer = make_layer(balance="aux_loss", aux_loss_coef=0.5, score_func="softmax", n_routed_experts=4,
                       top_k=1)
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform affinities; ties resolved by top-k: one expert
    layer(torch.randn(1, 8, 32))
    # all tokens to one expert: f = (4, 0, 0, 0), P = 1/4 each -> L = coef * 1
    assert layer.aux_loss.item() == pytest.approx(0.5)
    from models.moe.balancing import sequence_aux_loss
    balanced_ids = torch.arange(8).remainder(4).view(8, 1)
    loss = sequence_aux_loss(torch.rand(8, 4).softmax(-1), balanced_ids, 1, 8, "softmax", 0.5)
    skewed = sequence_aux_loss(torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1), torch.zeros(8, 1).long(),
                               1, 8, "softmax", 0.5)
    assert skewed.item() == pytest.approx(0.5 * 4 * 0.7) and loss.item() == pytest.approx(0.5, rel=0.3)


# ---- determinism -------------------------------------------------------------------------------
def test_two_builds_give_bit_identical_outputs_and_gradients():
    results = []
    for _ in range(2):
        layer = make_layer(seed=5, balance="both")
        torch.manual_seed(6)
        x = torch.randn(4, 32, 32, requires_grad=True)
        y = layer(x)
        grads = torch.autograd.grad((y.square().sum() + layer.aux_loss), [x] + list(layer.parameters()))
        results.append((y.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)
