"""The MoE layer on a GPU (skipped without one; benchmarks/gpu_check.sh runs these): the bf16 grouped_mm
path, the one a GPU trains on, agrees with the batched path and with fp32 on the CPU, and its forward and
backward issue no host sync (CUDA's sync debug mode turns any into an error), and compiled it is one graph."""
from __future__ import annotations

import pytest
import torch

from moe_utils import make_layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _run(layer, x):
    y = layer(x)
    grads = torch.autograd.grad(y.float().square().sum(), [x] + list(layer.parameters()), allow_unused=True)
    return y, grads


def test_cuda_grouped_mm_matches_batched_and_cpu_fp32_in_bf16():
    torch.manual_seed(3)
    x = torch.randn(4, 64, 64)
    ref, _ = _run(make_layer(seed=2, d=64, n_routed_experts=16, top_k=4), x.clone().requires_grad_())
    outs = {}
    for impl in ("batched", "grouped_mm"):
        layer = make_layer(seed=2, d=64, impl=impl, n_routed_experts=16, top_k=4).cuda().bfloat16()
        outs[impl] = _run(layer, x.cuda().bfloat16().requires_grad_())
    (yb, gb), (yg, gg) = outs["batched"], outs["grouped_mm"]
    assert yg.dtype == torch.bfloat16
    torch.testing.assert_close(yg.float(), yb.float(), rtol=0.02, atol=0.02)
    # against fp32: bf16 router inputs flip a near-tie top-k choice for the odd token, so by element
    close = torch.isclose(yg.float().cpu(), ref.detach(), rtol=0.05, atol=0.03)
    assert close.float().mean() > 0.98, f"{1 - close.float().mean():.2%} of outputs off fp32"
    for a, b in zip(gg, gb):
        if a is not None and b is not None:
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)


def test_cuda_grouped_mm_forward_and_backward_never_sync():
    layer = make_layer(seed=2, d=64, impl="grouped_mm", n_routed_experts=16, top_k=4).cuda().bfloat16()
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    _run(layer, x)  # warm-up: lazy initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            _run(layer, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_cuda_grouped_mm_layer_compiles_without_graph_breaks():
    """What train.compile=blocks compiles: a break (a device query, a host read) splits the block's graph
    and leaves the expert dispatch eager."""
    from models.moe.experts import cuda_capability

    torch._dynamo.reset()
    layer = make_layer(seed=2, d=64, impl="grouped_mm", n_routed_experts=16, top_k=4).cuda().bfloat16()
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16)
    cuda_capability(x.device.index)  # as train.compile's compile_blocks does before compiling
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]


def test_cuda_expert_parallel_exchange_on_nccl_matches_the_local_layer(inprocess_dist):
    """The expert-parallel path (counts and rows through all_to_all_single, the local reorder, the
    reverse exchange) on NCCL, with the one rank this machine has: EP size 1 over the world group takes
    every exchange a real EP group takes, and must give the local layer's outputs and gradients."""
    import torch.distributed as dist

    from models.moe.parallel import ExpertShard

    assert dist.get_backend() == "nccl"
    x = torch.randn(4, 64, 64, device="cuda", dtype=torch.bfloat16)
    outs = []
    for ep in (False, True):
        layer = make_layer(seed=2, d=64, impl="grouped_mm", n_routed_experts=16, top_k=4).cuda().bfloat16()
        if ep:
            layer.set_expert_shard(ExpertShard(1, 0, 16, dist.group.WORLD))
        outs.append(_run(layer, x.clone().requires_grad_()))
    (y0, g0), (y1, g1) = outs
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    for a, b in zip(g1, g0):
        if a is not None and b is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
