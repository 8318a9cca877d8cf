"""Process-group setup for torchrun / the DeepSpeed launcher, on CPU (gloo) or GPU (nccl)."""
from __future__ import annotations

import ctypes
import datetime
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from core.ports import free_port
from rundir.locks import parent_pid

if not torch.cuda.is_available():  # before anything imports deepspeed: no "Setting accelerator to CPU"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # warning on stderr above a one-line error


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _skip_cpu_shm_build() -> None:
    """DeepSpeed's CPU comm backend JIT-compiles a shared-memory all-reduce op with g++ (~60 s) on
    first use; training goes through torch.distributed (gloo) and never needs it."""
    import importlib

    # `import deepspeed.comm.torch as m` would bind the torch library (an attribute of deepspeed.comm).
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def _watch_grandparent(parent: int, grandparent: int, every_s: float = 1.0) -> None:
    """SIGTERM this process once ``parent`` stops being ``grandparent``'s child (the grandparent died and
    the parent was re-parented), checked every ``every_s`` in a daemon thread."""
    def watch() -> None:
        while parent_pid(parent) == grandparent:
            time.sleep(every_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


def die_with_launcher() -> None:
    """A worker started by torchrun / the DeepSpeed launcher gets SIGTERM when its launcher dies (even
    by SIGKILL) instead of training on, unattended, into a run directory someone may relaunch (Linux).

    torchrun is the worker's parent: ``PR_SET_PDEATHSIG`` covers it. ``deepspeed`` is two processes, the
    runner and its child ``deepspeed.launcher.launch`` (the worker's parent), which outlives a killed
    runner: the worker also watches the runner and stops when it is gone."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return  # a plain `python train/main.py`: nobody to outlive
    parent = os.getppid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    try:
        parent_cmd = Path(f"/proc/{parent}/cmdline").read_bytes()
    except OSError:
        return
    if b"deepspeed.launcher.launch" in parent_cmd:
        grandparent = parent_pid(parent)
        if grandparent > 1:
            _watch_grandparent(parent, grandparent)


def setup(timeout_s: float = 1800.0) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (a single process gets a world of one).

    ``timeout_s`` bounds every collective: if a peer died without its launcher noticing (ranks
    started by srun or by hand), the others fail after this long instead of hanging forever."""
    die_with_launcher()
    use_cuda = torch.cuda.is_available()
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a lone process (no launcher): any free port, not a guessed one
        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed

    if not use_cuda:
        _skip_cpu_shm_build()
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
    deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), device)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def teardown(clean: bool = True) -> None:
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj, src: int = 0):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


FAULT_ENV = "ISOFLOP_FAULT"  # fault injection for tests/integration/test_faults*: "<rank>:<step>" raises there


class InjectedFault(RuntimeError):
    pass


def maybe_inject_fault(rank: int, step: int) -> None:
    """Raise on rank ``r`` before step ``s`` when ``ISOFLOP_FAULT=r:s`` (how the suite makes one rank fail)."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{rank}:{step}":
        raise InjectedFault(f"injected fault on rank {rank} at step {step} ({FAULT_ENV}={spec})")
