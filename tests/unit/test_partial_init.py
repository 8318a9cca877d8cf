"""A rank's slice drawn chunk by chunk (core/partial_init.py) is the whole draw's slice, bit for bit, and
leaves the generator where the whole draw leaves it (the parameters built after it initialise as in a
replicated run)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from core import partial_init
from core.partial_init import BuildShard, building, current, normal_rows, trunc_normal_blocks


def test_the_replay_check_leaves_every_generator_alone():
    partial_init._verified.clear()
    torch.manual_seed(3)
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
    cpu = torch.get_rng_state()
    assert partial_init._reproduces_torch("normal") in (True, False)
    partial_init._reproduces_torch("trunc_normal")
    assert torch.equal(torch.get_rng_state(), cpu)
    if cuda is not None:
        assert torch.equal(torch.cuda.get_rng_state(), cuda)


def _whole_then_next(draw):
    torch.manual_seed(7)
    whole = draw()
    return whole, torch.rand(5)


@pytest.mark.parametrize("rows, cols", [(1000, 32), (1003, 7), (37, 3), (17, 1), (5, 2), (4099, 16)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_table_rows_drawn_in_chunks_are_the_whole_tables_rows(monkeypatch, rows, cols, world):
    assert partial_init._reproduces_torch("normal")  # chunks, never the whole-draw fallback
    monkeypatch.setattr(partial_init, "CHUNK_ELEMENTS", 256)  # many chunks, remainders of every kind
    whole, after = _whole_then_next(lambda: nn.init.normal_(torch.empty(rows, cols), std=0.5))
    for rank in range(world):
        torch.manual_seed(7)
        got = normal_rows(rows, cols, 0.5, rank, world)
        assert torch.equal(got, whole[rank::world]), (rank, world)
        assert torch.equal(torch.rand(5), after)  # the stream continues where the whole draw left it


@pytest.mark.parametrize("n, first, count", [(16, 0, 16), (16, 4, 4), (16, 12, 4), (6, 3, 3), (10, 0, 1)])
def test_expert_blocks_drawn_in_chunks_are_the_whole_tensors_block(monkeypatch, n, first, count):
    if not partial_init._reproduces_torch("trunc_normal"):  # torch 2.13's rejection sampling: the pinned one
        pytest.skip("this torch's trunc_normal_ is not the replayed one: experts are drawn whole and sliced")
    monkeypatch.setattr(partial_init, "CHUNK_ELEMENTS", 100)  # 3 experts of 5 x 7 per chunk
    draw = lambda: nn.init.trunc_normal_(torch.empty(n, 5, 7), std=0.1, a=-0.3, b=0.3)  # noqa: E731
    whole, after = _whole_then_next(draw)
    torch.manual_seed(7)
    got = trunc_normal_blocks((n, 5, 7), 0.1, first, count)
    assert torch.equal(got, whole[first:first + count])
    assert torch.equal(torch.rand(5), after)


def test_the_build_shard_is_scoped_and_checked():
    assert current() == BuildShard()
    with building(BuildShard(1, 2, 4, 4)) as s:
        assert current() is s
    assert current() == BuildShard()
    with pytest.raises(ValueError):
        BuildShard(table_rank=2, table_world=2)
    with pytest.raises(ValueError):
        trunc_normal_blocks((4, 2), 0.1, 3, 2)


def test_a_model_built_for_a_shard_holds_the_whole_models_slices_and_nothing_more(monkeypatch):
    """An MoE + Engram model built for rank 1 of 2 (its block of experts, its rows of the tables): every
    parameter is the full model's, sliced; the experts and table rows of the other rank were never held."""
    from assembly import build_model
    from memory.config import EngramConfig
    from memory.layers import MultiHeadTable
    from models import ModelConfig
    from models.moe.config import MoEConfig
    from models.moe.experts import RoutedExperts

    monkeypatch.setattr(partial_init, "CHUNK_ELEMENTS", 512)
    cfg = ModelConfig(vocab_size=512, d_model=48, n_layers=3, n_heads=4, ffn_hidden=96, max_seq_len=64,
                      moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=16,
                                    n_dense_layers=1),
                      engram=EngramConfig(layer_ids=[1], max_ngram=3, heads_per_ngram=4, embed_dim_per_ngram=32,
                                          table_sizes=[211, 223]))
    torch.manual_seed(0)
    whole = dict(build_model(cfg).named_parameters())
    torch.manual_seed(0)
    with building(BuildShard(table_rank=1, table_world=2, expert_first=4, expert_count=4)):
        part = build_model(cfg)
    held = dict(part.named_parameters())
    assert held.keys() == whole.keys()
    kinds = {n: type(m) for n, m in part.named_modules()}
    sliced = {"table": 0, "experts": 0}
    for name, p in held.items():
        owner = kinds[name.rsplit(".", 1)[0]]
        if owner is MultiHeadTable:
            want, sliced["table"] = whole[name][1::2], sliced["table"] + 1
        elif owner is RoutedExperts:
            want, sliced["experts"] = whole[name][4:8], sliced["experts"] + 1
        else:
            want = whole[name]
        assert torch.equal(p, want), name
    assert sliced == {"table": 1, "experts": 3 * 2}  # 1 Engram layer's table; w1, w2, w3 of 2 MoE layers
    table = next(m for m in part.modules() if isinstance(m, MultiHeadTable))
    with pytest.raises(RuntimeError, match="after shard_"):
        table(torch.zeros(1, 2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot hold rows 0::2"):
        table.shard_(0, 2)
    table.shard_(1, 2)
    assert torch.equal(table.shard.weight, whole[next(n for n in whole if "table" in n)][1::2])
