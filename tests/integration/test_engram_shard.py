"""Sharded Engram tables at layer level (no DeepSpeed): the row layout, re-sharding, and forward /
backward of a sharded Engram layer against the replicated one on 2 and 4 gloo processes."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from memory.sharded import RowLayout, reshard_rows
from core.ports import free_port

SIZES = [[101, 103, 107], [109, 113, 127]]  # [order][head] rows: 660 in all, heads of unequal size


def test_row_layout_is_cyclic_and_covers_every_row_once():
    for world in (1, 2, 3, 4):
        held = torch.cat([RowLayout(660, r, world).global_ids() for r in range(world)])
        assert sorted(held.tolist()) == list(range(660))
        sizes = [RowLayout(660, r, world).local_rows() for r in range(world)]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 660
    assert RowLayout(10, 1, 4).global_ids().tolist() == [1, 5, 9]
    with pytest.raises(ValueError, match="bad row layout"):
        RowLayout(10, 4, 4)


@pytest.mark.parametrize("saved_world,world", [(2, 1), (2, 4), (4, 3), (3, 3)])
def test_reshard_rows_rebuilds_every_new_shard(saved_world, world):
    full = torch.randn(661, 5)
    saved = [(full[r::saved_world].clone(), RowLayout(661, r, saved_world)) for r in range(saved_world)]
    for rank in range(world):
        layout = RowLayout(661, rank, world)
        out = torch.full((layout.local_rows(), 5), float("nan"))
        for shard, lay in saved:
            reshard_rows(shard, lay, out, layout)
        assert torch.equal(out, full[rank::world])
    with pytest.raises(ValueError, match="does not fit"):
        reshard_rows(saved[0][0], saved[0][1], torch.empty(3, 5), RowLayout(600, 0, world))


def _engram(seed: int):
    from memory.engram import Engram

    torch.manual_seed(seed)
    m = Engram(1, SIZES, embed_dim_per_ngram=24, d_model=32)
    with torch.no_grad():
        m.conv.weight.normal_(0, 0.1)  # non-zero conv, so every part of the layer carries gradient
    return m


def _batch(seed: int, B: int, T: int):
    g = torch.Generator().manual_seed(seed)
    flat = [s for order in SIZES for s in order]
    ids = torch.stack([torch.randint(0, s if i % 2 else 7, (B, T), generator=g) for i, s in enumerate(flat)], -1)
    return torch.randn(B, T, 32, generator=g), ids, torch.randn(B, T, 32, generator=g)  # hot rows: 7 ids


def _layer_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    h, ids, w = _batch(0, 4 * world, 16)
    micro = [slice(4 * rank + 2 * k, 4 * rank + 2 * k + 2) for k in range(2)]  # this rank's two micro-batches
    mine = micro[0]
    ref = _engram(0)
    for sl in micro:  # gradient accumulation over two micro-steps
        ref(h[sl], ids[sl]).mul(w[sl]).sum().backward()
    own = {n: p.grad.clone() for n, p in ref.named_parameters() if n != "tables.weight"}  # before the average
    for p in ref.parameters():  # data-parallel average, as the engine does
        dist.all_reduce(p.grad)
        p.grad /= world
    results = []
    for _ in range(2):  # twice: the sharded path must repeat bit for bit
        sh = copy.deepcopy(_engram(0))
        shard = sh.tables.shard_(rank, world, group)
        y = sh(h[mine], ids[mine])
        y.mul(w[mine]).sum().backward()
        sh(h[micro[1]], ids[micro[1]]).mul(w[micro[1]]).sum().backward()
        assert shard.weight.grad is None  # the owner's sum waits for the accumulation boundary
        shard.flush()
        others = {n: p.grad.clone() for n, p in sh.named_parameters()}
        results.append((y.detach().clone(), shard.weight.grad.clone(), others))
    full_grad = ref.tables.weight.grad
    torch.save({"ref_out": ref(h[mine], ids[mine]).detach(), "ref_table_grad": full_grad[rank::world].clone(),
                "ref_others": own,
                "runs": results}, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_sharded_layer_matches_replicated(tmp_path, world):
    mp.spawn(_layer_worker, args=(world, free_port(), str(tmp_path)), nprocs=world, join=True)
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        (y0, g0, o0), (y1, g1, o1) = got["runs"]
        assert torch.equal(y0, got["ref_out"])  # a lookup is a copy: exactly the replicated rows
        if world == 2:  # the replicated order of sums: bit for bit
            assert torch.equal(g0, got["ref_table_grad"])
        torch.testing.assert_close(g0, got["ref_table_grad"], rtol=1e-6, atol=1e-7)
        assert g0.abs().sum() > 0
        assert sorted(o0) == sorted(got["ref_others"])  # the table is no longer a parameter of the module
        for name, g in got["ref_others"].items():  # projections etc.: this rank's own gradient (pre-average)
            torch.testing.assert_close(o0[name], g, rtol=1e-6, atol=1e-7)
        assert torch.equal(y0, y1) and torch.equal(g0, g1)  # deterministic
        assert all(torch.equal(o0[n], o1[n]) for n in o0)


def test_layout_rules_for_table_modes():
    from train import checkpoint as ckpt

    sharded2 = ckpt.layout(2, 0, "sharded")
    for now in (ckpt.layout(1, 0), ckpt.layout(4, 0, "sharded"), ckpt.layout(2, 0)):
        ckpt.check_layout(sharded2, now, Path("c"))  # ZeRO 0: another world size, or replicated
    ckpt.check_layout({"world_size": 2, "zero_stage": 0}, ckpt.layout(2, 0), Path("c"))  # older records
    refused = [(ckpt.layout(2, 0), ckpt.layout(2, 0, "sharded")),  # replicated -> sharded
               (ckpt.layout(2, 2, "sharded"), ckpt.layout(2, 2)),  # partitioned engine state
               (ckpt.layout(2, 2, "sharded"), ckpt.layout(4, 2, "sharded"))]
    for saved, now in refused:
        with pytest.raises(ckpt.CheckpointError, match="relaunch|resumes"):
            ckpt.check_layout(saved, now, Path("c"))


def test_sharded_tables_with_clipping_need_fp32_zero0():
    from core.config_utils import load
    from rundir.schema import Config, ConfigError

    def check(parallel: dict, **train) -> Config:
        return load(Config, {"model": {}, "parallel": parallel, "train": train})

    assert check({"engram_tables": "sharded"}).train.grad_clip == 1.0  # fp32, ZeRO 0, clipping: the trainer clips
    with pytest.raises(ConfigError, match="needs train.precision=fp32 and train.zero_stage=0"):
        check({"engram_tables": "sharded"}, zero_stage=2)
    check({"engram_tables": "sharded"}, zero_stage=2, grad_clip=0.0)
    with pytest.raises(ConfigError, match="parallel.engram_tables='striped' is not one of replicated, sharded"):
        check({"engram_tables": "striped"})
    with pytest.raises(ConfigError, match="parallel.expert=0 must be >= 1"):
        check({"expert": 0})
