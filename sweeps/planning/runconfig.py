"""Resolve a planned run into the trainer's complete config (the dict :mod:`rundir.config` writes).

The planner decides the sections that make a sweep point (``RunSpec.config()``: model with moe and
engram, the train and optim settings of the family, the data directory); everything else is the
trainer's own default. The defaults come from the trainer itself, asked once per optimizer recipe as
a process (``train/main.py --cfg job optim=<kind>``: Hydra prints the composed, schema-typed config
and exits), so sweeps/ never imports train/ and never repeats a default. Interpolations
(``weight_decay: ${optim.weight_decay}``) are resolved only after the plan is merged in, as Hydra
would. ``--set KEY=VALUE`` settings are applied to the merged config, typed by the value they replace.
"""
from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = "train/main.py"

# Keys the iso-FLOP plan solved: a change would move a run off its point (shapes, tokens per step, steps, data).
ISO_KEYS = ("model.", "memory", "train.seq_len", "train.global_batch_size", "train.train_tokens", "train.max_steps",
            "data.dir")


@functools.lru_cache(maxsize=8)
def _trainer_defaults_text(optim_kind: Optional[str], python: str) -> str:
    argv = [python, TRAIN_SCRIPT, "--cfg", "job", *([f"optim={optim_kind}"] if optim_kind else [])]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise ValueError(f"the trainer refused its defaults for optim={optim_kind}: {lines[-1] if lines else '?'}")
    return proc.stdout


def trainer_defaults(optim_kind: Optional[str] = None, python: str = sys.executable) -> DictConfig:
    """The trainer's composed default config (interpolations kept) under the optimizer recipe ``optim_kind``
    (conf/optim/<kind>.yaml: the whole recipe, not just the key)."""
    return OmegaConf.create(_trainer_defaults_text(optim_kind, python))


def hydra_block() -> dict:
    """The Hydra runtime settings of conf/config.yaml (run dir, rank logs), which every run config carries."""
    return yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["hydra"]


def refuse_planned(settings: Sequence[str]) -> None:
    """``--set`` may tune how runs train (lr, micro batch, eval cadence) but not what the plan solved:
    a changed shape or token count would break P_tot / FLOPs equality between the sweep's runs silently."""
    for text in settings:
        key = _split(text)[0]
        if key.startswith(ISO_KEYS):
            raise ValueError(f"--set {text}: {key} is solved by the iso-FLOP plan (P_tot, P_act, tokens, FLOPs); "
                             f"change the family config (conf/family) or --data-dir instead")


def _split(text: str) -> tuple[str, str, bool]:
    """'KEY=VALUE' -> (key, value, adds): a leading '+' adds a key the config lacks (Hydra's spelling)."""
    key, sep, value = text.partition("=")
    if not sep or not key.lstrip("+"):
        raise ValueError(f"--set {text!r} is not of the form KEY=VALUE")
    return key.lstrip("+"), value, key.startswith("+")


_MISSING = object()


def _typed(key: str, old: Any, new: Any, text: str) -> Any:
    """``new`` as the type of the value it replaces (the schema's type: the defaults are schema-typed)."""
    if old is None or new is None or old is _MISSING:
        return new
    if isinstance(old, bool) or isinstance(new, bool):
        if isinstance(old, bool) and isinstance(new, bool):
            return new
    elif isinstance(old, int) and isinstance(new, (int, float)) and float(new).is_integer():
        return int(new)
    elif isinstance(old, float) and isinstance(new, (int, float)):
        return float(new)
    elif isinstance(old, str):
        return text
    elif isinstance(new, type(old)):
        return new
    raise ValueError(f"--set {key}={text}: {key} takes a {type(old).__name__} (now {old!r})")


def apply_settings(cfg: DictConfig, settings: Sequence[str]) -> None:
    """Apply ``KEY=VALUE`` settings in place; an unknown key (without '+') or a value of the wrong type is a
    one-line error naming it."""
    for text in settings:
        key, value, adds = _split(text)
        new = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={value}"]))["v"]
        old = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
        if old is _MISSING and not adds:
            raise ValueError(f"--set {text}: the trainer's config has no key {key} ('+{key}=...' adds one)")
        old = OmegaConf.to_container(old) if OmegaConf.is_config(old) else old
        OmegaConf.update(cfg, key, _typed(key, old, new, value), merge=False, force_add=adds)


def resolve_run_config(planned: Mapping[str, Any], settings: Sequence[str] = (), own: Mapping[str, Any] = (),
                       python: str = sys.executable) -> dict:
    """The complete resolved trainer config of one run: the trainer's defaults under the plan's optimizer
    recipe, the plan's sections merged in, then ``settings`` (``--set``), then ``own`` (what the sweep
    decides per run: run_dir, names, seed, sweep metadata), interpolations resolved last."""
    kind = (planned.get("optim") or {}).get("kind")
    cfg = OmegaConf.merge(trainer_defaults(kind, python), OmegaConf.create(dict(planned)))
    apply_settings(cfg, settings)
    cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(own)))
    return OmegaConf.to_container(cfg, resolve=True)
