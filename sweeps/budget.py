"""Iso-parameter / iso-FLOP budget solver: the one place that turns (budget C, allocation rho) into a model.

Definitions (the Engram paper's). P_tot and P_act are the total and per-token-active parameters
without the vocabulary embedding and the output head; P_sparse = P_tot - P_act. rho is the share of
P_sparse held by routed experts that a token does not use; the rest, (1 - rho) P_sparse, sits in
Engram tables. rho = 1 is the pure MoE baseline.

Procedure for a family, a budget C and a list of rho values:

1. Backbone. Every rung of the family is instantiated on the meta device (no memory) at N = k+1 and
   k+2 routed experts (k = top_k). Its counts are linear in N, so the two builds give the marginal
   cost of one routed expert; the expert count N_1 of the rho = 1 model is the integer whose
   P_tot / P_act is closest to the family's sparsity (checked on the built model). The rung used is
   the one whose rho = 1 model, trained on all of C, sees tokens per active parameter closest (in
   log) to the family's rule.
2. Experts per rho. Lowering rho removes routed experts: N(rho) = k + round(rho (N_1 - k)); the k
   active and the shared experts stay, so the per-token expert compute is unchanged.
3. Engram tables. The model with N(rho) experts and Engram at the smallest possible tables is
   built; everything it holds besides its tables (experts, backbone, Engram projections, norms,
   convolution) is subtracted from P_tot(rho = 1), and :func:`memory.sizing.solve_table_sizes`
   turns the remainder into prime table sizes. P_tot stays within the family's tolerance of the
   rho = 1 model (prime gaps leave a few rows per head).
4. Tokens. Each run trains for the whole number of optimizer steps whose training FLOPs
   (3 x forward FLOPs per token x tokens, attention and head included, lookups 0) are closest to
   C, so every run of a plan spends C within the family's tolerance.

Active FLOPs drift. At rho < 1 the Engram value/key projections, gate and convolution are active
(+FLOPs per token) while the removed experts' router columns are gone (-FLOPs); the net drift is
reported per run. Compensation: (a) the iso-FLOP token solve of step 4 charges the drift to the
token count, so every run spends exactly the same compute; (b) if the per-token drift still
exceeds the family's ``tolerances.flops_drift``, the Engram memory width (embed_dim_per_ngram) is
lowered in steps of heads_per_ngram until it fits, and the freed projection parameters go to the
tables; the reduction is reported. A plan that cannot be brought within every tolerance raises.

All counts come from the modules' own ``counts()`` / ``table_params``; nothing here re-derives a
per-module parameter or FLOP formula (only the activation-memory estimate of the cost report is a
shape-based approximation). Engram table sizes do not depend on the tokenizer, so models
are counted with identity compression and the family's tokenizer is only written into the run.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

import torch

from memory.config import EngramConfig
from memory.sizing import solve_table_sizes
from models import ModelConfig, Transformer
from models.accounting import ModelCounts
from models.moe import MoEConfig
from sweeps.families import Family, Hardware

GiB = 1024 ** 3


# ---- counting instantiated models ----------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    """Counts of one model built on the meta device."""

    counts: ModelCounts
    table_params: int  # Engram table parameters over all layers (0 without Engram)

    @property
    def total(self) -> int:
        return self.counts.total_params

    @property
    def active(self) -> int:
        return self.counts.active_params

    @property
    def forward_flops(self) -> float:
        return self.counts.flops_per_token

    @property
    def train_flops(self) -> float:
        return self.counts.train_flops_per_token


def _for_counting(model: Mapping[str, Any]) -> dict:
    """The config with Engram on identity compression: table sizes and counts do not depend on the
    tokenizer, and counting must not load one."""
    model = dict(model)
    if model.get("engram") is not None:
        model["engram"] = {**model["engram"], "tokenizer": None, "pad_id": None}
    return model


def measure(model: Mapping[str, Any], seq_len: int) -> Measured:
    """Instantiate ``Transformer(ModelConfig(**model))`` on the meta device and read its counts."""
    cfg = ModelConfig.from_dict(_for_counting(model))
    with torch.device("meta"):
        net = Transformer(cfg)
    tables = sum(int(blk.memory.table_params) for blk in net.layers if blk.memory is not None)
    return Measured(net.model_counts(seq_len), tables)


# ---- step 1: the rho = 1 backbone of a rung --------------------------------------------------------
@dataclass(frozen=True)
class Backbone:
    """A rung's rho = 1 (pure MoE) model with its expert count solved for the family's sparsity."""

    rung: int
    name: str
    model: dict  # full ModelConfig mapping, moe included, engram None
    measured: Measured
    top_k: int
    n_routed: int
    expert_sparse_params: int  # P_sparse added by one more routed expert (its weights in all MoE layers)

    @property
    def inactive_experts(self) -> int:
        return self.n_routed - self.top_k

    def tokens_per_active_param(self, budget: float) -> float:
        return budget / self.measured.train_flops / self.measured.active


def _moe_model(family: Family, rung: int, n_routed: int) -> dict:
    """Every ModelConfig / MoEConfig field spelled out (runs do not depend on config defaults)."""
    moe = MoEConfig.from_dict({**family.rung_moe(rung), "n_routed_experts": int(n_routed)}).to_dict()
    return ModelConfig.from_dict({**family.rung_model(rung), "moe": moe, "engram": None}).to_dict()


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def solve_backbone(family: Family, rung: int, ep_size: int = 1, round_experts_to_ep: bool = False) -> Backbone:
    """Expert count of rung ``rung`` at rho = 1: P_tot / P_act closest to ``family.sparsity``
    (a multiple of ``ep_size`` when ``round_experts_to_ep``; divisibility of the counts actually run
    is checked per rho by :func:`experts_for_rho`)."""
    name = family.rungs[rung].name
    k = int(family.rung_moe(rung)["top_k"])
    m1, m2 = (measure(_moe_model(family, rung, n), family.seq_len) for n in (k + 1, k + 2))
    d_tot, d_act = m2.total - m1.total, m2.active - m1.active
    d_sparse = d_tot - d_act
    if d_sparse <= 0:
        raise ValueError(f"family {family.name}, rung {name}: adding a routed expert adds no inactive parameters "
                         f"(does the rung have any MoE layer?)")
    s = family.sparsity
    # P_tot(n) = a + d_tot n, P_act(n) = c + d_act n; solve P_tot / P_act = s for n.
    a, c = m1.total - (k + 1) * d_tot, m1.active - (k + 1) * d_act
    denom = d_tot - s * d_act
    n_star = (s * c - a) / denom if denom > 0 else math.inf
    if not math.isfinite(n_star) or n_star > 1e6:
        raise ValueError(f"family {family.name}, rung {name}: sparsity {s} is out of reach (router columns "
                         f"grow P_act as fast as experts grow P_tot)")
    step = ep_size if round_experts_to_ep else 1
    lowest = step * math.ceil((k + 1) / step)
    candidates = sorted({max(lowest, step * math.floor(n_star / step)), max(lowest, step * math.ceil(n_star / step))})
    best = None
    for n in candidates:
        m = measure(_moe_model(family, rung, n), family.seq_len)
        err = abs(math.log(m.total / m.active / s))
        if best is None or err < best[0]:
            best = (err, n, m)
    _, n1, m = best
    return Backbone(rung, name, _moe_model(family, rung, n1), m, k, n1, d_sparse)


def select_backbone(family: Family, budget: float, ep_size: int = 1,
                    round_experts_to_ep: bool = False) -> tuple[Backbone, list[Backbone]]:
    """The rung for ``budget`` (tokens per active parameter closest to the rule) and all rungs."""
    rule = family.budget_rule
    backbones = [solve_backbone(family, i, ep_size, round_experts_to_ep) for i in range(len(family.rungs))]
    by_size = sorted(backbones, key=lambda b: b.measured.active)
    smallest, largest = by_size[0], by_size[-1]
    if smallest.tokens_per_active_param(budget) < rule.min_tokens_per_active_param:
        need = rule.min_tokens_per_active_param * smallest.measured.active * smallest.measured.train_flops
        raise ValueError(f"budget {budget:.3g} FLOPs is below family {family.name}'s smallest model (rung "
                         f"{smallest.name}, {smallest.measured.active / 1e6:.3g}M active params would see "
                         f"{smallest.tokens_per_active_param(budget):.3g} tokens per active param, minimum "
                         f"{rule.min_tokens_per_active_param:g}); use a budget >= {need:.3g}")
    if largest.tokens_per_active_param(budget) > rule.max_tokens_per_active_param:
        most = rule.max_tokens_per_active_param * largest.measured.active * largest.measured.train_flops
        raise ValueError(f"budget {budget:.3g} FLOPs is above family {family.name}'s largest model (rung "
                         f"{largest.name} would see {largest.tokens_per_active_param(budget):.3g} tokens per "
                         f"active param, maximum {rule.max_tokens_per_active_param:g}); use a budget <= {most:.3g}")
    target = math.log(rule.tokens_per_active_param)
    chosen = min(backbones, key=lambda b: abs(math.log(b.tokens_per_active_param(budget)) - target))
    return chosen, backbones


# ---- step 2: experts per rho --------------------------------------------------------------------
def experts_for_rho(n_routed: int, top_k: int, rho: float, ep_size: int = 1, round_to_ep: bool = False) -> int:
    """Routed experts kept at ``rho``: k + round(rho (N_1 - k)); a multiple of ep_size, or an error."""
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must lie in [0, 1], got {rho}")
    ideal = top_k + rho * (n_routed - top_k)
    if not round_to_ep:
        n = top_k + _round_half_up(rho * (n_routed - top_k))
        if n % ep_size:
            raise ValueError(f"rho={rho:g} keeps {n} routed experts, not divisible by expert-parallel size "
                             f"{ep_size} (pass round_experts_to_ep / --round-experts-to-ep to round)")
        return n
    n = ep_size * _round_half_up(ideal / ep_size)
    return min(max(n, ep_size * math.ceil(top_k / ep_size)), n_routed)


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
    steps: int
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
    engram_dim_reduced_from: Optional[int] = None  # drift compensation (b), if it was needed

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
    def train_tokens(self) -> int:
        return self.steps * self.global_batch_size * self.seq_len

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
    def name(self) -> str:
        """Deterministic run name, e.g. ``paper-C2e20-rho0.8``."""
        budget = f"{self.budget:.3g}".replace("+", "")
        rho = f"{self.rho:.3f}".rstrip("0").rstrip(".")
        return f"{self.family}-C{budget}-rho{rho}"

    def overrides(self, include_name: bool = True) -> list[str]:
        """Hydra overrides that make ``python train/main.py`` train exactly this run."""
        out = [f"++model.{k}={hydra_value(v)}" for k, v in self.model.items() if k not in ("moe", "engram")]
        out += [f"++model.moe={hydra_value(self.model['moe'])}",
                f"++model.engram={hydra_value(self.model['engram'])}",
                f"train.seq_len={self.seq_len}", f"train.global_batch_size={self.global_batch_size}",
                f"train.train_tokens={self.train_tokens}"]
        out += [f"++train.{k}={hydra_value(v)}" for k, v in _flatten(self.train)]
        out += [f"++optim.{k}={hydra_value(v)}" for k, v in _flatten(self.optim)]
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
            "engram_dim_reduced_from": self.engram_dim_reduced_from,
            "flops_per_token": self.flops_per_token, "forward_flops_per_token": self.forward_flops_per_token,
            "flops_drift": self.flops_drift, "total_params_error": self.total_params_error,
            "seq_len": self.seq_len, "global_batch_size": self.global_batch_size, "steps": self.steps,
            "train_tokens": self.train_tokens, "tokens_per_active_param": self.tokens_per_active_param,
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


# ---- steps 3 and 4: one rho ------------------------------------------------------------------------
def _full_engram(family: Family, rung: int) -> dict:
    """The rung's Engram mapping with every EngramConfig field, tables unset."""
    raw = family.rung_engram(rung)
    if not raw:
        raise ValueError(f"family {family.name} has no engram settings: rho < 1 needs Engram layers and widths")
    cfg = EngramConfig.from_any({**raw, "table_params": 1}).to_dict()
    cfg["table_params"] = None
    return cfg


def _with_tables(model: dict, engram: dict, base_sizes: Sequence[int]) -> dict:
    return {**model, "engram": {**engram, "table_sizes": [int(b) for b in base_sizes], "table_params": None}}


def _engram_probe(model: dict, engram: dict, seq_len: int) -> Measured:
    """The model with the smallest possible Engram tables (base size 2 per order)."""
    n_orders = int(engram["max_ngram"]) - 1
    return measure(_with_tables(model, engram, [2] * n_orders), seq_len)


def _narrow_memory_for_drift(engram: dict, moe_model: dict, base: Measured, tol: float, seq_len: int,
                             where: str) -> tuple[dict, Measured, Optional[int]]:
    """Compensation (b): the widest Engram memory (embed_dim_per_ngram, in steps of heads_per_ngram)
    whose model keeps |FLOPs per token / rho=1 - 1| <= tol. Returns (engram, probe, original width
    or None when the configured width already fits)."""
    probe = _engram_probe(moe_model, engram, seq_len)
    drift = probe.train_flops / base.train_flops - 1.0
    if abs(drift) <= tol:
        return engram, probe, None
    heads, width = int(engram["heads_per_ngram"]), int(engram["embed_dim_per_ngram"])
    for dim in range(width - heads, 0, -heads):
        narrower = {**engram, "embed_dim_per_ngram": dim}
        probe = _engram_probe(moe_model, narrower, seq_len)
        drift = probe.train_flops / base.train_flops - 1.0
        if abs(drift) <= tol:
            return narrower, probe, width
    raise ValueError(f"{where}: active FLOPs per token drift {drift:+.2%} from rho=1 even at the narrowest "
                     f"Engram memory (tolerance {tol:.0%})")


def _steps_for_budget(budget: float, train_flops_per_token: float, tokens_per_step: int, tol: float,
                      where: str) -> int:
    """Whole optimizer steps whose training FLOPs are closest to ``budget`` (within ``tol``)."""
    exact = budget / (train_flops_per_token * tokens_per_step)
    steps = max(1, _round_half_up(exact))
    err = steps / exact - 1.0
    if abs(err) > tol:
        raise ValueError(f"{where}: budget {budget:.3g} buys {exact:.2f} steps of {tokens_per_step:,} tokens; whole "
                         f"steps miss it by {err:+.1%} (tolerance {tol:.0%}): raise the budget or lower "
                         f"train.global_batch_size")
    return steps


def solve_point(family: Family, backbone: Backbone, budget: float, rho: float, ep_size: int = 1,
                round_experts_to_ep: bool = False, data_dir: Optional[str] = None) -> RunSpec:
    """The run of allocation ``rho`` at ``budget`` on ``backbone`` (all tolerances checked)."""
    tol = family.tolerances
    base = backbone.measured
    k = backbone.top_k
    n = experts_for_rho(backbone.n_routed, k, rho, ep_size, round_experts_to_ep)
    where = f"family {family.name}, rung {backbone.name}, rho={rho:g}"
    dim_from = None
    if n == backbone.n_routed:
        if rho < 1.0:
            step = (ep_size if round_experts_to_ep else 1) / backbone.inactive_experts
            raise ValueError(f"{where}: frees no routed expert ({n} kept of {backbone.n_routed}; the smallest "
                             f"step in rho is {step:.3g}): use rho=1 or a lower rho")
        model, final, engram_dense = backbone.model, base, 0
    else:
        moe_model = _moe_model(family, backbone.rung, n)
        engram, probe, dim_from = _narrow_memory_for_drift(_full_engram(family, backbone.rung), moe_model, base,
                                                           tol.flops_drift, family.seq_len, where)
        without_tables = probe.total - probe.table_params  # experts, backbone and Engram's dense parts
        engram_dense = without_tables - measure(moe_model, family.seq_len).total
        table_budget = base.total - without_tables
        try:
            base_sizes, _ = solve_table_sizes(max(1, table_budget), {**engram, "table_params": max(1, table_budget),
                                                                     "tokenizer": None, "pad_id": None})
        except ValueError as e:
            raise ValueError(f"{where}: the {backbone.n_routed - n} removed experts leave {table_budget:,} params "
                             f"for Engram tables, too few ({e})") from None
        model = _with_tables(moe_model, engram, base_sizes)
        final = measure(model, family.seq_len)
    param_err = final.total / base.total - 1.0
    if abs(param_err) > tol.total_params:
        raise ValueError(f"{where}: P_tot {final.total:,} is {param_err:+.3%} from rho=1 ({base.total:,}), "
                         f"tolerance {tol.total_params:.1%}")
    drift = final.train_flops / base.train_flops - 1.0
    if abs(drift) > tol.flops_drift:
        raise ValueError(f"{where}: FLOPs per token drift {drift:+.2%} exceeds {tol.flops_drift:.0%}")

    train = family.rung_train(backbone.rung)
    batch = int(train.pop("global_batch_size"))
    steps = _steps_for_budget(budget, final.train_flops, batch * family.seq_len, tol.train_flops, where)
    optim = dict(family.optim)
    if family.warmup_frac is not None:
        optim["warmup_steps"] = _round_half_up(family.warmup_frac * steps)
    return RunSpec(
        family=family.name, rung=backbone.name, budget=float(budget), rho=float(rho),
        rho_effective=(n - k) * backbone.expert_sparse_params / (final.total - final.active),
        model=model, seq_len=family.seq_len, global_batch_size=batch, steps=steps, train=train, optim=optim,
        data_dir=data_dir if data_dir is not None else family.data_dir,
        total_params=final.total, active_params=final.active,
        embedding_params=final.counts.embedding_params, head_params=final.counts.head_params,
        routed_expert_params=n * backbone.expert_sparse_params,  # router columns are active, not counted here
        engram_params=final.table_params, engram_dense_params=engram_dense,
        forward_flops_per_token=final.forward_flops, flops_drift=drift, total_params_error=param_err,
        engram_dim_reduced_from=dim_from)


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
    tables_gib: float  # the Engram tables' share of weights + grads + optimizer (replicated tables)
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


def activation_bytes_per_token(model: Mapping[str, Any], precision: str) -> float:
    """Rough bytes saved for backward per token, no recomputation, fused attention kernel.

    Per layer: residual input and norm output (2 d), q, k, v and attention output (2 q + 2 kv);
    FFN norm input and output (2 d) and four hidden-width tensors (gate, up, SiLU, product) of the
    active width (dense: ffn_hidden; MoE: (k + shared) expert_hidden, plus the k routed copies of
    the input and output, 2 k d); logits in the compute dtype, their fp32 copy and its gradient.
    Engram layers add (N - 1) embed_dim_per_ngram + 4 d per token where they sit. An estimate.
    """
    b = 2 if precision == "bf16" else 4
    cfg = ModelConfig.from_dict(_for_counting(model))
    d, q = cfg.d_model, cfg.n_heads * cfg.head_dim
    kv = cfg.n_kv_heads * cfg.head_dim
    moe = cfg.moe or {}
    n_dense = int(moe.get("n_dense_layers", cfg.n_layers)) if moe else cfg.n_layers
    n_dense = min(n_dense, cfg.n_layers)
    attn = 2 * d + 2 * q + 2 * kv
    dense_ffn = 2 * d + 4 * cfg.ffn_hidden
    if moe:
        k, shared, hidden = int(moe["top_k"]), int(moe.get("n_shared_experts", 0)), int(moe["expert_hidden"])
        moe_ffn = 2 * d + 4 * (k + shared) * hidden + 2 * k * d
    else:
        moe_ffn = dense_ffn
    per_token = n_dense * (attn + dense_ffn) + (cfg.n_layers - n_dense) * (attn + moe_ffn)
    engram = cfg.engram
    if engram:
        e = EngramConfig.from_any({**engram, "table_sizes": None, "table_params": 1})
        per_token += len(e.layer_ids) * (e.memory_dim + 4 * d)
    return b * per_token + (b + 4 + 4) * cfg.vocab_size


def estimate_resources(spec: RunSpec, hardware: Hardware, ep_size: int = 1) -> Resources:
    """Device-hours at ``hardware.mfu`` of ``hardware.peak_tflops`` and memory per device.

    Memory: weights + gradients + Adam state by the ZeRO paper's accounting (bf16: 2 + 2 + 12 bytes
    per parameter, fp32: 4 + 4 + 8), under ``train.zero_stage`` over the data-parallel ranks;
    routed experts are split over ``ep_size`` expert-parallel ranks (their data-parallel degree is
    n_gpus / ep_size), everything else (Engram tables included) is replicated. Embedding and head
    count in full. Activations: :func:`activation_bytes_per_token` x micro_batch_size x seq_len.
    """
    precision = str(spec.train.get("precision", "fp32"))
    if precision not in _BYTES:
        raise ValueError(f"train.precision must be one of {sorted(_BYTES)}, got {precision!r}")
    zero = int(spec.train.get("zero_stage", 0))
    if zero not in (0, 1, 2):
        raise ValueError(f"train.zero_stage must be 0, 1 or 2 for the estimate, got {zero}")
    gpus = hardware.n_gpus
    if gpus % ep_size:
        raise ValueError(f"expert-parallel size {ep_size} does not divide hardware.n_gpus={gpus}")
    every = spec.total_params + spec.embedding_params + spec.head_params
    replicated = every - spec.routed_expert_params
    rep = _state_bytes(replicated, gpus, zero, precision)
    exp = _state_bytes(spec.routed_expert_params / ep_size, gpus // ep_size, zero, precision)
    tab = _state_bytes(spec.engram_params, gpus, zero, precision)
    micro = int(spec.train.get("micro_batch_size", 1))
    act = activation_bytes_per_token(spec.model, precision) * micro * spec.seq_len
    weights, grads, optim = (rep[i] + exp[i] for i in range(3))
    device_seconds = spec.train_flops / (hardware.mfu * hardware.peak_tflops * 1e12)
    return Resources(
        gpu_hours=device_seconds / 3600.0, wall_hours=device_seconds / 3600.0 / gpus,
        weights_gib=weights / GiB, grads_gib=grads / GiB, optimizer_gib=optim / GiB, activations_gib=act / GiB,
        tables_gib=sum(tab) / GiB, total_gib=(weights + grads + optim + act) / GiB,
        gpu_mem_gib=hardware.gpu_mem_gib)


# ---- the plan -------------------------------------------------------------------------------------
@dataclass
class Plan:
    """An allocation sweep at one budget: the chosen backbone, one run per rho and its cost estimate."""

    family: Family
    budget: float
    backbone: Backbone
    runs: list[RunSpec]
    resources: list[Resources]
    hardware: Hardware
    ep_size: int = 1
    warnings: list[str] = field(default_factory=list)

    def reference_errors(self, run: RunSpec) -> dict[str, dict[str, float]]:
        """Relative errors against the family's published points at this budget and rho."""
        out: dict[str, dict[str, float]] = {}
        for ref in self.family.reference_points:
            if math.isclose(ref.budget, self.budget, rel_tol=1e-6) and math.isclose(ref.rho, run.rho, abs_tol=1e-9):
                ours = {"total_params": run.total_params, "active_params": run.active_params,
                        "n_routed_experts": run.n_routed_experts}
                for key, published in ref.targets().items():
                    out[key] = {"published": float(published), "ours": float(ours[key]),
                                "rel_error": ours[key] / published - 1.0}
        return out

    @property
    def max_flops_drift(self) -> float:
        return max(abs(r.flops_drift) for r in self.runs)

    def to_list(self) -> list[dict]:
        out = []
        for run, res in zip(self.runs, self.resources):
            d = run.to_dict()
            d["estimates"] = {"hardware": self.hardware.name, "n_gpus": self.hardware.n_gpus,
                              "mfu": self.hardware.mfu, "peak_tflops": self.hardware.peak_tflops,
                              "ep_size": self.ep_size, "gpu_hours": res.gpu_hours, "wall_hours": res.wall_hours,
                              "mem_per_gpu_gib": res.total_gib, "mem_weights_gib": res.weights_gib,
                              "mem_grads_gib": res.grads_gib, "mem_optimizer_gib": res.optimizer_gib,
                              "mem_activations_gib": res.activations_gib, "mem_tables_gib": res.tables_gib,
                              "gpu_mem_gib": res.gpu_mem_gib, "fits": res.fits}
            refs = self.reference_errors(run)
            if refs:
                d["reference"] = refs
            out.append(d)
        return out


def solve_plan(family: Family, budget: float, rhos: Sequence[float], *, ep_size: int = 1,
               round_experts_to_ep: bool = False, data_dir: Optional[str] = None,
               hardware: Optional[Hardware] = None) -> Plan:
    """Every rho of an allocation sweep at training budget ``budget`` (FLOPs), validated up front."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget <= 0:
        raise ValueError(f"budget must be a positive number of FLOPs, got {budget!r}")
    rhos = [float(r) for r in rhos]
    if not rhos:
        raise ValueError("rho list is empty")
    bad = [r for r in rhos if not (math.isfinite(r) and 0.0 <= r <= 1.0)]
    if bad:
        raise ValueError(f"rho must lie in [0, 1], got {bad}")
    if len(set(rhos)) != len(rhos):
        raise ValueError(f"rho values repeat: {rhos}")
    if isinstance(ep_size, bool) or int(ep_size) != ep_size or ep_size < 1:
        raise ValueError(f"expert-parallel size must be a positive integer, got {ep_size!r}")
    hardware = hardware or family.hardware
    if hardware.n_gpus % ep_size:
        raise ValueError(f"expert-parallel size {ep_size} does not divide the {hardware.n_gpus} GPUs")
    backbone, _ = select_backbone(family, float(budget), ep_size, round_experts_to_ep)
    runs = [solve_point(family, backbone, float(budget), r, ep_size, round_experts_to_ep, data_dir) for r in rhos]
    plan = Plan(family, float(budget), backbone, runs, [estimate_resources(r, hardware, ep_size) for r in runs],
                hardware, ep_size)
    ns = [r.n_routed_experts for r in runs]
    if len(set(ns)) != len(ns):
        plan.warnings.append(f"several rho values round to the same expert count: {dict(zip(rhos, ns))}")
    for run, res in zip(runs, plan.resources):
        if res.tables_gib > res.gpu_mem_gib:
            raise ValueError(f"rho={run.rho:g}: Engram tables need {res.tables_gib:.1f} GiB per device (weights, "
                             f"grads and optimizer state, replicated), more than the {res.gpu_mem_gib:.1f} GiB of "
                             f"{hardware.name}")
        if not res.fits:
            plan.warnings.append(f"rho={run.rho:g}: about {res.total_gib:.1f} GiB per device will not fit in "
                                 f"{res.gpu_mem_gib:.1f} GiB ({hardware.name}); raise train.zero_stage, the GPU "
                                 f"count or ep_size, or lower train.micro_batch_size")
    return plan


# ---- "infinite memory" sweeps -------------------------------------------------------------------
def solve_memory_points(family: Family, budget: float, slots: Sequence[int],
                        data_dir: Optional[str] = None) -> list[tuple[RunSpec, int]]:
    """Points of an "infinite memory" sweep: the budget's rho = 1 backbone (all its routed experts,
    the tokens of the rho = 1 run) plus the family's Engram with ``slots`` table rows in total (over
    layers, orders and heads; table parameters = slots x per-head memory dims). Only the memory
    grows: P_tot grows with it, and training FLOPs stay those of rho = 1 plus the Engram projections.
    Returns (spec, exact slots of the prime-sized tables) per requested slot count, ascending."""
    from dataclasses import replace

    slots = [int(s) for s in slots]
    if not slots or min(slots) <= 0 or len(set(slots)) != len(slots):
        raise ValueError(f"slots must be distinct positive integers, got {slots}")
    backbone, _ = select_backbone(family, float(budget))
    base = solve_point(family, backbone, float(budget), 1.0, data_dir=data_dir)
    engram = EngramConfig.from_any({**family.rung_engram(backbone.rung), "table_params": 1}).to_dict()
    head_dim = EngramConfig.from_any(engram).head_dim
    out = []
    for s in sorted(slots):
        sizes, exact = solve_table_sizes(s * head_dim, {**engram, "tokenizer": None, "pad_id": None})
        model = {**base.model, "engram": {**engram, "table_sizes": [int(b) for b in sizes], "table_params": None}}
        m = measure(model, base.seq_len)
        spec = replace(base, model=model, total_params=m.total, active_params=m.active,
                       embedding_params=m.counts.embedding_params, head_params=m.counts.head_params,
                       engram_params=m.table_params, engram_dense_params=m.total - m.table_params - base.total_params,
                       forward_flops_per_token=m.forward_flops,
                       flops_drift=m.train_flops / (3.0 * base.forward_flops_per_token) - 1.0,
                       total_params_error=m.total / base.total_params - 1.0)
        out.append((spec, int(exact // head_dim)))
    if len({n for _, n in out}) != len(out):
        raise ValueError(f"slot counts {slots} round to the same prime-sized tables; space them further apart")
    return out
