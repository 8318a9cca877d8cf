"""The run directory's file names and the writers every side uses. No torch import: cheap to use."""
from __future__ import annotations

import json
import os
import socket
import secrets
import string
from pathlib import Path
from typing import Any, Optional


FINAL = "final.json"  # written once a run completed: its final validation loss, tokens, FLOPs
FINAL_DIVERGED = "final.diverged.json"  # a diverged run's final.json, set aside when it is retried
FAILED = "failed.json"  # written when a run failed or diverged: status, reason, step
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"  # in CHECKPOINTS: the last committed checkpoint
RUN_STATE = "run.json"  # W&B run id, fingerprints, the trajectory settings and any allowed changes
METRICS = "metrics.jsonl"  # one JSON line per logged step (rank 0)
RUN_CONFIG = "config.yaml"  # the run's complete resolved trainer config (rundir/config.py)
HYDRA_CONFIG = "hydra/config.yaml"  # the config as Hydra composed it for the last launch (Hydra writes it)
LAUNCH_MARKER = "sweep_run.json"  # written by the sweep driver at each launch: attempts, last launch time
LAUNCH_RECORD = "launcher.json"  # a submitit launcher's job id, to re-attach instead of submitting twice
RUN_LOG = "launch.log"  # the trainer's stdout/stderr under the sweep driver, appended per attempt


def latest_checkpoint_index(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS / LATEST


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write all-or-nothing: a temp file (unique per host and process: nodes of one job share the run
    directory and may share pids), fsync, rename over ``path``, fsync the dir."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any, **dump_kwargs) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented, key-sorted JSON (``dump_kwargs`` to json.dumps)."""
    atomic_write_text(path, json.dumps(obj, **{"indent": 2, "sort_keys": True, **dump_kwargs}))


def write_record(path: Path, obj: Any) -> None:
    """A sweep's JSON record (plan.json, summary.json): atomic, non-JSON values as strings, NaN refused."""
    atomic_write_json(path, obj, default=str, allow_nan=False)


def read_json_object(path: Path) -> tuple[Optional[dict], Optional[str]]:
    """(content, None), (None, None) if absent, or (None, why) if unreadable (e.g. truncated by a crash)."""
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, f"unreadable {Path(path).name}: {e}"
    if not isinstance(obj, dict):
        return None, f"unreadable {Path(path).name}: not a JSON object"
    return obj, None


def new_run_id() -> str:
    """An 8-character W&B-style run id (random: two fresh runs never share one)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))
