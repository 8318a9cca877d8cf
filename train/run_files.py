"""The run directory's files: the contract between a training run and whoever watches it (the
sweep driver reads outcomes and checkpoints by these names). No torch import: cheap to use."""
from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import Optional

FINAL = "final.json"  # written once a run completed: its final validation loss, tokens, FLOPs
FAILED = "failed.json"  # written when a run failed or diverged: status, reason, step
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"  # in CHECKPOINTS: the last committed checkpoint
RUN_STATE = "run.json"  # W&B run id, fingerprints, the trajectory settings and any allowed changes
LOCK_NAME = ".run.lock"  # flock held by whoever owns the live trainer of this run directory
LOCK_FD_ENV = "ISOFLOP_RUN_LOCK_FD"  # set by a launcher that holds the lock for the trainer it starts


def latest_checkpoint_index(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LATEST


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, obj, **dump_kwargs) -> None:
    """Write JSON all-or-nothing: a temp file (unique per process), fsync, rename over ``path``, fsync the dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, **{"indent": 2, "sort_keys": True, **dump_kwargs})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def try_lock(run_dir: Path) -> Optional[int]:
    """Open and exclusively lock ``run_dir/.run.lock``; the descriptor, or None if another process holds it."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run's lock (a trainer is running in it)."""
    if not (Path(run_dir) / LOCK_NAME).exists():
        return False
    fd = try_lock(run_dir)
    if fd is None:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)
    return False
