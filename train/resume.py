"""The resume contract: which settings a checkpoint's trajectory depends on, and what changed.

A run resumed under a different learning rate, schedule, token budget, model or data continues a
trajectory no single config describes (loss 8.68 -> 12.95 for lr x100, silently). So every checkpoint
and ``run.json`` record the *trajectory settings* (flat ``section.key -> value``); a relaunch compares
them and refuses a change unless ``train.allow_config_change=true``, which is then recorded in
``run.json`` under ``config_changes``. Settings that only change how a run is observed or laid out
(eval/log/checkpoint cadence, W&B, micro batch, ZeRO stage, paths) are not part of it; the layout has
its own check (:func:`train.checkpoint.check_layout`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rundir.config import flatten
from train.checkpoint import check_compatible
from rundir.schema import ConfigError

# train.* keys that do not change the sequence of parameters a run goes through
NOT_TRAJECTORY = {"eval_interval", "eval_tokens", "ckpt_interval", "keep_checkpoints", "log_interval", "resume",
                  "progress", "allow_config_change", "dist_timeout_s", "max_loss", "micro_batch_size", "zero_stage",
                  "deterministic"}
DATA_DIR = "data.dir"  # compared for finished runs; resumes compare the data's content fingerprint instead


def trajectory_settings(cfg: DictConfig) -> dict[str, Any]:
    """``{"optim.lr": 0.003, "model.d_model": 128, "train.seed": 1234, ...}`` (JSON-serialisable)."""
    train = OmegaConf.to_container(cfg.train, resolve=True)
    out = flatten({"model": OmegaConf.to_container(cfg.model, resolve=True),
                   "optim": OmegaConf.to_container(cfg.optim, resolve=True),
                   "train": {k: v for k, v in train.items() if k not in NOT_TRAJECTORY}})
    out[DATA_DIR] = str(cfg.data.dir)
    return out


def changes(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``["optim.lr: 0.003 -> 0.3", ...]`` for every key whose value differs (or exists on one side only)."""
    keys = sorted((set(old) | set(new)) - set(ignore))
    missing = "(unset)"
    return [f"{k}: {old.get(k, missing)} -> {new.get(k, missing)}" for k in keys
            if old.get(k, missing) != new.get(k, missing)]


def describe(diff: list[str], limit: int = 4) -> str:
    more = f", and {len(diff) - limit} more" if len(diff) > limit else ""
    return ", ".join(diff[:limit]) + more


def check_finished(cfg: DictConfig, run_dir: Path, run_state: dict) -> None:
    """A finished run is a result: relaunching it is a no-op only under the settings it finished with."""
    if cfg.train.resume == "never":
        raise ConfigError(f"run_dir {run_dir} already holds a finished run (train.resume=never)")
    saved = run_state.get("settings")
    diff = changes(saved, trajectory_settings(cfg)) if saved is not None else []
    if diff:
        raise ConfigError(f"run_dir {run_dir} holds a finished run trained with other settings ({describe(diff)}); "
                          f"use a new run_dir")


def vet_settings(cfg: DictConfig, meta: dict, fingerprints: dict, settings: dict, where: Path) -> list[str]:
    """The trajectory changes from a checkpoint's ``meta`` to this launch; raises unless they may be resumed
    across. A model change never can (the weights do not fit); others need train.allow_config_change=true.
    ``fingerprints``: this launch's model and stream fingerprints; ``settings``: its trajectory settings."""
    saved = meta.get("settings")
    if saved is None:  # written before settings were recorded: the fingerprints still guard it
        if not cfg.train.allow_config_change:
            check_compatible(meta, fingerprints, where)
        return []
    diff = changes(saved, settings, ignore=(DATA_DIR,))
    stream = meta.get("stream_fingerprint")
    if stream and stream != fingerprints["stream_fingerprint"]:
        diff.append(f"data content ({DATA_DIR}): stream {stream} -> {fingerprints['stream_fingerprint']}")
    model = [d for d in diff if d.startswith("model.")]
    if model:
        raise ConfigError(f"checkpoint in {where} was written with a different model config ({describe(model)}); "
                          f"use a new run_dir or restore the original config")
    if diff and not cfg.train.allow_config_change:
        raise ConfigError(f"checkpoint in {where} was trained with other settings ({describe(diff)}); "
                          f"restore them, use a new run_dir, or set train.allow_config_change=true")
    return diff
