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


def _proc_stat(pid: int) -> list[str]:
    """/proc/<pid>/stat from field 3 (state) on; [] if the process is gone (Linux)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return []


def process_start(pid: int) -> str:
    """A process's start time in clock ticks (field 22): with the pid, it names the process uniquely."""
    fields = _proc_stat(pid)
    return fields[19] if len(fields) > 19 else "?"


def parent_pid(pid: int) -> int:
    """The parent of ``pid`` (field 4); 0 if ``pid`` is gone."""
    fields = _proc_stat(pid)
    return int(fields[1]) if len(fields) > 1 else 0


def launch_id() -> str:
    """The same string on every rank of one launch and different for any two live launches: the rendezvous
    (address, port, torchrun run id) plus, for ranks on rank 0's node, the local launcher process (pid and
    start time), since the DeepSpeed launcher reuses port 29500 and has no run id."""
    if "RANK" not in os.environ:
        return f"pid={os.getpid()}@{process_start(os.getpid())}"
    rdzv = f"{os.environ.get('MASTER_ADDR', '')}:{os.environ.get('MASTER_PORT', '')} " \
           f"run={os.environ.get('TORCHELASTIC_RUN_ID', '')} world={os.environ.get('WORLD_SIZE', '')}"
    ppid = os.getppid()
    return f"{rdzv} launcher={ppid}@{process_start(ppid)}"


def try_lock(run_dir: Path, owner: Optional[str] = None) -> Optional[int]:
    """Open and exclusively lock ``run_dir/.run.lock``; the descriptor, or None if another process holds it.

    ``owner`` (a launch's id, see train/main.py) is written into the file once the lock is held, so the
    other ranks of that launch can tell their rank 0 holds it without taking the lock themselves."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(run_dir) / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if owner is not None:
        _stamp(fd, owner)
    return fd


def _stamp(fd: int, owner: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, owner.encode(), 0)
    os.fsync(fd)


def stamp_lock_owner(run_dir: Path, owner: str) -> None:
    """Write ``owner`` into the lock file of a run whose lock a launcher holds for this launch (the sweep
    driver's Slurm job on node 0): the ranks on other nodes wait for it (train/main.py)."""
    fd = os.open(Path(run_dir) / LOCK_NAME, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        _stamp(fd, owner)
    finally:
        os.close(fd)


def lock_owner(run_dir: Path) -> str:
    """The id the lock's last holder wrote ("" if none): read only, never locks, never creates."""
    try:
        return (Path(run_dir) / LOCK_NAME).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return ""


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
