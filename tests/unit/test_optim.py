"""The optimizer recipes: Muon equals torch.optim.Muon (per expert for [E, out, in] weights), AdamW
groups equal torch.optim.AdamW, lazy table updates leave rows no token looked up where they were."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from assembly import build_model
from core.param_groups import tag
from models import ModelConfig, Transformer
from core.config_utils import load
from memory.config import EngramConfig
from train.optim import build_optimizer as _build_optimizer, describe_optimizer, optimizer_memory, set_lr
from rundir.schema import Config, ConfigError, OptimConfig

torch.set_num_threads(1)

def build_optimizer(model: nn.Module, optim: dict) -> torch.optim.Optimizer:
    """The optimizer of an ``optim:`` mapping, loaded as the trainer loads it (rundir/schema.py)."""
    return _build_optimizer(model, load(OptimConfig, optim, "optim"))


BASE = {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}


class Toy(nn.Module):
    """A 2-D matrix, a stack of 3 expert matrices and a norm gain."""

    def __init__(self):
        super().__init__()
        self.w = tag(nn.Parameter(torch.randn(24, 16)), "matrix")
        self.experts = tag(nn.Parameter(torch.randn(3, 8, 16)), "experts")
        self.gain = tag(nn.Parameter(torch.ones(16)), "norm")


def toy_cfg(kind: str) -> dict:
    return {**BASE, "kind": kind, "groups": {"matrix": {"muon": True}, "experts": {"muon": True},
                                             "norm": {"weight_decay": 0.0, "lr_mult": 0.5}}}


def grads_for(step: int, shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return [torch.randn(s, generator=g) for s in shapes]


def run_steps(params, opt, n=4):
    for step in range(n):
        for p, g in zip(params, grads_for(step, [p.shape for p in params])):
            p.grad = g.clone()
        opt.step()


def test_muon_groups_equal_torch_muon_per_matrix_and_per_expert():
    torch.manual_seed(0)
    toy = Toy()
    ref_w = nn.Parameter(toy.w.detach().clone())
    ref_experts = [nn.Parameter(e.clone()) for e in toy.experts.detach()]
    opt = build_optimizer(toy, toy_cfg("muon"))
    run_steps([toy.w, toy.experts, toy.gain], opt)
    # torch.optim.Muon with the same lr mapping; each expert a separate [8, 16] matrix
    ref = torch.optim.Muon([ref_w, *ref_experts], lr=2e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(4):
        gw, ge, _ = grads_for(step, [toy.w.shape, toy.experts.shape, toy.gain.shape])
        ref_w.grad = gw.clone()
        for e, g in zip(ref_experts, ge):
            e.grad = g.clone()
        ref.step()
    assert torch.equal(toy.w, ref_w)
    assert torch.equal(toy.experts, torch.stack(ref_experts))
    # and not Muon on the flattened [24, 16] stack, which would orthogonalise the experts together
    torch.manual_seed(0)
    flat = nn.Parameter(Toy().experts.detach().reshape(24, 16).clone())
    flat_opt = torch.optim.Muon([flat], lr=2e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in range(4):
        flat.grad = grads_for(step, [toy.w.shape, toy.experts.shape, toy.gain.shape])[1].reshape(24, 16).clone()
        flat_opt.step()
    assert not torch.allclose(flat.view(3, 8, 16), toy.experts, atol=1e-4)


def test_adamw_groups_equal_torch_adamw():
    torch.manual_seed(0)
    toy = Toy()
    ref = copy.deepcopy(toy)
    opt = build_optimizer(toy, toy_cfg("muon"))
    run_steps([toy.w, toy.experts, toy.gain], opt)
    ref_opt = torch.optim.AdamW([ref.gain], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    for step in range(4):
        ref.gain.grad = grads_for(step, [ref.w.shape, ref.experts.shape, ref.gain.shape])[2].clone()
        ref_opt.step()
    assert torch.equal(toy.gain, ref.gain)


def test_schedule_reaches_every_group_and_lines_name_them():
    opt = build_optimizer(Toy(), toy_cfg("muon"))
    set_lr(opt, 2e-3, 0.5)
    assert {g["name"]: g["lr"] for g in opt.param_groups} == {"experts[8x16]": 1e-3, "matrix[24x16]": 1e-3,
                                                               "norm": 5e-4}
    lines = describe_optimizer(opt)
    assert len(lines) == 3 and "muon" in lines[0] and "params 384" in lines[0]
    assert "norm" in lines[2] and "adam " in lines[2] and "wd 0 " in lines[2]


def engram_model() -> Transformer:
    torch.manual_seed(0)
    return build_model(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, ffn_hidden=64, max_seq_len=16,
                                   engram=EngramConfig(layer_ids=[1], max_ngram=2, heads_per_ngram=2,
                                                       embed_dim_per_ngram=16, table_sizes=[211])))


ALL_GROUPS = {g: {} for g in ("matrix", "embed", "head", "norm", "bias", "engram_proj", "engram_conv")}


@pytest.mark.parametrize("table_update", ["dense", "lazy"])
def test_which_table_rows_move(table_update):
    """Step 1 looks rows up with batch A, step 2 with batch B. Dense Adam moves A's rows again at
    step 2 on their old momentum; lazy moves exactly the rows B looked up."""
    model = engram_model()
    cfg = {**BASE, "kind": "adamw", "table_update": table_update,
           "groups": {**ALL_GROUPS, "engram_tables": {"lr_mult": 5.0, "weight_decay": 0.0}}}
    opt = build_optimizer(model, cfg)
    table = model.layers[1].memory.tables.weight  # [rows of both heads, 8]
    gen = torch.Generator().manual_seed(0)
    touched = []
    for _ in range(2):
        idx = torch.randint(0, 64, (1, 9), generator=gen)
        before = table.detach().clone()
        opt.zero_grad()
        model(idx[:, :-1], idx[:, 1:]).loss.backward()
        touched.append(set(torch.nonzero(table.grad.abs().sum(1)).squeeze(1).tolist()))
        opt.step()
        moved = set(torch.nonzero((table.detach() != before).any(1)).squeeze(1).tolist())
    a, b = touched
    assert a - b and len(a | b) < table.shape[0] // 2  # A looked up rows B did not; most rows untouched
    assert moved == (b if table_update == "lazy" else a | b)


def test_memory_counts_tables_and_state():
    model = engram_model()
    mem = optimizer_memory(build_optimizer(model, {**BASE, "groups": {**ALL_GROUPS, "engram_tables": {}}}))
    rows = sum(model.layers[1].memory.tables.sizes)  # two heads of about 211 rows (distinct primes)
    assert rows > 400 and mem["table_params"] == rows * 8 and mem["table_bytes_fp32"] == 4 * rows * 8
    n = sum(p.numel() for p in model.parameters())
    assert mem["optimizer_state_bytes"] == 8 * n  # AdamW: exp_avg + exp_avg_sq in fp32


@pytest.mark.parametrize("change, message", [
    ({"kind": "sgd"}, "optim.kind='sgd' is not one of adamw, muon"),
    ({"table_update": "sparse"}, "optim.table_update='sparse' is not one of dense, lazy"),
    ({"groups": {"decay": {}}}, r"undeclared groups \['decay'\]"),
    ({"groups": {"norm": {"wd": 0.0}}}, "unknown config key optim.groups.norm.wd"),
    ({"muon": {"nesterov": False}}, "unknown config key optim.muon.nesterov"),
    ({"muon": {"adjust_lr_fn": "rms"}}, "optim.muon.adjust_lr_fn='rms' is not one of"),
    ({"lr": "fast"}, "config key optim.lr"),
])
def test_bad_optim_config_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        build_optimizer(Toy(), {**toy_cfg("muon"), **change})


def test_muon_refuses_what_deepspeed_would_get_wrong():
    """Checked with the config (rundir/schema.py's Config), before any model is built."""
    def config(**train):
        return load(Config, {"model": {}, "optim": toy_cfg("muon"), "train": train})

    with pytest.raises(ConfigError, match="needs train.zero_stage 1 or 2"):
        config(precision="bf16", zero_stage=0)
    with pytest.raises(ConfigError, match="needs train.grad_clip=0"):
        config(precision="bf16", zero_stage=2, grad_clip=1.0)
    _build_optimizer(Toy(), config(precision="bf16", zero_stage=2, grad_clip=0.0).optim)


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_zero_partition_step_applies_the_configured_lr_mapping(shape):
    """Under ZeRO 1/2 DeepSpeed hands over flat partitions whose gradient holds its Muon update
    (orthogonalised, times sqrt(max(1, A/B))); the step must turn that into torch.optim.Muon's step."""
    from torch.optim._muon import _zeropower_via_newtonschulz

    torch.manual_seed(0)
    w = tag(nn.Parameter(torch.randn(*shape)), "matrix")
    holder = nn.Module()
    holder.w = w
    ref = nn.Parameter(w.detach().clone())
    opt = build_optimizer(holder, {**BASE, "kind": "muon", "groups": {"matrix": {"muon": True}}})
    g = torch.randn(*shape)
    ortho = _zeropower_via_newtonschulz(g.lerp(g * 0.05, 0.95), (3.4445, -4.7750, 2.0315), 5, 1e-7).float()
    flat = nn.Parameter(w.detach().reshape(-1).clone())
    flat.grad = (ortho * max(1.0, shape[0] / shape[1]) ** 0.5).reshape(-1)
    opt.param_groups[0]["params"] = [flat]  # what ZeRO 1/2 do to every group
    opt.step()
    ref.grad = g
    torch.optim.Muon([ref], lr=2e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
    torch.testing.assert_close(flat.view(*shape), ref.detach(), rtol=0, atol=1e-7)
