"""The run's config tree: Hydra structured configs, one dataclass per section, value checks in each
section's ``__post_init__``. One module for the trainer's sections; the ``model`` section is
:class:`models.config.ModelConfig` itself (with its typed ``moe`` and ``engram`` sections), never a
copy of its fields.

Why a schema: without one, ``+train.max_stepz=3`` (a typo) is accepted and silently ignored, and a
bad value (``optim.schedule=foo``, ``train.log_interval=0``, ``model.moe.top_kk=2``) surfaces only
after compute was spent. Hydra merges every YAML file and override into :class:`Config`;
:func:`check` merges the result again onto the schema (``+key=v`` force-adds keys past Hydra's own
check) and builds the dataclasses, so an unknown key, a wrong type or a bad value is one
:class:`ConfigError` line naming the key.

To add a key: add a typed field (with its default: defaults live here, never in ``.get(key, default)``
at the use site) to the section's dataclass, and a check to its ``__post_init__`` if its range matters.
``sweep`` is free: the sweep driver records its own bookkeeping there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, DictConfig

from core.config_utils import ConfigError, load
from models.config import ModelConfig
from rundir.config import SCHEMA_NAME  # the first entry of conf/config.yaml's defaults list

__all__ = ["Config", "ConfigError", "SCHEMA_NAME", "check", "parallel_of", "register"]


SCHEDULES = ("cosine", "wsd", "constant")
PRECISIONS = ("fp32", "bf16")
ZERO_STAGES = (0, 1, 2)
RESUME_MODES = ("auto", "never")
COMPILE_MODES = ("off", "blocks", "auto")  # train/compile.py
WANDB_MODES = ("offline", "online", "disabled")
OPTIM_KINDS = ("adamw", "muon")
TABLE_UPDATES = ("dense", "lazy")
MUON_LR_FNS = ("match_rms_adamw", "original")
ENGRAM_TABLE_MODES = ("replicated", "sharded")


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _positive(section: object, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        if value is None or value <= 0:
            raise ConfigError(f"{prefix}.{name}={value} must be positive")


@dataclass
class DataConfig:
    dir: str = "data/stdlib_bpe8k"  # a directory written by data_prep.prepare


@dataclass
class ParamGroupConfig:
    lr_mult: float = 1.0
    weight_decay: Optional[float] = None  # None: optim.weight_decay (filled in by OptimConfig)
    muon: bool = False  # under optim.kind=muon this group's matrices get Muon


@dataclass
class MuonConfig:
    momentum: float = 0.95
    adjust_lr_fn: str = "match_rms_adamw"  # one of MUON_LR_FNS

    def __post_init__(self):
        _choice("optim.muon.adjust_lr_fn", self.adjust_lr_fn, MUON_LR_FNS)


@dataclass
class OptimConfig:
    kind: str = "adamw"  # one of OPTIM_KINDS
    table_update: str = "dense"  # one of TABLE_UPDATES
    muon: MuonConfig = field(default_factory=MuonConfig)
    lr: float = 3.0e-3
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    schedule: str = "cosine"  # one of SCHEDULES
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    decay_frac: float = 0.2
    groups: Dict[str, ParamGroupConfig] = field(default_factory=dict)

    def __post_init__(self):
        for group in self.groups.values():
            if group.weight_decay is None:
                group.weight_decay = self.weight_decay
        _positive(self, "optim", "lr")
        _choice("optim.schedule", self.schedule, SCHEDULES)
        _choice("optim.kind", self.kind, OPTIM_KINDS)
        _choice("optim.table_update", self.table_update, TABLE_UPDATES)
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if not 0.0 < self.decay_frac <= 1.0:
            raise ConfigError(f"optim.decay_frac={self.decay_frac} must lie in (0, 1]")


@dataclass
class TrainConfig:
    seq_len: int = 256
    micro_batch_size: int = 8
    global_batch_size: int = 16
    max_steps: int = 200
    train_tokens: Optional[float] = None
    eval_interval: int = 100
    eval_tokens: int = 65536
    ckpt_interval: int = 100
    keep_checkpoints: int = 2
    seed: int = 1234
    precision: str = "fp32"
    zero_stage: int = 0
    grad_clip: Optional[float] = 1.0
    log_interval: int = 10
    resume: str = "auto"
    max_loss: float = 20.0
    progress: bool = True
    allow_config_change: bool = False  # resume although a trajectory setting changed (recorded in run.json)
    dist_timeout_s: float = 1800.0  # a collective waiting longer fails every rank (ranks without a launcher)
    compile: str = "off"  # off | blocks | auto (blocks on CUDA, off on CPU): train/compile.py
    deterministic: bool = False  # bit-for-bit repeatable kernels on CUDA, at a speed cost: train/determinism.py

    def __post_init__(self):
        _positive(self, "train", "seq_len", "micro_batch_size", "global_batch_size", "eval_interval", "eval_tokens",
                  "ckpt_interval", "log_interval", "max_loss", "dist_timeout_s")
        if self.train_tokens is None:
            _positive(self, "train", "max_steps")
        elif self.train_tokens <= 0:
            raise ConfigError(f"train.train_tokens={self.train_tokens} must be positive (or null: use train.max_steps)")
        if self.eval_tokens < self.seq_len:
            raise ConfigError(f"train.eval_tokens={self.eval_tokens} is less than one {self.seq_len}-token window "
                              f"(train.seq_len): evaluation would see no data")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"train.global_batch_size={self.global_batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        _choice("train.precision", self.precision, PRECISIONS)
        _choice("train.zero_stage", self.zero_stage, ZERO_STAGES)
        _choice("train.resume", self.resume, RESUME_MODES)
        _choice("train.compile", self.compile, COMPILE_MODES)
        if self.keep_checkpoints < 0:
            raise ConfigError(f"train.keep_checkpoints={self.keep_checkpoints} must be >= 0 (0 keeps all)")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(f"train.grad_clip={self.grad_clip} must be >= 0 (0 or null: no clipping)")


@dataclass
class ParallelConfig:
    # Engram tables: "replicated" (every rank holds every row; the gradient is all-reduced) or "sharded"
    # (rows split over the data-parallel ranks, looked up from their owners: memory/sharded.py).
    engram_tables: str = "replicated"  # one of ENGRAM_TABLE_MODES
    expert: int = 1  # expert parallelism: routed experts sharded over this many ranks (train/expert_parallel.py)

    def __post_init__(self):
        _choice("parallel.engram_tables", self.engram_tables, ENGRAM_TABLE_MODES)
        if self.expert < 1:
            raise ConfigError(f"parallel.expert={self.expert} must be >= 1")


@dataclass
class WandbConfig:
    mode: str = "offline"  # one of WANDB_MODES
    project: Optional[str] = "isoflop-engram"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)

    def __post_init__(self):
        _choice("logging.wandb.mode", self.mode, WANDB_MODES)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_tflops: Optional[float] = None  # per-device peak for the MFU metric (None: from the hardware table)


@dataclass
class SweepMeta:
    """Where a sweep's run belongs (written by sweeps.execution.driver into the run's config.yaml; recorded, never read
    by the trainer): empty for a run launched by hand."""

    name: Optional[str] = None
    mode: Optional[str] = None  # allocation | memory
    family: Optional[str] = None
    budget: Optional[float] = None  # training FLOPs of the sweep
    rho: Optional[float] = None
    seed: Optional[int] = None
    slots: Optional[int] = None  # memory sweeps: Engram rows


@dataclass
class Config:
    experiment_name: str = "default"
    run_name: str = "default"
    run_dir: str = "runs/default"
    model: ModelConfig = MISSING  # conf/config.yaml always selects a model group (class defaults, not an instance's)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sweep: SweepMeta = field(default_factory=SweepMeta)

    def __post_init__(self):
        """Checks across sections (each section checked its own values already)."""
        o, t = self.optim, self.train
        if o.kind == "muon" and t.precision == "bf16" and t.zero_stage == 0:
            raise ConfigError("optim.kind=muon with train.precision=bf16 needs train.zero_stage 1 or 2 (DeepSpeed's "
                              "bf16 stage-0 optimizer orthogonalises plain 2-D matrices only, not [E, out, in] experts)")
        if o.kind == "muon" and t.zero_stage > 0 and (t.grad_clip or 0.0) > 0:
            raise ConfigError(f"optim.kind=muon at train.zero_stage={t.zero_stage} needs train.grad_clip=0: DeepSpeed "
                              "0.19 clips the orthogonalised Muon updates (norm ~sqrt(width) per matrix), which would "
                              "shrink every step, not the raw gradients")
        # Sharded tables are clipped by the trainer (train/shards.py), which reads the engine's reduced
        # gradients: only fp32 ZeRO 0 leaves them in ``p.grad`` before the step.
        if self.parallel.engram_tables == "sharded" and (t.grad_clip or 0) > 0 and (t.precision, t.zero_stage) != (
                "fp32", 0):
            raise ConfigError(f"parallel.engram_tables=sharded with train.grad_clip={t.grad_clip} needs train.precision="
                              f"fp32 and train.zero_stage=0 (got {t.precision}, {t.zero_stage}): set train.grad_clip=0")


def register() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent); call before composing conf/config.yaml."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def check(cfg: DictConfig) -> Config:
    """The typed tree of a composed config: every key declared, every value of its type and in range.

    A one-line :class:`ConfigError` otherwise (naming the key, with the nearest known key for a typo)."""
    return load(Config, cfg)


def parallel_of(cfg: Any) -> ParallelConfig:
    """The typed ``parallel`` section of a config, typed or composed (the defaults where a config has no
    parallel section, e.g. one written before the section existed). One reader for the expert-parallel
    size and the table layout, so neither repeats a default."""
    section = getattr(cfg, "parallel", None)
    if section is None:
        return ParallelConfig()
    if isinstance(section, ParallelConfig):
        return section
    return load(ParallelConfig, section, "parallel")
