"""Ways to run one training run of a sweep: the launcher interface and local processes (Slurm jobs through
submitit are :mod:`sweeps.execution.submitit_launcher`).

Every launcher runs the same trainer, ``train/main.py``, on the run's own resolved config (nothing else
on its command line: ``--config-dir <run_dir> --config-name config``, :mod:`rundir.config`), as

* ``python train/main.py ...`` (one process: CPU or one GPU),
* ``python -m torch.distributed.run --nproc_per_node=N train/main.py ...`` (``runner="torchrun"``), or
* ``deepspeed --no_local_rank ... train/main.py ...`` (``runner="deepspeed"``).

A run directory is owned by at most one live trainer: the process that launches the trainer takes an
exclusive ``flock`` on ``<run_dir>/.run.lock`` and hands the descriptor to the trainer, so the lock is
held exactly as long as the trainer lives, whoever launched it. Local children also get
``PR_SET_PDEATHSIG`` (Linux): if the driver is killed, even with SIGKILL, its trainers receive SIGTERM
instead of running on unattended next to a re-launched copy.
"""
from __future__ import annotations

import ctypes
import os
import shlex
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from core.ports import free_port
from rundir.config import trainer_args
from rundir.locks import LOCK_FD_ENV, LOCK_NAME, is_locked, try_lock
from sweeps.planning.runconfig import REPO, TRAIN_SCRIPT

RUNNERS = ("python", "torchrun", "deepspeed")


# --------------------------------------------------------------------------------------------------
# Run-directory lock
# --------------------------------------------------------------------------------------------------
def die_with_parent() -> None:
    """preexec_fn: deliver SIGTERM to this child when the thread that spawned it dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------
def trainer_command(run_dir: Path, *, runner: str = "python", nproc: int = 1, nnodes: int = 1,
                    node_rank: int = 0, master_addr: Optional[str] = None, master_port: Optional[int] = None,
                    devices: Optional[Sequence[str]] = None, hostfile: Optional[Path] = None,
                    python: str = sys.executable, deepspeed_bin: Optional[str] = None,
                    script: str = TRAIN_SCRIPT) -> list[str]:
    """The argv that runs ``script`` (``train/main.py``) on ``<run_dir>/config.yaml`` under the chosen runner."""
    args = trainer_args(run_dir)
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"nproc and nnodes must be >= 1, got {nproc} and {nnodes}")
    if runner == "python":
        if nproc != 1 or nnodes != 1:
            raise ValueError("runner 'python' runs one process; use torchrun or deepspeed for more")
        return [python, script, *args]
    if runner == "torchrun":
        cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        if nnodes == 1:
            cmd.append("--standalone")  # single node: a free rendezvous port is picked per run
        else:
            if master_addr is None or master_port is None:
                raise ValueError("a multi-node torchrun needs master_addr and master_port")
            cmd += [f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
                    f"--master_port={master_port}"]
        return [*cmd, script, *args]
    ds = deepspeed_bin or str(Path(python).with_name("deepspeed"))
    cmd = [ds, "--no_local_rank", f"--master_port={master_port or free_port()}"]
    if nnodes == 1:
        cmd += [f"--include=localhost:{','.join(devices)}"] if devices else [f"--num_gpus={nproc}"]
    else:
        if master_addr is None or hostfile is None:
            raise ValueError("a multi-node DeepSpeed launch needs master_addr and a hostfile")
        cmd += ["--no_ssh", f"--hostfile={hostfile}", f"--num_nodes={nnodes}", f"--num_gpus={nproc}",
                f"--node_rank={node_rank}", f"--master_addr={master_addr}"]
    return [*cmd, script, *args]


def thread_env(threads: Optional[int]) -> dict[str, str]:
    if threads is None:
        return {}
    return {k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


def spawn_locked(cmd: Sequence[str], run_dir: Path, log_path: Path, env: dict[str, str],
                 cwd: Path = REPO) -> Optional[subprocess.Popen]:
    """Start ``cmd`` owning the run's lock, output appended to ``log_path``; None if the run is locked."""
    fd = try_lock(run_dir)
    if fd is None:
        return None
    try:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} launch: {shlex.join(cmd)}\n")
            log.flush()
            return subprocess.Popen(list(cmd), cwd=cwd, env={**os.environ, **env, LOCK_FD_ENV: str(fd)}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, pass_fds=(fd,),
                                    start_new_session=True, preexec_fn=die_with_parent)
    finally:
        os.close(fd)  # the child holds its own copy of the locked descriptor


def terminate_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM the child's process group (torchrun and its workers), SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --------------------------------------------------------------------------------------------------
# Launcher interface
# --------------------------------------------------------------------------------------------------
@dataclass
class LaunchRequest:
    name: str  # run name (also the job name)
    run_dir: Path
    log_path: Path  # where the trainer's stdout/stderr go


@dataclass
class Outcome:
    exit_code: Optional[int]  # None: still running
    reason: Optional[str] = None  # for failures the launcher itself saw (job error, lost job)


class Handle(ABC):
    """A launched (or re-attached) run."""

    description: str = ""

    @abstractmethod
    def poll(self) -> Optional[Outcome]:
        """None while running, else how it ended."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the run (it stays resumable from its last checkpoint)."""

    @property
    def stoppable_on_exit(self) -> bool:
        """Whether the driver should stop it when the driver itself is interrupted."""
        return True

    def is_running(self) -> bool:
        """Whether it has left any scheduler queue and runs (what a run timeout counts from)."""
        return True


class Launcher(ABC):
    name: str = "launcher"

    @property
    @abstractmethod
    def capacity(self) -> int:
        """How many runs may be in flight at once."""

    @abstractmethod
    def launch(self, req: LaunchRequest) -> Optional[Handle]:
        """Start a run; None if its directory is locked by a live trainer."""

    def reattach(self, run_dir: Path) -> Optional[Handle]:
        """A handle on a run this launcher started in an earlier invocation and that is still live."""
        return None

    def describe(self) -> str:
        return self.name


class ProcessHandle(Handle):
    def __init__(self, proc: subprocess.Popen, description: str):
        self.proc, self.description = proc, description

    def poll(self) -> Optional[Outcome]:
        rc = self.proc.poll()
        return None if rc is None else Outcome(rc)

    def stop(self) -> None:
        terminate_group(self.proc)


class ForeignHandle(Handle):
    """A run locked by a process this driver did not start: wait until its lock is released."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.description = run_dir, f"held by another process ({run_dir / LOCK_NAME})"

    def poll(self) -> Optional[Outcome]:
        return None if is_locked(self.run_dir) else Outcome(None, reason="released")

    def stop(self) -> None:  # not ours to stop
        pass

    @property
    def stoppable_on_exit(self) -> bool:
        return False


# --------------------------------------------------------------------------------------------------
# Local processes
# --------------------------------------------------------------------------------------------------
class LocalLauncher(Launcher):
    """Runs on this machine.

    devices=None: CPU (or one default GPU); ``parallel`` runs at once, each of ``procs_per_run``
    processes. devices=[...]: the devices are split into groups of ``procs_per_run``, one run per
    group at a time (one run per GPU, or one run over all GPUs), selected with CUDA_VISIBLE_DEVICES
    (``--include`` for the DeepSpeed launcher). ``threads``: OMP threads per process (default: the
    machine's cores shared evenly over all processes in flight). ``script``: the trainer, relative to
    ``cwd`` (the repository root).
    """

    name = "local"

    def __init__(self, devices: Optional[Sequence[str]] = None, procs_per_run: int = 1, runner: str = "auto",
                 parallel: int = 1, threads: Optional[int] = None, python: str = sys.executable, cwd: Path = REPO,
                 script: str = TRAIN_SCRIPT):
        if procs_per_run < 1 or parallel < 1:
            raise ValueError(f"procs_per_run and parallel must be >= 1, got {procs_per_run} and {parallel}")
        if runner == "auto":
            runner = "python" if procs_per_run == 1 else "torchrun"
        if runner not in RUNNERS:
            raise ValueError(f"runner must be auto or one of {', '.join(RUNNERS)}, got {runner!r}")
        if runner == "python" and procs_per_run != 1:
            raise ValueError("runner 'python' runs one process per run; use torchrun or deepspeed")
        self.devices = [str(d) for d in devices] if devices else None
        if self.devices is not None:
            if len(self.devices) % procs_per_run:
                raise ValueError(f"{len(self.devices)} devices do not split into runs of {procs_per_run}")
            self.slots = [self.devices[i:i + procs_per_run] for i in range(0, len(self.devices), procs_per_run)]
        else:
            self.slots = [None] * parallel
        self.free = list(range(len(self.slots)))
        self.procs_per_run, self.runner, self.python, self.cwd, self.script = procs_per_run, runner, python, cwd, script
        in_flight = len(self.slots) * procs_per_run
        self.threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // in_flight)

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def describe(self) -> str:
        where = f"devices {self.devices}" if self.devices else "CPU/default device"
        return (f"local ({where}; {self.capacity} run(s) at once, {self.procs_per_run} process(es) per run "
                f"via {self.runner}, {self.threads} thread(s) each)")

    def command(self, run_dir: Path, slot: Optional[list[str]]) -> tuple[list[str], dict[str, str]]:
        env = {**thread_env(self.threads), "PYTHONUNBUFFERED": "1"}
        if slot is not None and self.runner != "deepspeed":
            env["CUDA_VISIBLE_DEVICES"] = ",".join(slot)
        cmd = trainer_command(run_dir, runner=self.runner, nproc=self.procs_per_run, devices=slot,
                              python=self.python, script=self.script)
        return cmd, env

    def launch(self, req: LaunchRequest) -> Optional[Handle]:
        if not self.free:
            raise RuntimeError("local launcher is full: wait for a run to finish before launching another")
        slot_id = self.free[0]
        cmd, env = self.command(req.run_dir, self.slots[slot_id])
        proc = spawn_locked(cmd, req.run_dir, req.log_path, env, self.cwd)
        if proc is None:
            return None
        self.free.pop(0)
        where = f" on {','.join(self.slots[slot_id])}" if self.slots[slot_id] else ""
        return _SlotHandle(proc, f"pid {proc.pid}{where}", self, slot_id)


class _SlotHandle(ProcessHandle):
    """Gives its device slot back to the launcher when the process ends."""

    def __init__(self, proc, description, launcher: LocalLauncher, slot_id: int):
        super().__init__(proc, description)
        self.launcher, self.slot_id, self.released = launcher, slot_id, False

    def _release(self):
        if not self.released:
            self.released = True
            self.launcher.free.append(self.slot_id)
            self.launcher.free.sort()

    def poll(self) -> Optional[Outcome]:
        out = super().poll()
        if out is not None:
            self._release()
        return out

    def stop(self) -> None:
        super().stop()
        self._release()
