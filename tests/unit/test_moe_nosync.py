"""The MoE layer's per-step work reads nothing back to the host: dispatch and the post-step balancing
queue device work only; the load statistics are read at log steps (``metrics()``), not every step."""
from __future__ import annotations

import pytest
import torch

from models.moe import MoEConfig, MoEFFN
from models.moe.dispatch import ExpertDispatch, group_sizes
from sync_guard import no_host_sync

def test_the_guard_catches_a_sync():
    with no_host_sync(), pytest.raises(AssertionError, match="host sync"):
        torch.ones(3).sum().item()


def test_group_sizes_equal_bincount():
    g = torch.Generator().manual_seed(0)
    for n_groups in (1, 5, 64):
        ids = torch.randint(0, n_groups, (1000,), generator=g)
        ids[:3] = n_groups - 1  # the last group never empty here; others may be
        got = group_sizes(torch.sort(ids).values, n_groups)
        assert torch.equal(got, torch.bincount(ids, minlength=n_groups))
    assert torch.equal(group_sizes(torch.tensor([0, 0, 3]), 5), torch.tensor([2, 0, 0, 1, 0]))


def test_dispatch_and_balancing_step_do_not_sync():
    torch.manual_seed(0)
    cfg = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=16, n_dense_layers=0,
                    balance="aux_free", bias_update_rate=1e-2)
    moe = MoEFFN(cfg, d_model=32, layer_id=0)
    x = torch.randn(2, 16, 32)
    moe(x).sum().backward()  # the CPU expert path reads group sizes (slices need them on the host)
    ids = torch.randint(0, 8, (32, 2))
    bias_before = moe.router.expert_bias.clone()
    with no_host_sync():
        ExpertDispatch.from_expert_ids(ids, 8)
        moe.on_optimizer_step()
    assert not torch.equal(moe.router.expert_bias, bias_before)  # the bias moved on the device
    m = moe.metrics()  # the one read-back, at log steps
    assert m["moe/layer0/load_max_over_mean"] >= 1.0 and "moe/layer0/bias_norm" in m


def test_a_step_that_routed_nothing_leaves_the_bias_bit_for_bit():
    cfg = MoEConfig(n_routed_experts=4, n_shared_experts=0, top_k=1, expert_hidden=8, n_dense_layers=0,
                    balance="aux_free", bias_update_rate=1e-2)
    moe = MoEFFN(cfg, d_model=8, layer_id=0)
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.tensor([0.3, -0.1, -0.15, -0.05]))
    before = moe.router.expert_bias.clone()
    moe.on_optimizer_step()  # no training forward since the last step
    assert torch.equal(moe.router.expert_bias, before)
    assert moe.metrics() == {}


def test_model_step_sends_every_layers_load_in_one_all_reduce(monkeypatch):
    """One collective per optimizer step for all MoE layers (not one per layer), with the same bias
    updates as each layer reducing its own counts."""
    import copy

    import models.moe.layer as moe_layer
    import models.transformer as transformer
    from models.config import ModelConfig
    from models.transformer import Transformer

    moe = MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=16, n_dense_layers=1,
                    balance="aux_free", bias_update_rate=1e-2)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=2, max_seq_len=16, moe=moe))
    layers = [m for m in model.modules() if isinstance(m, MoEFFN)]
    assert len(layers) == 3
    idx = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    model(idx[:, :-1], idx[:, 1:]).loss.backward()
    per_layer = copy.deepcopy(model)
    calls = []
    real = transformer.all_reduce_sum
    monkeypatch.setattr(transformer, "all_reduce_sum", lambda t: calls.append(t.numel()) or real(t))
    monkeypatch.setattr(moe_layer, "all_reduce_sum", lambda t: calls.append(-1) or real(t))
    with no_host_sync():
        model.on_optimizer_step()
    assert calls == [3 * 8]  # one fused all-reduce of [3 layers x 8 experts], none per layer
    for m in (m for m in per_layer.modules() if isinstance(m, MoEFFN)):
        m.on_optimizer_step()
    for a, b in zip(layers, (m for m in per_layer.modules() if isinstance(m, MoEFFN))):
        assert torch.equal(a.router.expert_bias, b.router.expert_bias)
        assert not torch.equal(a.router.expert_bias, torch.zeros_like(a.router.expert_bias))
