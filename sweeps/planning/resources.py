"""Cost estimates of a planned run: device-hours and memory per device (weights, gradients,
optimizer state, activations, Engram tables). Estimates, not counts: see each docstring."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from core.config_utils import load
from models import ModelConfig
from rundir.schema import TrainConfig
from sweeps.planning.backbone import for_counting
from sweeps.planning.families import Hardware
from sweeps.planning.runspec import RunSpec

GiB = 1024 ** 3


# ---- cost estimates -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Resources:
    """Per-run cost estimates on ``hardware`` (see :func:`estimate_resources` for the assumptions)."""

    gpu_hours: float  # device-hours over all devices
    wall_hours: float  # on hardware.n_gpus devices
    weights_gib: float  # per device
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    tables_gib: float  # the Engram tables' share of weights + grads + optimizer (per device: replicated or 1/n sharded)
    total_gib: float
    gpu_mem_gib: float

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.gpu_mem_gib


_BYTES = {  # per parameter: weights, gradients, optimizer state (Adam m, v and fp32 master if any)
    "bf16": (2, 2, 12),  # bf16 weights and grads; fp32 master copy + m + v (ZeRO paper's 2 + 2 + 12)
    "fp32": (4, 4, 8),  # fp32 weights and grads; m + v
}


def _state_bytes(params: float, dp: int, zero_stage: int, precision: str) -> tuple[float, float, float]:
    """Bytes per device of weights, grads and optimizer state of ``params`` replicated over ``dp``
    data-parallel ranks: ZeRO-1 shards the optimizer state, ZeRO-2 also the gradients."""
    w, g, o = (params * b for b in _BYTES[precision])
    if zero_stage >= 1:
        o /= dp
    if zero_stage >= 2:
        g /= dp
    return w, g, o


def _sharded_table_bytes(params: float, ranks: int) -> tuple[float, float, float]:
    """Bytes per device of Engram tables sharded over ``ranks`` (``parallel.engram_tables=sharded``):
    1/ranks of the rows, kept fp32 outside the engine (fp32 weights and gradients, Adam m + v of the
    owned rows only) in either precision, and never partitioned by ZeRO."""
    w, g, o = (params * b / ranks for b in _BYTES["fp32"])
    return w, g, o


def activation_bytes_per_token(model: Mapping[str, Any], precision: str) -> float:
    """Rough bytes saved for backward per token, no recomputation, fused attention kernel.

    Per layer: residual input and norm output (2 d), q, k, v and attention output (2 q + 2 kv);
    FFN norm input and output (2 d) and four hidden-width tensors (gate, up, SiLU, product) of the
    active width (dense: ffn_hidden; MoE: (k + shared) expert_hidden, plus the k routed copies of
    the input and output, 2 k d); logits in the compute dtype, their fp32 copy and its gradient.
    Engram layers add (N - 1) embed_dim_per_ngram + 4 d per token where they sit. An estimate.
    """
    b = 2 if precision == "bf16" else 4
    cfg = ModelConfig.from_dict(for_counting(model))
    d, q = cfg.d_model, cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    moe = cfg.moe
    n_dense = min(moe.n_dense_layers, cfg.n_layers) if moe else cfg.n_layers
    attn = 2 * d + 2 * q + 2 * kv
    dense_ffn = 2 * d + 4 * cfg.ffn_hidden
    if moe:
        k, shared, hidden = moe.top_k, moe.n_shared_experts, moe.expert_hidden
        moe_ffn = 2 * d + 4 * (k + shared) * hidden + 2 * k * d
    else:
        moe_ffn = dense_ffn
    per_token = n_dense * (attn + dense_ffn) + (cfg.n_layers - n_dense) * (attn + moe_ffn)
    e = cfg.engram
    if e is not None:
        per_token += len(e.layer_ids) * (e.memory_dim + 4 * d)
    return b * per_token + (b + 4 + 4) * cfg.vocab_size


def pending_row_grad_bytes(model: Mapping[str, Any], tokens_per_rank_step: float) -> float:
    """Sharded tables' row gradients waiting for the accumulation boundary (memory/sharded.py's
    ``TableShard.pending``): every token's retrieved-memory gradient (memory_dim fp32 per Engram layer)
    with two int64 ids per hash head (row, source rank), held for all micro-steps of an optimizer step."""
    e = ModelConfig.from_dict(for_counting(model)).engram
    if e is None:
        return 0.0
    return tokens_per_rank_step * len(e.layer_ids) * (4 * e.memory_dim + 16 * e.n_heads_total)


def estimate_resources(spec: RunSpec, hardware: Hardware, ep_size: int = 1) -> Resources:
    """Device-hours at ``hardware.mfu`` of ``hardware.peak_tflops`` and memory per device.

    Memory: weights + gradients + Adam state by the ZeRO paper's accounting (bf16: 2 + 2 + 12 bytes
    per parameter, fp32: 4 + 4 + 8), under ``train.zero_stage`` over the data-parallel ranks;
    routed experts are split over ``ep_size`` expert-parallel ranks (their data-parallel degree is
    n_gpus / ep_size); Engram tables are replicated like the rest, or with ``spec.engram_tables``
    sharded split over all n_gpus in fp32 (:func:`_sharded_table_bytes`). Embedding and head count in full. Activations: :func:`activation_bytes_per_token` x micro_batch_size x seq_len, plus with
    sharded tables :func:`pending_row_grad_bytes` of a step's tokens per device.
    """
    train = load(TrainConfig, spec.train, "train")  # the trainer's defaults and value checks, not copies
    precision, zero = train.precision, int(train.zero_stage)
    gpus = hardware.n_gpus
    if gpus % ep_size:
        raise ValueError(f"expert-parallel size {ep_size} does not divide hardware.n_gpus={gpus}")
    every = spec.total_params + spec.embedding_params + spec.head_params
    sharded = spec.engram_tables == "sharded"
    replicated = every - spec.routed_expert_params - (spec.engram_params if sharded else 0)
    rep = _state_bytes(replicated, gpus, zero, precision)
    exp = _state_bytes(spec.routed_expert_params / ep_size, gpus // ep_size, zero, precision)
    tab = (_sharded_table_bytes(spec.engram_params, gpus) if sharded
           else _state_bytes(spec.engram_params, gpus, zero, precision))  # replicated: a share of rep
    micro = int(train.micro_batch_size)
    act = activation_bytes_per_token(spec.model, precision) * micro * spec.seq_len
    if sharded:
        act += pending_row_grad_bytes(spec.model, spec.global_batch_size * spec.seq_len / gpus)
    weights, grads, optim = (rep[i] + exp[i] + (tab[i] if sharded else 0.0) for i in range(3))
    device_seconds = spec.train_flops / (hardware.mfu * hardware.peak_tflops * 1e12)
    return Resources(
        gpu_hours=device_seconds / 3600.0, wall_hours=device_seconds / 3600.0 / gpus,
        weights_gib=weights / GiB, grads_gib=grads / GiB, optimizer_gib=optim / GiB, activations_gib=act / GiB,
        tables_gib=sum(tab) / GiB, total_gib=(weights + grads + optim + act) / GiB,
        gpu_mem_gib=hardware.gpu_mem_gib)
