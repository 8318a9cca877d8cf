"""Expert parallelism at the layer (no DeepSpeed): sharded experts on 2 and 4 gloo processes give the
EP = 1 layer's outputs, and their gradients reduce to the EP = 1 gradients (models/moe/parallel.py)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from models.moe import MoEConfig, MoEFFN, build_moe_ffn
from models.moe.parallel import ExpertShard, local_order
from core.ports import free_port

REPO = Path(__file__).resolve().parents[2]
CFG = dict(n_routed_experts=8, n_shared_experts=1, top_k=3, expert_hidden=24, n_dense_layers=0)


def make_layer() -> MoEFFN:
    torch.manual_seed(0)
    layer = build_moe_ffn(MoEConfig(**CFG), 32, 1, init_std=0.1, out_std=0.05)
    assert isinstance(layer, MoEFFN)
    return layer


def rank_input(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each rank's own batch [2, 12, 32] and output cotangent (a different token count per rank would
    also do; the exchange sizes differ per rank anyway)."""
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, 12, 32, generator=g), torch.randn(2, 12, 32, generator=g)


def _worker(rank: int, world: int, ep: int, port: int, out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(REPO))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    ep_groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]  # DeepSpeed's layout
    edp_groups = [dist.new_group(list(range(j, world, ep))) for j in range(ep)]
    ep_rank = rank % ep
    layer = make_layer()
    layer.set_expert_shard(ExpertShard(ep, ep_rank, CFG["n_routed_experts"], ep_groups[rank // ep]))
    x, cot = rank_input(rank)
    x.requires_grad_(True)
    y = layer(x)
    (y * cot).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    for n, gr in grads.items():  # the data-parallel mean of (y * cot).sum() over the world's ranks
        group = edp_groups[ep_rank] if n.startswith("experts.") else None
        dist.all_reduce(gr, group=group)
        gr.div_(world)
    torch.save({"y": y.detach(), "x_grad": x.grad, "grads": grads, "load": layer._step_load}, Path(out, f"r{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.parametrize("world,ep", [(2, 2), pytest.param(4, 4, marks=pytest.mark.slow),
                                      pytest.param(4, 2, marks=pytest.mark.slow)])
def test_sharded_layer_matches_the_replicated_layer_in_values_and_gradients(tmp_path, world, ep):
    mp.spawn(_worker, args=(world, ep, free_port(), str(tmp_path)), nprocs=world, join=True)
    ref = make_layer()
    loss = 0.0
    outs = []
    for r in range(world):
        x, cot = rank_input(r)
        x.requires_grad_(True)
        y = ref(x)
        loss = loss + (y * cot).sum() / world
        outs.append((x, y))
    loss.backward()
    per = CFG["n_routed_experts"] // ep
    for r in range(world):
        got = torch.load(tmp_path / f"r{r}.pt")
        x, y = outs[r]
        torch.testing.assert_close(got["y"], y.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got["x_grad"], x.grad * world, rtol=1e-5, atol=1e-6)
        first = (r % ep) * per
        for n, p in ref.named_parameters():
            want = p.grad[first:first + per] if n.startswith("experts.") else p.grad
            torch.testing.assert_close(got["grads"][n], want, rtol=1e-5, atol=1e-7, msg=f"rank {r} {n}")
        assert int(got["load"].sum()) == 2 * 12 * CFG["top_k"]  # every row counted once, on its own rank


def test_local_order_is_expert_major_with_sources_in_rank_order():
    counts = torch.tensor([[2, 0, 1], [1, 2, 0]])  # [N src, L]: src 0 sends e0 e0 e2, src 1 sends e0 e1 e1
    perm, inverse = local_order(counts)
    # received rows: 0,1 (s0 e0), 2 (s0 e2), 3 (s1 e0), 4,5 (s1 e1) -> e0: 0 1 3, e1: 4 5, e2: 2
    assert perm.tolist() == [0, 1, 3, 4, 5, 2]
    assert torch.equal(perm[inverse], torch.arange(6))


def test_shard_sizes_are_checked():
    with pytest.raises(ValueError, match="must divide the routed expert count 8"):
        ExpertShard(3, 0, 8)
    layer = make_layer()
    with pytest.raises(ValueError, match="shard over 6 experts for a layer of 8"):
        layer.set_expert_shard(ExpertShard(2, 0, 6))
    layer.set_expert_shard(ExpertShard(2, 1, 8))
    assert tuple(layer.experts.w1.shape) == (4, 24, 32)
    torch.testing.assert_close(layer.experts.w2, make_layer().experts.w2[4:])  # EP = 1's experts 4..7
    assert layer.counts(16).total_params == make_layer().counts(16).total_params  # accounting stays global
