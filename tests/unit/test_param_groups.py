"""Every parameter of the full MoE + Engram model sits in the optimizer group its module declares.

The table below is the contract: (module type chain : attribute path) -> group, over a model with
every component (dense and MoE layers, shared experts, router with its bias buffer, Engram with
tables, projections, norms and conv). A new parameter makes the table test fail until it is
tagged by its module and listed here.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from assembly import build_model
from core.config_utils import load
from core.param_groups import GROUPS, UndeclaredParameter, group_of, grouped_parameters, owner_path, tag
from memory.config import EngramConfig
from models import ModelConfig, Transformer
from models.moe.config import MoEConfig
from train.optim import build_optimizer, describe_optimizer
from rundir.schema import OptimConfig

REPO = Path(__file__).resolve().parents[2]
torch.set_num_threads(1)

EXPECTED = {
    "Transformer:tok_emb.weight": "embed",
    "Transformer:head.weight": "head",
    "Transformer>RMSNorm:weight": "norm",
    "Transformer>Block>RMSNorm:weight": "norm",
    "Transformer>Block>Attention:wq.weight": "matrix",
    "Transformer>Block>Attention:wk.weight": "matrix",
    "Transformer>Block>Attention:wv.weight": "matrix",
    "Transformer>Block>Attention:wo.weight": "matrix",
    "Transformer>Block>SwiGLU:w1.weight": "matrix",
    "Transformer>Block>SwiGLU:w2.weight": "matrix",
    "Transformer>Block>SwiGLU:w3.weight": "matrix",
    "Transformer>Block>MoEFFN>TopKRouter:weight": "router",
    "Transformer>Block>MoEFFN>RoutedExperts:w1": "experts",
    "Transformer>Block>MoEFFN>RoutedExperts:w2": "experts",
    "Transformer>Block>MoEFFN>RoutedExperts:w3": "experts",
    "Transformer>Block>MoEFFN>SwiGLU:w1.weight": "experts",
    "Transformer>Block>MoEFFN>SwiGLU:w2.weight": "experts",
    "Transformer>Block>MoEFFN>SwiGLU:w3.weight": "experts",
    "Transformer>Block>Engram>MultiHeadTable:weight": "engram_tables",
    "Transformer>Block>Engram:key_proj.weight": "engram_proj",
    "Transformer>Block>Engram:value_proj.weight": "engram_proj",
    "Transformer>Block>Engram:key_proj.bias": "bias",
    "Transformer>Block>Engram:value_proj.bias": "bias",
    "Transformer>Block>Engram>BranchRMSNorm:weight": "norm",
    "Transformer>Block>Engram>ShortConv>BranchRMSNorm:weight": "norm",
    "Transformer>Block>Engram>ShortConv:weight": "engram_conv",
    "Transformer>Block>HyperConnection:static_read": "residual_mix",
    "Transformer>Block>HyperConnection:static_write": "residual_mix",
    "Transformer>Block>HyperConnection:static_res": "residual_mix",
    "Transformer>Block>HyperConnection:norm_weight": "residual_mix",
    "Transformer>Block>HyperConnection:dyn_weight": "residual_mix",
    "Transformer>Block>HyperConnection:dyn_scale": "residual_mix",
}


def full_model() -> Transformer:
    """Dense first layer, MoE layers with a shared expert, Engram at two layers, two residual branches."""
    torch.manual_seed(0)
    return build_model(ModelConfig(
        vocab_size=128, d_model=32, n_layers=3, n_heads=2, ffn_hidden=64, max_seq_len=16, n_branches=2,
        moe=MoEConfig(n_routed_experts=4, n_shared_experts=1, top_k=2, expert_hidden=16, n_dense_layers=1),
        engram=EngramConfig(layer_ids=[0, 2], max_ngram=3, heads_per_ngram=2, embed_dim_per_ngram=16,
                            table_sizes=[31, 37])))


def group_table(model: nn.Module) -> dict[str, str]:
    """owner path -> group over every parameter; raises if one path maps to two groups."""
    table: dict[str, str] = {}
    for name, p in model.named_parameters():
        key, group = owner_path(model, name), group_of(p, name)
        assert table.setdefault(key, group) == group, f"{key} is in both {table[key]} and {group}"
    return table


def test_every_parameter_of_the_full_model_has_its_declared_group():
    model = full_model()
    assert model.layers[1].ffn.router.expert_bias is not None  # the bias is a buffer, not a parameter
    assert group_table(model) == EXPECTED
    assert set(EXPECTED.values()) <= set(GROUPS)


def test_a_new_parameter_fails_until_declared_and_listed():
    model = full_model()
    model.layers[1].attn.register_parameter("gain", nn.Parameter(torch.ones(32)))
    with pytest.raises(UndeclaredParameter, match=r"layers\.1\.attn\.gain \(32,\) has no declared optimizer group"):
        group_table(model)
    with pytest.raises(UndeclaredParameter, match="layers.1.attn.gain"):
        grouped_parameters(model)
    tag(model.layers[1].attn.gain, "norm")  # declared, but not in the table: the table test still fails
    table = group_table(model)
    assert table != EXPECTED and table.pop("Transformer>Block>Attention:gain") == "norm" and table == EXPECTED


def test_tag_refuses_an_unknown_group():
    with pytest.raises(ValueError, match="unknown optimizer group 'decay'"):
        tag(nn.Parameter(torch.ones(2)), "decay")


@pytest.mark.parametrize("optim", ["adamw", "muon"])
def test_optimizer_configs_cover_every_group_and_keep_engram_norms_undecayed(optim):
    base = OmegaConf.load(REPO / "conf/optim/adamw.yaml")
    cfg = OmegaConf.merge(base, OmegaConf.load(REPO / f"conf/optim/{optim}.yaml")) if optim != "adamw" else base
    cfg = OmegaConf.create({"optim": cfg}).optim  # resolve ${optim.weight_decay}
    cfg.pop("defaults", None)
    assert set(cfg.groups) == set(GROUPS)
    model = full_model()
    opt = build_optimizer(model, load(OptimConfig, cfg, "optim"))
    norm_ids = {id(m.weight) for m in model.modules() if type(m).__name__ == "BranchRMSNorm"}
    holding = [g for g in opt.param_groups if norm_ids & {id(p) for p in g["params"]}]
    assert len(norm_ids) == 6 and [g["weight_decay"] for g in holding] == [0.0]
    assert not holding[0].get("use_muon")
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    # the start-up line counts owning modules: 3 blocks x 2 + final RMSNorm; key, query, conv norm x 2 Engrams
    norm_line = next(ln for ln in describe_optimizer(opt) if ln.startswith("optim group norm "))
    assert " wd 0 " in norm_line and norm_line.endswith("[RMSNorm x7, BranchRMSNorm x6]")
