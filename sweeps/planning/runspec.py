"""The planner's description of one run (:class:`RunSpec`) and the sections of the trainer's config it
decides (:meth:`RunSpec.config`; sweeps/planning/runconfig.py resolves them into the run's config.yaml)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


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
    memory_ablated: bool = False  # control arm: tables of one row, P_tot lower, FLOPs kept (sweeps/planning/ablation.py)
    expert_parallel: int = 1  # the plan's --ep-size: the trainer's parallel.expert (routed experts a multiple of it)
    engram_tables: str = "replicated"  # the plan's --engram-tables: the trainer's parallel.engram_tables

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

    def config(self, include_name: bool = True) -> dict:
        """The sections of the trainer's config this plan decides (model incl. moe/engram, train, optim,
        data): :func:`sweeps.planning.runconfig.resolve_run_config` completes them with the trainer's defaults.
        ``optim.kind`` picks the trainer's whole recipe for that optimizer (conf/optim/<kind>.yaml)."""
        out: dict = {"experiment_name": self.name} if include_name else {}
        out["model"] = self.model
        out["train"] = {**self.train, "seq_len": self.seq_len, "global_batch_size": self.global_batch_size,
                        "train_tokens": self.train_tokens}
        out["optim"] = dict(self.optim)
        if self.data_dir is not None:
            out["data"] = {"dir": self.data_dir}
        parallel = {**({"expert": self.expert_parallel} if self.expert_parallel > 1 else {}),
                    **({"engram_tables": self.engram_tables} if self.engram_tables != "replicated" else {})}
        if parallel:
            out["parallel"] = parallel
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
            "expert_parallel": self.expert_parallel, "engram_tables": self.engram_tables,
            "flops_per_token": self.flops_per_token, "forward_flops_per_token": self.forward_flops_per_token,
            "flops_drift": self.flops_drift, "total_params_error": self.total_params_error,
            "active_params_error": self.active_params_error,
            "seq_len": self.seq_len, "global_batch_size": self.global_batch_size, "steps": self.steps,
            "train_sequences": self.train_sequences, "last_step_sequences": self.last_step_sequences,
            "train_tokens": self.train_tokens, "tokens_per_active_param": self.tokens_per_active_param,
            "tokens_per_total_param": self.tokens_per_total_param, "lookups_per_row": self.lookups_per_row,
            "train_flops": self.train_flops, "train_flops_error": self.train_flops_error,
            "model": self.model, "train": dict(self.train), "optim": dict(self.optim), "data_dir": self.data_dir,
            "config": self.config(),
        }
