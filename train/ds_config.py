"""The DeepSpeed engine config a run's settings generate (precision, ZeRO stage, batch split)."""
from __future__ import annotations

from omegaconf import DictConfig

from rundir.schema import parallel_of


def fp32_grad_accumulation(cfg: DictConfig) -> bool:
    """Whether DeepSpeed 0.19 can accumulate this run's bf16 gradients in fp32 (``data_types.grad_accum_dtype``).

    ZeRO 2: its partitioned fp32 gradient buffers. ZeRO 1: DeepSpeed switches to its BF16_Optimizer, whose
    fp32 gradient buffers are full size (4 bytes/param instead of 2), which refuses Muon on MoE experts
    ([E, out, in] is not a 2-D matrix), so Muon at ZeRO 1 keeps bf16 accumulation. ZeRO 0: DeepSpeed raises
    NotImplementedError for bf16 weights with fp32 accumulation.
    """
    t = cfg.train
    if t.precision != "bf16":
        return False  # fp32 weights accumulate in fp32 already
    stage = int(t.zero_stage)
    return stage == 2 or (stage == 1 and cfg.optim.kind != "muon")


def deepspeed_config(cfg: DictConfig, accum: int) -> dict:
    """The engine's config. In bf16, gradients are reduced over ranks in fp32 (``communication_data_type``,
    honoured at ZeRO 0, 1 and 2) and accumulated over micro-steps in fp32 where DeepSpeed can
    (:func:`fp32_grad_accumulation`): a bf16 sum of many micro-batch gradients keeps 8 mantissa bits.
    With sharded Engram tables the trainer clips (train/shards.py): the engine sees no table gradient."""
    t = cfg.train  # values checked by rundir.schema.check
    out = {
        "train_batch_size": int(t.global_batch_size),
        "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": 0.0 if parallel_of(cfg).engram_tables == "sharded" else float(t.grad_clip or 0.0),
        "zero_optimization": {"stage": int(t.zero_stage)},
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16":
        out["communication_data_type"] = "fp32"
        if fp32_grad_accumulation(cfg):
            out["data_types"] = {"grad_accum_dtype": "fp32"}
    return out
