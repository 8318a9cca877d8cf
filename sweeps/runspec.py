"""The planner's description of one run (:class:`RunSpec`) and its Hydra serialisation: the
overrides that make ``train/main.py`` train exactly that run."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Optional


# ---- the run description ------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One run of a plan: the model, its counts and the trainer settings that spend the budget."""

    family: str
    rung: str
    budget: float
    rho: float  # requested
    rho_effective: float  # inactive routed-expert params / P_sparse of the built model
    model: dict  # full ModelConfig mapping (moe and engram included), as the trainer receives it
    seq_len: int
    global_batch_size: int
    train_sequences: int  # the run's sequences; the last optimizer step may be short (train/data.py)
    train: dict  # further train.* settings (micro_batch_size, precision, zero_stage, ...)
    optim: dict  # optim.* settings of the family (warmup_steps derived from warmup_frac)
    data_dir: Optional[str]
    total_params: int
    active_params: int
    embedding_params: int
    head_params: int
    routed_expert_params: int  # all routed experts of all MoE layers
    engram_params: int  # Engram table parameters
    engram_dense_params: int  # Engram projections, norms and convolution (all active)
    forward_flops_per_token: float
    flops_drift: float  # flops_per_token / flops_per_token(rho = 1) - 1
    total_params_error: float  # total_params / total_params(rho = 1) - 1
    active_params_error: float = 0.0  # active_params / active_params(rho = 1) - 1 (Engram's dense parts)
    engram_dim_reduced_from: Optional[int] = None  # drift compensation (b), if it was needed
    memory_ablated: bool = False  # control arm: tables of one row, P_tot lower, FLOPs kept (sweeps/ablation.py)

    @property
    def n_routed_experts(self) -> int:
        return int(self.model["moe"]["n_routed_experts"])

    @property
    def top_k(self) -> int:
        return int(self.model["moe"]["top_k"])

    @property
    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward)."""
        return 3.0 * self.forward_flops_per_token

    @property
    def steps(self) -> int:
        """Optimizer steps (the trainer's ``train.data.run_length`` of ``train_tokens``)."""
        return -(-self.train_sequences // self.global_batch_size)

    @property
    def last_step_sequences(self) -> int:
        return self.train_sequences - (self.steps - 1) * self.global_batch_size

    @property
    def train_tokens(self) -> int:
        return self.train_sequences * self.seq_len

    @property
    def train_flops(self) -> float:
        return self.flops_per_token * self.train_tokens

    @property
    def train_flops_error(self) -> float:
        return self.train_flops / self.budget - 1.0

    @property
    def tokens_per_active_param(self) -> float:
        return self.train_tokens / self.active_params

    @property
    def tokens_per_total_param(self) -> float:
        return self.train_tokens / self.total_params

    @property
    def lookups_per_row(self) -> Optional[float]:
        """Engram lookups per table row over the run, mean over rows (None without Engram): each token
        looks up one row per hash head, order and Engram layer; a row holds ``head_dim`` parameters."""
        eng = self.model.get("engram")
        if not eng or not self.engram_params:
            return None
        heads, orders = int(eng["heads_per_ngram"]), int(eng["max_ngram"]) - 1
        rows = self.engram_params / (int(eng["embed_dim_per_ngram"]) // heads)
        return self.train_tokens * len(eng["layer_ids"]) * orders * heads / rows

    @property
    def name(self) -> str:
        """Deterministic run name, e.g. ``paper-C2e20-rho0.8`` (``...-rho0.8-ablate`` for the memory ablation)."""
        budget = f"{self.budget:.3g}".replace("+", "")
        rho = f"{self.rho:.3f}".rstrip("0").rstrip(".")
        return f"{self.family}-C{budget}-rho{rho}" + ("-ablate" if self.memory_ablated else "")

    def overrides(self, include_name: bool = True) -> list[str]:
        """Hydra overrides that make ``python train/main.py`` train exactly this run."""
        # A null typed section (model.moe / model.engram) cannot take a mapping override (omegaconf 2.3
        # merges into the null node and fails): a group fills it first; the override then sets every field.
        out = [g for g, section in (("model=moe", "moe"), ("memory=engram_tiny", "engram")) if self.model[section]]
        out += [f"++model.{k}={hydra_value(v)}" for k, v in self.model.items() if k not in ("moe", "engram")]
        out += [f"++model.moe={hydra_value(self.model['moe'])}",
                f"++model.engram={hydra_value(self.model['engram'])}",
                f"train.seq_len={self.seq_len}", f"train.global_batch_size={self.global_batch_size}",
                f"train.train_tokens={self.train_tokens}"]
        out += [f"++train.{k}={hydra_value(v)}" for k, v in _flatten(self.train)]
        # optim.kind picks the whole conf/optim/<kind>.yaml (groups, Muon settings), not just the key
        out += [f"optim={self.optim['kind']}"] if "kind" in self.optim else []
        out += [f"++optim.{k}={hydra_value(v)}" for k, v in _flatten(self.optim) if k != "kind"]
        if self.data_dir is not None:
            out.append(f"data.dir={hydra_value(self.data_dir)}")
        if include_name:
            out.append(f"experiment_name={self.name}")
        return out

    def to_dict(self) -> dict:
        return {
            "name": self.name, "family": self.family, "rung": self.rung, "budget": self.budget,
            "rho": self.rho, "rho_effective": self.rho_effective,
            "total_params": self.total_params, "active_params": self.active_params,
            "sparse_params": self.total_params - self.active_params,
            "embedding_params": self.embedding_params, "head_params": self.head_params,
            "n_routed_experts": self.n_routed_experts,
            "n_shared_experts": int(self.model["moe"]["n_shared_experts"]),
            "top_k": self.top_k, "routed_expert_params": self.routed_expert_params,
            "engram_params": self.engram_params, "engram_dense_params": self.engram_dense_params,
            "engram_table_sizes": None if self.model["engram"] is None else list(self.model["engram"]["table_sizes"]),
            "engram_dim_reduced_from": self.engram_dim_reduced_from, "memory_ablated": self.memory_ablated,
            "flops_per_token": self.flops_per_token, "forward_flops_per_token": self.forward_flops_per_token,
            "flops_drift": self.flops_drift, "total_params_error": self.total_params_error,
            "active_params_error": self.active_params_error,
            "seq_len": self.seq_len, "global_batch_size": self.global_batch_size, "steps": self.steps,
            "train_sequences": self.train_sequences, "last_step_sequences": self.last_step_sequences,
            "train_tokens": self.train_tokens, "tokens_per_active_param": self.tokens_per_active_param,
            "tokens_per_total_param": self.tokens_per_total_param, "lookups_per_row": self.lookups_per_row,
            "train_flops": self.train_flops, "train_flops_error": self.train_flops_error,
            "model": self.model, "train": dict(self.train), "optim": dict(self.optim), "data_dir": self.data_dir,
            "overrides": self.overrides(),
        }


def _flatten(mapping: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in mapping.items():
        if isinstance(v, Mapping):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


_BARE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-./]*$")  # strings Hydra reads back unchanged without quotes
_RESERVED = {"true", "false", "null", "inf", "nan"}


def hydra_value(v: Any) -> str:
    """A value in Hydra's override grammar (strings quoted unless a bare word; mappings and lists inline)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"cannot pass non-finite value {v} as a Hydra override")
        return repr(v)
    if isinstance(v, str):
        if _BARE.match(v) and v.lower() not in _RESERVED:
            return v
        if "${" in v:
            raise ValueError(f"string {v!r} would be read as an interpolation by Hydra")
        # Hydra unescapes backslashes only before a quote or at the end of a quoted string.
        escaped = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, v).replace("'", "\\'")
        return "'" + escaped + "'"
    if isinstance(v, Mapping):
        for k in v:
            if not (isinstance(k, str) and k.isidentifier()):
                raise ValueError(f"mapping key {k!r} cannot be written as a Hydra override")
        return "{" + ",".join(f"{k}:{hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(hydra_value(x) for x in v) + "]"
    raise ValueError(f"cannot write {type(v).__name__} value {v!r} as a Hydra override")
