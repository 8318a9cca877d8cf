"""The trainer's config schema: Hydra structured configs (one dataclass per section) plus the value
checks a type cannot express. One module on purpose, so every section's keys live in one place.

Why a schema: without one, ``+train.max_stepz=3`` (a typo) is accepted and silently ignored, and a
bad value (``optim.schedule=foo``, ``train.log_interval=0``) surfaces only after compute was spent.
Hydra merges every YAML file and override into :class:`Config`; an unknown key or a value of the
wrong type fails the merge, naming the key. :func:`validate` then checks ranges and choices.

To add a key: add a typed field (with its default) to the section's dataclass below, and a check to
``validate`` if its range matters. ``model`` stays a free dict here: ``ModelConfig.from_dict`` already
refuses unknown model keys. ``sweep`` is free too: the sweep driver records its own bookkeeping there.
The tree is meant to grow into one typed config for the whole project (a ``parallel`` section, the
sweep driver's options) without moving keys.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

SCHEMA_NAME = "config_schema"  # the first entry of conf/config.yaml's defaults list

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


class ConfigError(ValueError):
    """A config value that would fail (or mislead) later: reported in one line before any compute."""


@dataclass
class DataConfig:
    dir: str = "data/stdlib_bpe8k"  # a directory written by data_prep.prepare


@dataclass
class ParamGroupConfig:
    lr_mult: float = 1.0
    weight_decay: float = 0.0
    muon: bool = False  # under optim.kind=muon this group's matrices get Muon


@dataclass
class MuonConfig:
    momentum: float = 0.95
    adjust_lr_fn: str = "match_rms_adamw"  # one of MUON_LR_FNS


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


@dataclass
class ParallelConfig:
    # Engram tables: "replicated" (every rank holds every row; the gradient is all-reduced) or "sharded"
    # (rows split over the data-parallel ranks, looked up from their owners: memory/sharded.py).
    engram_tables: str = "replicated"  # one of ENGRAM_TABLE_MODES
    expert: int = 1  # expert parallelism: routed experts sharded over this many ranks (train/expert_parallel.py)


@dataclass
class WandbConfig:
    mode: str = "offline"  # one of WANDB_MODES
    project: Optional[str] = "isoflop-engram"
    entity: Optional[str] = None
    group: Optional[str] = None
    name: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)
    peak_tflops: Optional[float] = None  # per-device peak for the MFU metric (None: from the hardware table)


@dataclass
class Config:
    experiment_name: str = "default"
    run_name: str = "default"
    run_dir: str = "runs/default"
    model: Dict[str, Any] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sweep: Dict[str, Any] = field(default_factory=dict)


def register() -> None:
    """Put the schema in Hydra's ConfigStore (idempotent); call before composing conf/config.yaml."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def _unknown_keys(node: Any, cls: type, prefix: str) -> None:
    """Raise on the first key of ``node`` that ``cls`` does not declare (recursing into sections).

    Needed besides Hydra's own struct check: ``+section.key=v`` force-adds a key past the schema."""
    if not isinstance(node, DictConfig):
        return
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in node.keys():
        if key not in hints:
            near = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f" (known: {', '.join(names)})"
            raise ConfigError(f"unknown config key {prefix}{key}{hint}")
        sub, kind = node._get_node(key), hints[key]
        if dataclasses.is_dataclass(kind):
            _unknown_keys(sub, kind, f"{prefix}{key}.")
        elif typing.get_origin(kind) is dict and dataclasses.is_dataclass(typing.get_args(kind)[1]):
            for name in sub.keys():
                _unknown_keys(sub._get_node(name), typing.get_args(kind)[1], f"{prefix}{key}.{name}.")


def check_schema(cfg: DictConfig) -> None:
    """Every key declared and every value of its declared type (one-line ConfigError otherwise)."""
    _unknown_keys(cfg, Config, "")
    try:
        OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except Exception as e:  # omegaconf's ValidationError text: first line names the value, full_key the key
        lines = str(e).splitlines()
        key = next((ln.split(":", 1)[1].strip() for ln in lines if ln.strip().startswith("full_key:")), "?")
        raise ConfigError(f"config key {key}: {lines[0] if lines else type(e).__name__}") from None


def _choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of {', '.join(map(str, choices))}")


def _positive(cfg: DictConfig, *keys: str) -> None:
    for key in keys:
        section, name = key.split(".")
        value = cfg[section][name]
        if value is None or value <= 0:
            raise ConfigError(f"{key}={value} must be positive")


def validate(cfg: DictConfig) -> None:
    """Ranges and choices of the trainer's keys (types and key names were checked by the schema)."""
    t, o = cfg.train, cfg.optim
    _positive(cfg, "train.seq_len", "train.micro_batch_size", "train.global_batch_size", "train.eval_interval",
              "train.eval_tokens", "train.ckpt_interval", "train.log_interval", "train.max_loss",
              "train.dist_timeout_s", "optim.lr")
    if t.train_tokens is None:
        _positive(cfg, "train.max_steps")
    elif t.train_tokens <= 0:
        raise ConfigError(f"train.train_tokens={t.train_tokens} must be positive (or null: use train.max_steps)")
    if t.eval_tokens < t.seq_len:
        raise ConfigError(f"train.eval_tokens={t.eval_tokens} is less than one {t.seq_len}-token window "
                          f"(train.seq_len): evaluation would see no data")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}")
    _choice("optim.schedule", o.schedule, SCHEDULES)
    _choice("optim.kind", o.kind, OPTIM_KINDS)
    _choice("optim.table_update", o.table_update, TABLE_UPDATES)
    _choice("optim.muon.adjust_lr_fn", o.muon.adjust_lr_fn, MUON_LR_FNS)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("train.zero_stage", t.zero_stage, ZERO_STAGES)
    _choice("train.resume", t.resume, RESUME_MODES)
    _choice("train.compile", t.compile, COMPILE_MODES)
    _choice("logging.wandb.mode", cfg.logging.wandb.mode, WANDB_MODES)
    _check_parallel(cfg)
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1]")
    if not 0.0 < o.decay_frac <= 1.0:
        raise ConfigError(f"optim.decay_frac={o.decay_frac} must lie in (0, 1]")
    if t.keep_checkpoints < 0:
        raise ConfigError(f"train.keep_checkpoints={t.keep_checkpoints} must be >= 0 (0 keeps all)")
    if cfg.get("parallel") is not None and cfg.parallel.expert < 1:
        raise ConfigError(f"parallel.expert={cfg.parallel.expert} must be >= 1")
    if t.grad_clip is not None and t.grad_clip < 0:
        raise ConfigError(f"train.grad_clip={t.grad_clip} must be >= 0 (0 or null: no clipping)")


def engram_tables(cfg: DictConfig) -> str:
    """``parallel.engram_tables`` (replicated where a config has no parallel section)."""
    return str((cfg.get("parallel") or {}).get("engram_tables", "replicated"))


def _check_parallel(cfg: DictConfig) -> None:
    """Sharded tables are clipped by the trainer (train/shards.py), which reads the engine's reduced
    gradients: only fp32 ZeRO 0 leaves them in ``p.grad`` before the step."""
    t, mode = cfg.train, engram_tables(cfg)
    _choice("parallel.engram_tables", mode, ENGRAM_TABLE_MODES)
    if mode == "sharded" and (t.grad_clip or 0) > 0 and (t.precision != "fp32" or t.zero_stage != 0):
        raise ConfigError(f"parallel.engram_tables=sharded with train.grad_clip={t.grad_clip} needs train.precision="
                          f"fp32 and train.zero_stage=0 (got {t.precision}, {t.zero_stage}): set train.grad_clip=0")
