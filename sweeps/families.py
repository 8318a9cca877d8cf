"""Model families: Hydra configs (``conf/family/<name>.yaml``) that map a compute budget to a backbone.

A family holds everything shared by its models (vocabulary, sequence length, MoE routing, Engram
layout, optimiser and trainer settings, the sparsity P_tot / P_act and the tokens-per-active-parameter
rule) and a ladder of *rungs*, each a backbone shape (width, depth, heads, expert size, Engram
layers). The budget solver (:mod:`sweeps.budget`) picks the rung for a budget and derives
everything else (expert counts, Engram table sizes, tokens) from the models' own counts.

A rung is a mapping with optional sub-mappings ``model``, ``moe``, ``engram`` and ``train`` that
are merged over the family-level ones. Where a rung gives no ``model.ffn_hidden``, the dense
layers get ``(top_k + n_shared_experts) * expert_hidden``: the FFN width a token sees in an MoE
layer (DeepSeekMoE's convention), so dense and MoE layers cost the same per token.

This module only loads and validates; it computes no parameter or FLOP counts.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional

FAMILY_DIR = Path(__file__).resolve().parents[1] / "conf" / "family"

# Keys the solver owns: a family may not set them (they are solved per budget and rho).
_SOLVED_MOE_KEYS = ("n_routed_experts",)
_SOLVED_ENGRAM_KEYS = ("table_sizes", "table_params")
_SOLVED_MODEL_KEYS = ("vocab_size", "max_seq_len", "moe", "engram")
_SOLVED_TRAIN_KEYS = ("seq_len", "train_tokens", "max_steps")
_RUNG_KEYS = ("name", "model", "moe", "engram", "train")
_TOP_KEYS = ("name", "description", "vocab_size", "seq_len", "data_dir", "sparsity", "budgets", "budget_rule", "model",
             "moe", "engram", "train", "optim", "warmup_frac", "hardware", "tolerances", "rungs",
             "reference_points")


def _positive(where: str, value: Any, kind=float) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where} must be a positive number, got {value!r}")
    if kind is int and int(value) != value:
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{where} must be positive and finite, got {value!r}")
    return kind(value)


def _mapping(where: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a mapping, got {type(value).__name__}")
    return copy.deepcopy(dict(value))


def _reject(where: str, mapping: Mapping, keys: tuple[str, ...]) -> None:
    bad = sorted(k for k in keys if k in mapping)
    if bad:
        raise ValueError(f"{where} may not set {bad}: the budget solver derives them")


@dataclass(frozen=True)
class BudgetRule:
    """Tokens per active parameter D / P_act (P_act without embedding and head).

    The solver picks the rung whose rho = 1 model, trained on the whole budget, gets the tokens per
    active parameter closest (in log) to ``tokens_per_active_param``; a budget that gives even the
    smallest rung fewer than ``min_tokens_per_active_param`` (or the largest more than
    ``max_tokens_per_active_param``) is outside the family.
    """

    tokens_per_active_param: float
    min_tokens_per_active_param: float
    max_tokens_per_active_param: float

    def __post_init__(self):
        lo, mid, hi = self.min_tokens_per_active_param, self.tokens_per_active_param, self.max_tokens_per_active_param
        if not lo <= mid <= hi:
            raise ValueError(f"budget_rule needs min <= tokens_per_active_param <= max, got {lo}, {mid}, {hi}")


@dataclass(frozen=True)
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
        _positive("hardware.n_gpus", self.n_gpus, int)
        if not 0 < self.mfu <= 1:
            raise ValueError(f"hardware.mfu must lie in (0, 1], got {self.mfu}")


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class ReferencePoint:
    """A published sweep point the family should land on (for relative-error reports)."""

    budget: float
    rho: float
    total_params: Optional[float] = None
    active_params: Optional[float] = None
    n_routed_experts: Optional[int] = None
    source: str = ""

    def targets(self) -> dict[str, float]:
        return {k: v for k, v in (("total_params", self.total_params), ("active_params", self.active_params),
                                  ("n_routed_experts", self.n_routed_experts)) if v is not None}


@dataclass(frozen=True)
class Rung:
    """One backbone shape: sub-mappings merged over the family's."""

    name: str
    model: dict = field(default_factory=dict)
    moe: dict = field(default_factory=dict)
    engram: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    vocab_size: int
    seq_len: int
    data_dir: Optional[str]
    sparsity: float  # P_tot / P_act of the rho = 1 model
    budget_rule: BudgetRule
    model: dict
    moe: dict
    engram: dict
    train: dict
    optim: dict
    warmup_frac: Optional[float]
    hardware: Hardware
    tolerances: Tolerances
    rungs: tuple[Rung, ...]
    reference_points: tuple[ReferencePoint, ...] = ()
    budgets: tuple[float, ...] = ()  # the family's standard sweep budgets (training FLOPs per run)

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


def _parse_rung(where: str, raw: Any, index: int) -> Rung:
    raw = _mapping(where, raw)
    unknown = sorted(set(raw) - set(_RUNG_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown} (allowed: {list(_RUNG_KEYS)})")
    model, moe, engram, train = (_mapping(f"{where}.{k}", raw.get(k)) for k in ("model", "moe", "engram", "train"))
    _reject(f"{where}.model", model, _SOLVED_MODEL_KEYS)
    _reject(f"{where}.moe", moe, _SOLVED_MOE_KEYS)
    _reject(f"{where}.engram", engram, _SOLVED_ENGRAM_KEYS)
    _reject(f"{where}.train", train, _SOLVED_TRAIN_KEYS)
    return Rung(str(raw.get("name", f"rung{index}")), model, moe, engram, train)


def family_from_dict(raw: Mapping[str, Any], source: str = "<dict>") -> Family:
    """Validate a family mapping (as loaded from YAML) into a :class:`Family`."""
    raw = _mapping(f"family {source}", raw)
    unknown = sorted(set(raw) - set(_TOP_KEYS))
    if unknown:
        raise ValueError(f"family {source}: unknown keys {unknown} (allowed: {list(_TOP_KEYS)})")
    for key in ("name", "vocab_size", "seq_len", "sparsity", "budget_rule", "moe", "rungs"):
        if raw.get(key) is None:
            raise ValueError(f"family {source}: missing required key '{key}'")
    name = str(raw["name"])
    where = f"family {name}"
    sparsity = _positive(f"{where}: sparsity", raw["sparsity"])
    if sparsity <= 1:
        raise ValueError(f"{where}: sparsity (P_tot / P_act) must exceed 1, got {sparsity}")
    rule = _mapping(f"{where}: budget_rule", raw["budget_rule"])
    try:
        budget_rule = BudgetRule(**{k: _positive(f"{where}: budget_rule.{k}", v) for k, v in rule.items()})
    except TypeError as e:
        raise ValueError(f"{where}: budget_rule needs tokens_per_active_param, min_tokens_per_active_param and "
                         f"max_tokens_per_active_param ({e})") from None
    model, moe, engram = (_mapping(f"{where}: {k}", raw.get(k)) for k in ("model", "moe", "engram"))
    _reject(f"{where}: model", model, _SOLVED_MODEL_KEYS)
    _reject(f"{where}: moe", moe, _SOLVED_MOE_KEYS)
    _reject(f"{where}: engram", engram, _SOLVED_ENGRAM_KEYS)
    for key in ("top_k", "n_shared_experts"):
        if key not in moe:
            raise ValueError(f"{where}: moe.{key} is required")
    train = _mapping(f"{where}: train", raw.get("train"))
    _reject(f"{where}: train", train, _SOLVED_TRAIN_KEYS)
    warmup_frac = raw.get("warmup_frac")
    if warmup_frac is not None and not 0 <= float(warmup_frac) < 1:
        raise ValueError(f"{where}: warmup_frac must lie in [0, 1), got {warmup_frac}")
    budgets = raw.get("budgets") or ()
    if not isinstance(budgets, (list, tuple)):
        raise ValueError(f"{where}: budgets must be a list of training FLOPs, got {budgets!r}")
    budgets = tuple(_positive(f"{where}: budgets[{i}]", b) for i, b in enumerate(budgets))
    raw_rungs = raw["rungs"]
    if not isinstance(raw_rungs, (list, tuple)) or not raw_rungs:
        raise ValueError(f"{where}: rungs must be a non-empty list of backbone shapes")
    rungs = tuple(_parse_rung(f"{where}: rungs[{i}]", r, i) for i, r in enumerate(raw_rungs))
    if len({r.name for r in rungs}) != len(rungs):
        raise ValueError(f"{where}: rung names must be unique, got {[r.name for r in rungs]}")
    try:
        hardware = Hardware(**_mapping(f"{where}: hardware", raw.get("hardware")))
        tolerances = Tolerances(**_mapping(f"{where}: tolerances", raw.get("tolerances")))
        refs = tuple(ReferencePoint(**_mapping(f"{where}: reference_points[{i}]", r))
                     for i, r in enumerate(raw.get("reference_points") or ()))
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None
    fam = Family(
        name=name, description=str(raw.get("description", "")),
        vocab_size=_positive(f"{where}: vocab_size", raw["vocab_size"], int),
        seq_len=_positive(f"{where}: seq_len", raw["seq_len"], int),
        data_dir=None if raw.get("data_dir") is None else str(raw["data_dir"]),
        sparsity=sparsity, budget_rule=budget_rule, model=model, moe=moe, engram=engram, train=train,
        optim=_mapping(f"{where}: optim", raw.get("optim")),
        warmup_frac=None if warmup_frac is None else float(warmup_frac),
        hardware=hardware, tolerances=tolerances, rungs=rungs, reference_points=refs, budgets=budgets)
    for i, rung in enumerate(fam.rungs):
        if "expert_hidden" not in fam.rung_moe(i):
            raise ValueError(f"{where}: rung {rung.name} has no moe.expert_hidden")
        _positive(f"{where}: rung {rung.name} train.global_batch_size",
                  fam.rung_train(i).get("global_batch_size"), int)
    return fam


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
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return family_from_dict(raw, source=str(path))
