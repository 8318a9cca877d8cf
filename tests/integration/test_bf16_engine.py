"""bf16 gradients accumulate and reduce in fp32: the engine built from train.trainer.deepspeed_config reports it.

A tiny MoE model, the project's optimizer and the generated config go through ``deepspeed.initialize`` on CPU
(gloo, one rank) at ZeRO 0, 1 and 2; what the engine and its optimizer wrapper report is asserted, and two
micro-steps and an optimizer step run, so the configuration also trains.
"""
from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from assembly import build_model
from trainer_utils import REPO, TINY_MODEL
from train.ds_config import deepspeed_config, fp32_grad_accumulation
from train.optim import build_optimizer
from rundir.schema import check

pytestmark = pytest.mark.usefixtures("one_thread")
ACCUM = 2


@pytest.fixture(scope="module")
def dist_world(inprocess_dist):
    """A one-rank gloo process group for in-process engines (conftest: torn down, env restored)."""
    return inprocess_dist


def _cfg(zero: int, kind: str = "adamw", precision: str = "bf16"):
    over = [*TINY_MODEL, "model=moe", "train.seq_len=16", "train.micro_batch_size=2",
            f"train.global_batch_size={2 * ACCUM}", f"train.precision={precision}", f"train.zero_stage={zero}",
            f"optim={kind}", "train.grad_clip=0"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=over)


def _engine(cfg):
    import deepspeed

    torch.manual_seed(0)
    config = check(cfg)
    model = build_model(config.model)
    optimizer = build_optimizer(model, config.optim)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, ACCUM))
    return engine


def _train_one_step(engine, vocab: int) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(ACCUM):
        x = torch.randint(0, vocab, (2, 17), generator=g)
        out = engine(x[:, :-1], x[:, 1:])
        engine.backward(out.loss)
        engine.step()
    assert engine.global_steps == 1


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_bf16_engine_reduces_and_accumulates_in_fp32(dist_world, zero):
    cfg = _cfg(zero)
    engine = _engine(cfg)
    model_dtype, accum_dtype = engine.get_data_types()
    assert model_dtype == torch.bfloat16
    assert engine.communication_data_type == torch.float32  # every stage's all-reduce / reduce-scatter
    opt = engine.optimizer
    if zero == 0:  # DeepSpeed 0.19 has no fp32 accumulation for bf16 weights at stage 0 (NotImplementedError)
        assert not fp32_grad_accumulation(cfg) and accum_dtype == torch.bfloat16
    elif zero == 1:  # DeepSpeed's BF16_Optimizer, fp32 gradient buffers
        assert type(opt).__name__ == "BF16_Optimizer" and opt.grad_acc_dtype == torch.float32
        assert {g.dtype for g in opt.fp32_groups_gradients_flat} == {torch.float32}
    else:  # ZeRO-2 optimizer: fp32 accumulation buffers, fp32 reduce
        assert type(opt).__name__ == "DeepSpeedZeroOptimizer"
        assert opt.gradient_accumulation_dtype == torch.float32 and opt.communication_data_type == torch.float32
    if zero:
        assert accum_dtype == torch.float32
    _train_one_step(engine, cfg.model.vocab_size)


@pytest.mark.slow
def test_muon_bf16_zero2_accumulates_in_fp32(dist_world):
    """Muon on [E, out, in] experts: ZeRO 2 accumulates in fp32; ZeRO 1 cannot (BF16_Optimizer refuses 3-D Muon)."""
    assert not fp32_grad_accumulation(_cfg(1, "muon"))
    engine = _engine(_cfg(2, "muon"))
    assert engine.get_data_types() == (torch.bfloat16, torch.float32)
    assert engine.optimizer.gradient_accumulation_dtype == torch.float32
    _train_one_step(engine, 1024)


def test_fp32_config_has_no_precision_keys():
    ds = deepspeed_config(_cfg(2, precision="fp32"), ACCUM)
    assert "data_types" not in ds and "communication_data_type" not in ds and not ds["bf16"]["enabled"]
