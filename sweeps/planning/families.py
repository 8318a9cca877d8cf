"""Model families: Hydra configs (``conf/family/<name>.yaml``) that map a compute budget to a backbone.

A family holds everything shared by its models (vocabulary, sequence length, MoE routing, Engram
layout, optimiser and trainer settings, the sparsity P_tot / P_act and the tokens-per-active-parameter
rule) and a ladder of *rungs*, each a backbone shape (width, depth, heads, expert size, Engram
layers). The budget solver (:mod:`sweeps.planning.budget`) picks the rung for a budget and derives
everything else (expert counts, Engram table sizes, tokens) from the models' own counts.

A family is a :class:`Family` dataclass tree loaded like every config of the project
(:func:`core.config_utils.load`: an OmegaConf structured merge that refuses unknown keys and wrong
types in one line; values checked in ``__post_init__``). Its ``model``, ``moe`` and ``engram``
sections (family-wide and per rung) are partial :class:`ModelConfig` / :class:`MoEConfig` /
:class:`EngramConfig` mappings, checked against those dataclasses' keys and types; ``train`` and
``optim`` are partial :class:`rundir.schema.TrainConfig` / :class:`rundir.schema.OptimConfig` sections,
checked the same way when the family loads (a typo fails ``make plan``, not the first launch).

A rung has optional sub-mappings ``model``, ``moe``, ``engram`` and ``train`` that
are merged over the family-level ones. Where a rung gives no ``model.ffn_hidden``, the dense
layers get ``(top_k + n_shared_experts) * expert_hidden``: the FFN width a token sees in an MoE
layer (DeepSeekMoE's convention), so dense and MoE layers cost the same per token.

This module only loads and validates; it computes no parameter or FLOP counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from omegaconf import MISSING

from core.config_utils import ConfigError, check_keys, load
from memory.config import EngramConfig
from models.config import ModelConfig
from models.moe.config import MoEConfig
from rundir.schema import OptimConfig, TrainConfig

FAMILY_DIR = Path(__file__).resolve().parents[2] / "conf" / "family"

# Keys the solver owns: a family may not set them (they are solved per budget and rho).
_SOLVED_MOE_KEYS = ("n_routed_experts",)
_SOLVED_ENGRAM_KEYS = ("table_sizes", "table_params")
_SOLVED_MODEL_KEYS = ("vocab_size", "max_seq_len", "moe", "engram")
_SOLVED_TRAIN_KEYS = ("seq_len", "train_tokens", "max_steps")


def _positive(where: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where} must be positive and finite, got {value!r}")


def _reject(where: str, mapping: Mapping, keys: tuple[str, ...]) -> None:
    bad = sorted(k for k in keys if k in mapping)
    if bad:
        raise ValueError(f"{where} may not set {bad}: the budget solver derives them")


def _check_sections(where: str, model: Mapping, moe: Mapping, engram: Mapping, train: Mapping) -> None:
    """Partial backbone sections: keys and types of their dataclasses (the trainer's schema for ``train``),
    minus what the solver owns."""
    check_keys(ModelConfig, model, f"{where}model")
    check_keys(TrainConfig, train, f"{where}train")
    check_keys(MoEConfig, moe, f"{where}moe")
    check_keys(EngramConfig, engram, f"{where}engram")
    _reject(f"{where}model", model, _SOLVED_MODEL_KEYS)
    _reject(f"{where}moe", moe, _SOLVED_MOE_KEYS)
    _reject(f"{where}engram", engram, _SOLVED_ENGRAM_KEYS)
    _reject(f"{where}train", train, _SOLVED_TRAIN_KEYS)


@dataclass
class BudgetRule:
    """Tokens per active parameter D / P_act (P_act without embedding and head).

    The solver picks the rung whose rho = 1 model, trained on the whole budget, gets the tokens per
    active parameter closest (in log) to ``tokens_per_active_param``; a budget that gives even the
    smallest rung fewer than ``min_tokens_per_active_param`` (or the largest more than
    ``max_tokens_per_active_param``) is outside the family.
    """

    tokens_per_active_param: float = MISSING
    min_tokens_per_active_param: float = MISSING
    max_tokens_per_active_param: float = MISSING

    def __post_init__(self):
        for name in ("tokens_per_active_param", "min_tokens_per_active_param", "max_tokens_per_active_param"):
            _positive(f"budget_rule.{name}", getattr(self, name))
        lo, mid, hi = self.min_tokens_per_active_param, self.tokens_per_active_param, self.max_tokens_per_active_param
        if not lo <= mid <= hi:
            raise ValueError(f"budget_rule needs min <= tokens_per_active_param <= max, got {lo}, {mid}, {hi}")


@dataclass
class Hardware:
    """What the cost estimates assume (not used to build models)."""

    name: str = "H100"
    peak_tflops: float = 989.0  # dense bf16 peak of one device, TFLOP/s
    mfu: float = 0.35  # model FLOPs utilisation (active-parameter FLOPs, the models' own counts)
    n_gpus: int = 8
    gpu_mem_gib: float = 80.0  # memory of one device

    def __post_init__(self):
        _positive("hardware.peak_tflops", self.peak_tflops)
        _positive("hardware.gpu_mem_gib", self.gpu_mem_gib)
        _positive("hardware.n_gpus", self.n_gpus)
        if not 0 < self.mfu <= 1:
            raise ValueError(f"hardware.mfu must lie in (0, 1], got {self.mfu}")


@dataclass
class Tolerances:
    """What every plan must satisfy (the solver raises rather than return a plan outside them)."""

    total_params: float = 0.005  # |P_tot(rho) / P_tot(rho = 1) - 1|
    train_flops: float = 0.002  # |training FLOPs / budget - 1| (tokens are solved to the sequence)
    flops_drift: float = 0.02  # |FLOPs per token(rho) / FLOPs per token(rho = 1) - 1|
    active_params: float = 0.01  # |P_act(rho) / P_act(rho = 1) - 1| (Engram's projections are active)

    def __post_init__(self):
        for name in ("total_params", "train_flops", "flops_drift", "active_params"):
            v = getattr(self, name)
            if not 0 < v < 1:
                raise ValueError(f"tolerances.{name} must lie in (0, 1), got {v}")


@dataclass
class ReferencePoint:
    """A published sweep point the family should land on (for relative-error reports)."""

    budget: float = MISSING
    rho: float = MISSING
    total_params: Optional[float] = None
    active_params: Optional[float] = None
    n_routed_experts: Optional[int] = None
    source: str = ""

    def targets(self) -> dict[str, float]:
        return {k: v for k, v in (("total_params", self.total_params), ("active_params", self.active_params),
                                  ("n_routed_experts", self.n_routed_experts)) if v is not None}


@dataclass
class Rung:
    """One backbone shape: sub-mappings merged over the family's (name '': ``rung<i>``); checked by the family."""

    name: str = ""
    model: Dict[str, Any] = field(default_factory=dict)
    moe: Dict[str, Any] = field(default_factory=dict)
    engram: Dict[str, Any] = field(default_factory=dict)
    train: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Family:
    name: str = MISSING
    description: str = ""
    vocab_size: int = MISSING
    seq_len: int = MISSING
    data_dir: Optional[str] = None
    sparsity: float = MISSING  # P_tot / P_act of the rho = 1 model
    budget_rule: BudgetRule = MISSING
    model: Dict[str, Any] = field(default_factory=dict)
    moe: Dict[str, Any] = MISSING  # needs top_k and n_shared_experts
    engram: Dict[str, Any] = field(default_factory=dict)
    train: Dict[str, Any] = field(default_factory=dict)
    optim: Dict[str, Any] = field(default_factory=dict)
    warmup_frac: Optional[float] = None
    hardware: Hardware = field(default_factory=Hardware)
    tolerances: Tolerances = field(default_factory=Tolerances)
    rungs: Tuple[Rung, ...] = MISSING
    reference_points: Tuple[ReferencePoint, ...] = ()
    budgets: Tuple[float, ...] = ()  # the family's standard sweep budgets (training FLOPs per run)

    def __post_init__(self):
        rungs = tuple(r if r.name else replace(r, name=f"rung{i}") for i, r in enumerate(self.rungs))
        self.rungs = rungs  # a loaded list becomes the declared tuple
        self.reference_points = tuple(self.reference_points)
        self.budgets = tuple(self.budgets)
        for name in ("vocab_size", "seq_len", "sparsity"):
            _positive(name, getattr(self, name))
        for i, budget in enumerate(self.budgets):
            _positive(f"budgets[{i}]", budget)
        if self.sparsity <= 1:
            raise ValueError(f"sparsity (P_tot / P_act) must exceed 1, got {self.sparsity}")
        _check_sections("", self.model, self.moe, self.engram, self.train)
        check_keys(OptimConfig, self.optim, "optim")
        missing = [k for k in ("top_k", "n_shared_experts") if k not in self.moe]
        if missing:
            raise ValueError(f"moe.{missing[0]} is required")
        if self.warmup_frac is not None and not 0 <= self.warmup_frac < 1:
            raise ValueError(f"warmup_frac must lie in [0, 1), got {self.warmup_frac}")
        self._check_rungs()

    def _check_rungs(self) -> None:
        if not self.rungs:
            raise ValueError("rungs must be a non-empty list of backbone shapes")
        if len({r.name for r in self.rungs}) != len(self.rungs):
            raise ValueError(f"rung names must be unique, got {[r.name for r in self.rungs]}")
        for i, rung in enumerate(self.rungs):
            _check_sections(f"rungs[{i}].", rung.model, rung.moe, rung.engram, rung.train)
            if "expert_hidden" not in self.rung_moe(i):
                raise ValueError(f"rung {rung.name} has no moe.expert_hidden")
            batch = self.rung_train(i).get("global_batch_size")
            if isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0:
                raise ValueError(f"rung {rung.name} train.global_batch_size must be a positive integer, got {batch!r}")

    # ---- per-rung configuration ---------------------------------------------------------------
    def rung_model(self, i: int) -> dict:
        """ModelConfig fields of rung i, without ``moe`` / ``engram``."""
        rung = self.rungs[i]
        model = {**self.model, **rung.model, "vocab_size": self.vocab_size, "max_seq_len": self.seq_len}
        if "ffn_hidden" not in model:
            moe = self.rung_moe(i)
            model["ffn_hidden"] = (moe["top_k"] + moe["n_shared_experts"]) * moe["expert_hidden"]
        return model

    def rung_moe(self, i: int) -> dict:
        """MoEConfig fields of rung i except ``n_routed_experts`` (solved)."""
        return {**self.moe, **self.rungs[i].moe}

    def rung_engram(self, i: int) -> dict:
        """EngramConfig fields of rung i except the table size (solved)."""
        return {**self.engram, **self.rungs[i].engram}

    def rung_train(self, i: int) -> dict:
        """Trainer settings (``train.*``) of rung i, without seq_len / train_tokens (solved)."""
        return {**self.train, **self.rungs[i].train}

    def with_train(self, **updates: Any) -> "Family":
        """This family with family-level ``train.*`` settings replaced (e.g. zero_stage=2)."""
        _reject(f"family {self.name}: train", updates, _SOLVED_TRAIN_KEYS)
        train = {**self.train, **updates}
        rungs = tuple(replace(r, train={k: v for k, v in r.train.items() if k not in updates}) for r in self.rungs)
        return replace(self, train=train, rungs=rungs)

    def with_hardware(self, **updates: Any) -> "Family":
        """This family with some hardware assumptions replaced (None values are ignored)."""
        return replace(self, hardware=replace(self.hardware, **{k: v for k, v in updates.items() if v is not None}))

    def launch_data_dir(self, override: Optional[str] = None) -> str:
        """The token shards this family's runs train on: ``override`` (``--data-dir``) or the family's.

        Called before launching, never when only planning: a plan or dry run trains nothing. Without
        it a run would fall back to the trainer's default corpus (the stdlib BPE-8k one) and train a
        model of this family's vocabulary on another tokenizer's ids.
        """
        data_dir = override if override is not None else self.data_dir
        if not data_dir:
            raise ValueError(f"family {self.name}: data_dir is required to launch runs (a corpus tokenized for its "
                             f"{self.vocab_size}-token vocabulary); pass --data-dir or set data_dir in the family")
        return str(data_dir)


def family_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> Family:
    """A family mapping (as loaded from YAML) as a :class:`Family`, or one ValueError line naming the key."""
    name = raw.get("name", source) if isinstance(raw, Mapping) else source
    try:
        return load(Family, raw)
    except ConfigError as e:
        raise ConfigError(f"family {name}: {e}") from None


def available_families() -> list[str]:
    return sorted(p.stem for p in FAMILY_DIR.glob("*.yaml"))


def load_family(name_or_path: str) -> Family:
    """A family by name (``conf/family/<name>.yaml``) or by path to a YAML file."""
    from omegaconf import OmegaConf

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        path = FAMILY_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise ValueError(f"unknown family '{name_or_path}' (available: {', '.join(available_families())})")
    return family_from_dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True), source=str(path))
