"""The run directory's files: the contract between a training run and whoever watches it (the
sweep driver reads outcomes and checkpoints by these names). No torch import: cheap to use."""
from __future__ import annotations

import json
import os
from pathlib import Path

FINAL = "final.json"  # written once a run completed: its final validation loss, tokens, FLOPs
FAILED = "failed.json"  # written when a run failed or diverged: status, reason, step
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"  # in CHECKPOINTS: the last committed checkpoint


def latest_checkpoint_index(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LATEST


def atomic_write_json(path: Path, obj, **dump_kwargs) -> None:
    """Write JSON all-or-nothing: a temp file (unique per process), fsync, then rename over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, **{"indent": 2, "sort_keys": True, **dump_kwargs})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
