"""A run's resolved configuration: ``<run_dir>/config.yaml``, written by whoever plans the run (the sweep
driver), read by the trainer as its one Hydra config (``train/main.py --config-dir <run_dir>
--config-name config``), and compared when a sweep is re-run under a possibly changed plan.

Why one file instead of command-line overrides: the file is the complete trainer config (model with its
moe/engram sections, train, optim, data, logging, sweep metadata), so what a run trained with is on disk,
whole and typed, and a changed plan is a changed file: :func:`config_changes` names the keys that differ.

Run directories written before this file existed hold Hydra's own record of the composed config,
``hydra/config.yaml`` (its interpolations unresolved); :func:`read_run_config` falls back to it, so a
committed study's finished runs are still recognised as finished under an unchanged plan.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from rundir.files import HYDRA_CONFIG, RUN_CONFIG, atomic_write_text

SCHEMA_NAME = "config_schema"  # the trainer's schema in Hydra's ConfigStore (rundir/schema.py registers it)
CONFIG_NAME = Path(RUN_CONFIG).stem
DEFINING = ("model", "train", "optim", "data")  # sections that decide what a run computes
NOT_DEFINING = ("train.progress",)  # how a run reports itself, inside those sections
_HEAD = ("# The complete trainer config of this run, resolved by its planner (sweeps/); the trainer reads exactly\n"
         "# this file: python train/main.py --config-dir <this directory> --config-name config\n")


def trainer_args(run_dir: Path) -> list[str]:
    """The trainer's arguments that make it read ``<run_dir>/config.yaml`` and nothing else."""
    return ["--config-dir", str(Path(run_dir).resolve()), "--config-name", CONFIG_NAME]


def write_run_config(run_dir: Path, config: Mapping[str, Any], hydra: Mapping[str, Any]) -> Path:
    """Write ``config`` (resolved: no interpolations) as the run's config.yaml, all-or-nothing. ``hydra`` is
    the Hydra runtime block (run dir, rank logs) that the trainer's own conf/config.yaml carries."""
    if "defaults" in config or "hydra" in config:
        raise ValueError("a run config holds the trainer's settings only (no defaults list or hydra block)")
    body = {"defaults": [SCHEMA_NAME, "_self_"], **config, "hydra": dict(hydra)}
    path = Path(run_dir) / RUN_CONFIG
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, _HEAD + yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=120))
    return path


def read_run_config(run_dir: Path) -> Optional[dict]:
    """The resolved config a run was launched with: its config.yaml, else (a run directory from before that
    file existed) Hydra's hydra/config.yaml with its interpolations resolved; None if neither exists."""
    from omegaconf import OmegaConf  # here: the test fake trainer imports this module and must start fast

    for name in (RUN_CONFIG, HYDRA_CONFIG):
        path = Path(run_dir) / name
        if path.exists():
            raw = OmegaConf.to_container(OmegaConf.load(path))
            settings = {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}  # hydra: runtime keys
            return OmegaConf.to_container(OmegaConf.create(settings), resolve=True)
    return None


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 0.003, "model.moe.top_k": 2, ...}``: a nested config as dotted keys (lists are values)."""
    if not isinstance(node, Mapping) or (prefix and not node):
        return {prefix[:-1]: node} if prefix else {}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}{k}."))
    return out


def config_changes(recorded: Mapping[str, Any], planned: Mapping[str, Any]) -> list[str]:
    """The defining keys whose value differs between a run's recorded config and a new plan's,
    ``["optim.lr: 0.003 -> 0.3", ...]``. Keys the recorded config lacks are not compared: they were added
    to the trainer's config after the run was launched (the run trained with that key's default)."""
    old = {k: v for k, v in flatten({s: recorded[s] for s in DEFINING if s in recorded}).items()
           if k not in NOT_DEFINING}
    new = {k: v for k, v in flatten({s: planned.get(s) for s in DEFINING}).items() if k not in NOT_DEFINING}
    missing = "(unset)"
    return [f"{k}: {old[k]} -> {new.get(k, missing)}" for k in sorted(old) if old[k] != new.get(k, missing)]
