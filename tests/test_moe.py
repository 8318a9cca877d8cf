"""DeepSeekMoE layer: reference equality, dense equivalence, balancing, determinism, accounting."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from core.param_groups import group_of, grouped_parameters
from models.config import ModelConfig
from models.ffn import SwiGLU
from models.moe import MoEConfig, MoEFFN, build_moe_ffn
from models.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)


def make_layer(seed: int = 0, d: int = 32, layer_id: int = 1, **moe) -> MoEFFN:
    torch.manual_seed(seed)
    cfg = dict(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=24, n_dense_layers=0)
    cfg.update(moe)
    layer = build_moe_ffn(MoEConfig(**cfg), d, layer_id, init_std=0.1, out_std=0.05)
    assert isinstance(layer, MoEFFN)
    return layer


# ---- naive reference ---------------------------------------------------------------------------
def swiglu_ref(x, w1, w3, w2):
    """One token through one SwiGLU expert; weights in nn.Linear layout ([out, in])."""
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def naive_moe(layer: MoEFFN, x: torch.Tensor):
    """Per-token loop: score, biased top-k, unbiased weights, sum of experts (+ shared)."""
    cfg, r, ex = layer.cfg, layer.router, layer.experts
    B, T, d = x.shape
    outs, scores_all, chosen_all = [], [], []
    for t in range(B * T):
        xt = x.reshape(B * T, d)[t]
        logits = (r.weight @ xt).float()
        s = torch.sigmoid(logits) if cfg.score_func == "sigmoid" else torch.softmax(logits, -1)
        chosen = torch.topk(s.detach() + r.expert_bias, cfg.top_k).indices.tolist()
        g = torch.stack([s[e] for e in chosen])
        if cfg.norm_topk:
            g = g / g.sum()
        g = g * cfg.route_scale
        y = torch.zeros(d)
        for j, e in enumerate(chosen):
            y = y + g[j] * swiglu_ref(xt, ex.w1[e], ex.w3[e], ex.w2[e])
        if layer.shared is not None:
            sh = layer.shared
            y = y + swiglu_ref(xt, sh.w1.weight, sh.w3.weight, sh.w2.weight)
        outs.append(y)
        scores_all.append(s)
        chosen_all.append(chosen)
    aux = None
    if cfg.uses_aux_loss:
        E, k = cfg.n_routed_experts, cfg.top_k
        per_seq = []
        for b in range(B):
            f = torch.zeros(E)
            p = torch.zeros(E)
            for t in range(b * T, (b + 1) * T):
                for e in chosen_all[t]:
                    f[e] += E / (k * T)
                s = scores_all[t]
                p = p + (s / s.sum()) / T
            per_seq.append((f * p).sum())
        aux = cfg.aux_loss_coef * torch.stack(per_seq).mean()
    return torch.stack(outs).view(B, T, d), aux


def grads_of(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor, aux, gy: torch.Tensor):
    loss = (out * gy).sum() + (aux if aux is not None else 0.0)
    params = [p for _, p in module.named_parameters()]
    return torch.autograd.grad(loss, [x] + params)


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


def _dist_worker(rank: int, world: int, init_file: str, q):
    import traceback

    import torch.distributed as dist
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        layer = make_layer(seed=0, balance="aux_free", bias_update_rate=0.01)
        torch.manual_seed(100 + rank)  # different data per rank
        x = torch.randn(2, 16, 32) + 0.5 * rank
        layer(x)
        local = torch.bincount(layer.router(x.reshape(-1, 32)).expert_ids.reshape(-1), minlength=8).float()
        layer.on_optimizer_step()
        # plain lists: a tensor in a queue is shared by file descriptor, which dies with this process
        q.put((rank, local.tolist(), layer.router.expert_bias.tolist(), layer.metrics()))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        q.put((rank, traceback.format_exc()))
        raise


def test_bias_update_all_reduces_counts_over_ranks(tmp_path):
    import torch.multiprocessing as mp
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, str(tmp_path / "init"), q)) for r in range(2)]
    for p in procs:
        p.start()
    res = sorted([q.get(timeout=120) for _ in procs], key=lambda r: r[0])
    for p in procs:
        p.join(timeout=60)
    for r in res:
        assert len(r) == 4, f"rank {r[0]} failed:\n{r[1]}"
    res = [(rank, torch.tensor(local), torch.tensor(bias), metrics) for rank, local, bias, metrics in res]
    assert all(p.exitcode == 0 for p in procs)
    total = res[0][1] + res[1][1]
    assert not torch.equal(res[0][1], res[1][1])
    sign = torch.sign(total.mean() - total)
    for _, _, bias, metrics in res:
        torch.testing.assert_close(bias, 0.01 * (sign - sign.mean()))
        assert metrics["moe/layer1/load_max_over_mean"] == pytest.approx((total.max() / total.mean()).item())


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


_DETERMINISM_SCRIPT = textwrap.dedent("""
    import hashlib, torch
    from models.config import ModelConfig
    from models.moe.config import MoEConfig
    from models.transformer import Transformer
    torch.set_num_threads(1)
    torch.manual_seed(0)
    moe = dict(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32, n_dense_layers=1,
               balance='both')
    model = Transformer(ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, ffn_hidden=96,
                                    max_seq_len=64, moe=MoEConfig(**moe)))
    idx = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    out = model(idx, idx.roll(-1, 1), return_logits=True)
    out.loss.backward()
    h = hashlib.sha256(out.logits.detach().numpy().tobytes())
    for p in model.parameters():
        h.update(p.grad.numpy().tobytes())
    print(h.hexdigest())
""")


def test_two_processes_give_bit_identical_logits_and_gradients():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    digests = [subprocess.run([sys.executable, "-c", _DETERMINISM_SCRIPT], cwd=REPO, env=env, check=True,
                              capture_output=True, text=True).stdout.strip() for _ in range(2)]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


# ---- expert compute paths ----------------------------------------------------------------------
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


# ---- accounting --------------------------------------------------------------------------------
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


# ---- integration -------------------------------------------------------------------------------
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
