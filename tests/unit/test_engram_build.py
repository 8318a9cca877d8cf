"""Engram config, table sizing, build_memory and the Hydra ``memory/`` group."""
from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from assembly import build_model, engram_tokenizer_file
from memory import EngramConfig, build_memory, solve_table_sizes, table_params_for
from memory.compression import load_compression
from memory.primes import is_prime
from memory.reference import reference_hash
from memory.sizing import resolve_base_sizes, table_primes_for
from models import ModelConfig, Transformer

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
TINY = dict(vocab_size=512, d_model=48, n_layers=3, n_heads=4, ffn_hidden=96, max_seq_len=64)
ENGRAM = dict(layer_ids=[1], max_ngram=3, heads_per_ngram=4, embed_dim_per_ngram=32, table_sizes=[211, 223])


# ---- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize("change,match", [
    (dict(table_params=1000), "exactly one"),
    (dict(table_sizes=None), "exactly one"),
    (dict(table_sizes=[100]), "one base size per order"),
    (dict(embed_dim_per_ngram=30), "not divisible"),
    (dict(max_ngram=1), "max_ngram"),
    (dict(layer_ids=[1, 1]), "unique"),
    (dict(layer_ids=[]), "at least one"),
    (dict(n_branches=0), "n_branches"),
    (dict(pad_id=-1), "pad_id"),
    (dict(table_sizes=[100, 0]), ">= 1"),
    (dict(colour="red"), "unknown config key model.engram.colour"),
    (dict(layer_ids="1"), "model.engram.layer_ids"),
    (dict(table_params=5.5, table_sizes=None), "model.engram.table_params"),
])
def test_config_rejects_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        EngramConfig.from_dict({**ENGRAM, **change})


def test_config_derived_sizes():
    c = EngramConfig.from_dict(dict(ENGRAM, max_ngram=4, table_sizes=[5, 6, 7], embed_dim_per_ngram=64))
    assert (c.n_orders, c.head_dim, c.memory_dim, c.n_heads_total) == (3, 16, 192, 12)
    solved = EngramConfig.from_dict(dict(ENGRAM, table_sizes=None, table_params=5_700_000_000))
    assert solved.table_params == 5_700_000_000


# ---- sizing --------------------------------------------------------------------------------------
def test_table_params_for_counts_prime_rows():
    primes = table_primes_for(EngramConfig(**ENGRAM))
    assert primes == {1: [[211, 223, 227, 229], [233, 239, 241, 251]]}
    assert table_params_for(EngramConfig(**ENGRAM)) == 8 * sum(primes[1][0] + primes[1][1])


@pytest.mark.parametrize("target,layers,heads,dim", [
    (5e5, [1], 4, 64), (3.3e6, [0, 2], 8, 128), (7.77e7, [1, 5, 9], 2, 96), (123457, [3], 1, 8)])
def test_solve_table_sizes_hits_budget(target, layers, heads, dim):
    cfg = EngramConfig(layer_ids=layers, max_ngram=3, heads_per_ngram=heads, embed_dim_per_ngram=dim,
                       table_sizes=[2, 2])
    bases, exact = solve_table_sizes(target, cfg)
    assert exact == table_params_for(cfg, bases)
    assert bases[0] == bases[1]  # equal split over orders by default
    per_head_row = cfg.head_dim * len(layers) * heads * 2  # one row in every table
    assert abs(exact - target) <= 4 * per_head_row + 1e-4 * target
    assert resolve_base_sizes(replace(cfg, table_sizes=None, table_params=int(target))) == bases


def test_solve_table_sizes_order_shares_and_limits():
    cfg = EngramConfig(layer_ids=[1], max_ngram=3, heads_per_ngram=4, embed_dim_per_ngram=64, table_sizes=[2, 2])
    bases, exact = solve_table_sizes(1e6, cfg, order_shares=[3, 1])
    assert bases[0] == pytest.approx(3 * bases[1], rel=0.01)
    assert abs(exact - 1e6) / 1e6 < 0.01
    with pytest.raises(ValueError, match="below the smallest"):
        solve_table_sizes(100, cfg)
    with pytest.raises(ValueError, match="order_shares"):
        solve_table_sizes(1e6, cfg, order_shares=[1])


def test_solve_paper_scale_is_fast():
    cfg = EngramConfig(layer_ids=[1, 14], max_ngram=3, heads_per_ngram=8, embed_dim_per_ngram=640,
                       table_params=5_700_000_000)
    t0 = time.perf_counter()
    bases, exact = solve_table_sizes(5.7e9, cfg)
    big_bases, big_exact = solve_table_sizes(2.6e11, cfg)  # primes around 1e8
    elapsed = time.perf_counter() - t0
    assert elapsed < 2.0
    assert abs(exact - 5.7e9) / 5.7e9 < 1e-5 and abs(big_exact - 2.6e11) / 2.6e11 < 1e-5
    primes = table_primes_for(cfg, big_bases)
    flat = [p for per_order in primes.values() for heads in per_order for p in heads]
    assert len(flat) == 32 == len(set(flat)) and all(is_prime(p) and 9e7 < p < 1.1e8 for p in flat)


# ---- build_memory --------------------------------------------------------------------------------
def test_build_memory_solves_table_params():
    cfg = ModelConfig(**TINY, engram=EngramConfig(**dict(ENGRAM, layer_ids=[0, 2], table_sizes=None,
                                                           table_params=400_000)))
    indexer, layers = build_memory(cfg.engram, cfg)
    assert sorted(layers) == [0, 2]
    _, exact = solve_table_sizes(400_000, cfg.engram)
    assert sum(m.table_params for m in layers.values()) == exact == table_params_for(cfg.engram)
    for l, m in layers.items():
        assert m.tables.sizes == [p for order in indexer.table_sizes[l] for p in order]


def test_build_memory_rejects_bad_layer_and_pad():
    with pytest.raises(ValueError, match="outside the model's layers"):
        build_memory(EngramConfig(**dict(ENGRAM, layer_ids=[3])), ModelConfig(**TINY))
    with pytest.raises(ValueError, match="pad_id"):
        build_memory(EngramConfig(**dict(ENGRAM, pad_id=512)), ModelConfig(**TINY))


def test_backbone_alone_refuses_an_engram_config():
    """models knows no memory: a config with engram needs the builder assembly.build_model hands in."""
    with pytest.raises(ValueError, match="no memory builder"):
        Transformer(ModelConfig(**TINY, engram=EngramConfig(**ENGRAM)))
    torch.manual_seed(0)
    assembled = build_model(ModelConfig(**TINY, engram=EngramConfig(**ENGRAM)))
    torch.manual_seed(0)
    engram = EngramConfig(**ENGRAM)
    by_hand = Transformer(ModelConfig(**TINY, engram=engram), memory=lambda cfg: build_memory(engram, cfg))
    assert assembled.state_dict().keys() == by_hand.state_dict().keys()
    for k, v in assembled.state_dict().items():
        assert torch.equal(v, by_hand.state_dict()[k]), k


def test_deepseek_indexer_matches_reference_pipeline(tmp_path, monkeypatch):
    monkeypatch.setenv("ISOFLOP_ENGRAM_CACHE", str(tmp_path))
    model_cfg = ModelConfig(**dict(TINY, vocab_size=129280))
    eng = EngramConfig(**dict(ENGRAM, layer_ids=[1, 2], tokenizer="deepseek", table_sizes=[5003, 5003]))
    with pytest.raises(ValueError, match="no tokenizer was handed"):
        build_memory(eng, model_cfg)  # memory knows no tokenizer names: the caller resolves them
    indexer, _ = build_memory(eng, model_cfg, engram_tokenizer_file("deepseek"))
    comp = load_compression(engram_tokenizer_file("deepseek"), tmp_path)
    assert indexer.hasher.vocab_size == comp.num_canonical
    assert indexer.hasher.pad_id == comp.lookup[2]  # the reference's pad: raw id 2, compressed
    raw = np.random.default_rng(0).integers(0, 129280, size=(2, 40))
    expected, _ = reference_hash(comp.lookup[raw], comp.num_canonical, 3, 4, [5003, 5003], [1, 2],
                                 int(comp.lookup[2]), 0)
    got = indexer(torch.from_numpy(raw))
    for l in (1, 2):
        np.testing.assert_array_equal(got[l].numpy(), expected[l])
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        build_memory(eng, ModelConfig(**TINY), engram_tokenizer_file("deepseek"))


def test_model_dtype_moves_and_checkpoints():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY, engram=EngramConfig(**ENGRAM)))
    sd = model.state_dict()
    assert not any("lookup" in k or "offsets" in k or "moduli" in k for k in sd)  # derived, not saved
    other = build_model(ModelConfig(**TINY, engram=EngramConfig(**ENGRAM)))
    other.load_state_dict(sd)
    idx = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(other(idx).logits, model(idx).logits)
    model.to(torch.bfloat16)
    assert model.memory_indexer.lookup.dtype == torch.int64
    assert model.memory_indexer.hasher.multipliers.dtype == torch.int64
    assert model(idx).logits.dtype == torch.bfloat16


# ---- Hydra group ---------------------------------------------------------------------------------
def _compose(tmp_path, overrides):
    """Compose the real memory/ and model/ groups under a minimal primary config."""
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf" / "memory", conf / "memory")
    shutil.copytree(REPO / "conf" / "model", conf / "model")
    (conf / "config.yaml").write_text("defaults:\n  - model: tiny\n  - memory: null\n  - _self_\n")
    with initialize_config_dir(config_dir=str(conf), version_base=None):
        return compose("config", overrides=overrides)


def test_memory_group_files():
    for path in sorted((REPO / "conf" / "memory").glob("*.yaml")):
        assert path.read_text().splitlines()[0] == "# @package model.engram", path
        EngramConfig.from_dict(OmegaConf.load(path))


def test_memory_group_composes_into_model(tmp_path):
    cfg = _compose(tmp_path, ["memory=engram_tiny", "model.engram.seed=3"])
    model_cfg = ModelConfig.from_dict(cfg.model)
    assert model_cfg.engram.layer_ids == [1] and model_cfg.engram.seed == 3
    model = build_model(model_cfg)
    assert model.layers[1].memory is not None
    out = model(torch.randint(0, model_cfg.vocab_size, (1, 32)))
    assert out.logits.shape == (1, 32, model_cfg.vocab_size)


def test_paper_memory_config(tmp_path):
    cfg = _compose(tmp_path, ["memory=engram_paper"])
    eng = EngramConfig.from_dict(cfg.model.engram)
    assert eng.layer_ids == [1, 14] and eng.memory_dim == 1280 and eng.heads_per_ngram == 8
    assert eng.tokenizer == "deepseek" and eng.max_ngram == 3
    assert abs(table_params_for(eng) - 5.7e9) / 5.7e9 < 1e-5
