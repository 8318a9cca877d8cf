"""The run directory's lock: at most one live trainer owns a run directory.

Whoever starts the trainer (the trainer's rank 0 itself, or the sweep driver for the trainer it
launches) takes an exclusive ``flock`` on ``<run_dir>/.run.lock`` and keeps it as long as the trainer
lives; the launch's id written into the file lets the other ranks of that launch see that their own
rank 0 holds it. No torch import: cheap to use."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import Optional

LOCK_NAME = ".run.lock"  # flock held by whoever owns the live trainer of this run directory
LOCK_FD_ENV = "ISOFLOP_RUN_LOCK_FD"  # set by a launcher that holds the lock for the trainer it starts


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
