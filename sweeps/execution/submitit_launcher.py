"""Slurm jobs (or submitit's local executor) as a sweep launcher: one submitit job per run.

Node 0 of a job holds the run's lock and starts the trainer on the run's config.yaml under the chosen
runner (:func:`sweeps.execution.launchers.trainer_command`); a Slurm job keeps running when the driver exits and the
next invocation re-attaches to it through ``<run_dir>/launcher.json`` instead of submitting again.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rundir.files import LAUNCH_RECORD, atomic_write_json, atomic_write_text
from rundir.locks import is_locked
from sweeps.execution.launchers import (REPO, RUNNERS, TRAIN_SCRIPT, Handle, LaunchRequest, Launcher, Outcome,
                                        die_with_parent, spawn_locked, terminate_group, thread_env, trainer_command)


@dataclass
class NodeTask:
    """What runs inside a submitit job, once per node: the trainer under the chosen runner.

    Node 0 holds the run lock. On a Slurm time-out or pre-emption submitit calls ``checkpoint`` and
    requeues the same task; the trainer resumes from its last checkpoint in the run directory.
    """

    run_dir: str
    log_path: str
    runner: str = "torchrun"
    procs_per_node: int = 1
    threads: Optional[int] = None
    python: str = sys.executable
    cwd: str = str(REPO)
    script: str = TRAIN_SCRIPT
    extra_env: dict = field(default_factory=dict)

    def __call__(self) -> int:
        import submitit

        job = submitit.JobEnvironment()
        nnodes, node = job.num_nodes, job.node
        port = 20000 + int(str(job.job_id).split("_")[0]) % 20000 if nnodes > 1 else None
        run_dir = Path(self.run_dir)
        cmd, hostfile = self.command(job.hostnames, nnodes, node, port)
        if hostfile is not None:
            # Every node writes the same text atomically: a node never reads a half-written file, and no node
            # waits for node 0 (the run directory is on the shared filesystem the sweep already needs).
            atomic_write_text(hostfile, self.hostfile_text(job.hostnames))
        env = {**thread_env(self.threads), "PYTHONUNBUFFERED": "1", **self.extra_env}
        log_path = Path(self.log_path) if node == 0 else Path(self.log_path).with_suffix(f".node{node}.log")
        if node == 0:
            proc = spawn_locked(cmd, run_dir, log_path, env, Path(self.cwd))
            if proc is None:
                raise RuntimeError(f"run directory {run_dir} is locked by another live trainer")
        else:
            with open(log_path, "a") as log:
                proc = subprocess.Popen(cmd, cwd=self.cwd, env={**os.environ, **env}, stdout=log,
                                        stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        try:
            return proc.wait()
        except BaseException:  # the job is being cancelled or pre-empted: take the trainer down with it
            if node == 0:
                terminate_group(proc)
            else:
                proc.terminate()
            raise

    def command(self, hostnames: list[str], nnodes: int, node: int,
                port: Optional[int]) -> tuple[list[str], Optional[Path]]:
        """Node ``node``'s trainer command in a job of ``nnodes`` nodes on ``hostnames`` (the first is the
        master), and the hostfile it names (the DeepSpeed launcher on several nodes; written by
        :meth:`__call__`)."""
        hostfile = Path(self.run_dir) / "hostfile" if self.runner == "deepspeed" and nnodes > 1 else None
        runner = self.runner
        if runner == "python" and (self.procs_per_node > 1 or nnodes > 1):
            runner = "torchrun"
        cmd = trainer_command(Path(self.run_dir), runner=runner, nproc=self.procs_per_node, nnodes=nnodes,
                              node_rank=node, master_addr=hostnames[0] if hostnames else "127.0.0.1",
                              master_port=port, hostfile=hostfile, python=self.python, script=self.script)
        return cmd, hostfile

    def hostfile_text(self, hostnames: list[str]) -> str:
        return "".join(f"{h} slots={self.procs_per_node}\n" for h in hostnames)

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self)


QUEUED_STATES = ("PENDING", "REQUEUED", "CONFIGURING", "RESIZING", "SUSPENDED", "UNKNOWN", "REQUEUE_HOLD",
                 "REQUEUE_FED")
ENDED_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE", "REVOKED", "SPECIAL_EXIT")


def _settled_state(job, tries: int = 3, wait_s: float = 5.0) -> str:
    """The job's Slurm state, re-queried while it reads UNKNOWN (sacct lags behind a fresh or busy
    controller); "UNKNOWN" if it never settles. ``CANCELLED by 123`` reads as CANCELLED."""
    state = "UNKNOWN"
    for attempt in range(tries):
        try:
            state = str(job.state).upper().split()[0] if str(job.state).strip() else "UNKNOWN"
        except Exception:  # squeue/sacct failed to answer
            state = "UNKNOWN"
        if state != "UNKNOWN":
            return state
        if attempt < tries - 1:
            time.sleep(wait_s)
    return state


class SubmititHandle(Handle):
    def __init__(self, job, description: str, cancel_on_exit: bool):
        self.job, self.description, self.cancel_on_exit = job, description, cancel_on_exit

    def poll(self) -> Optional[Outcome]:
        if not self.job.done():
            return None
        try:
            return Outcome(int(self.job.result()))
        except Exception as e:  # job failed outside the trainer (node failure, cancelled, time-out)
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            return Outcome(1, reason=f"{self.description}: {lines[-1] if lines else type(e).__name__}")

    def is_running(self) -> bool:
        try:
            return self.job.state.upper() not in QUEUED_STATES
        except Exception:  # a scheduler query that failed: count from the next answer
            return False

    def stop(self) -> None:
        self.job.cancel(check=False)

    @property
    def stoppable_on_exit(self) -> bool:
        return self.cancel_on_exit


class SubmititLauncher(Launcher):
    """One submitit job per run. ``cluster``: "slurm", "local" (submitit's local executor: each job a
    local process, no scheduler) or "debug" (in this process; for debugging only).

    Slurm jobs keep running when the driver exits; the next invocation re-attaches to them through the
    job id kept in ``<run_dir>/launcher.json`` instead of submitting again.
    """

    name = "submitit"

    def __init__(self, folder: Path, cluster: str = "slurm", nodes: int = 1, gpus_per_node: int = 0,
                 procs_per_node: Optional[int] = None, runner: str = "torchrun", timeout_min: int = 240,
                 max_parallel: Optional[int] = None, threads: Optional[int] = None,
                 slurm: Optional[dict] = None, python: str = sys.executable, cwd: Path = REPO,
                 script: str = TRAIN_SCRIPT):
        if cluster not in ("slurm", "local", "debug"):
            raise ValueError(f"submitit cluster must be slurm, local or debug, got {cluster!r}")
        if runner not in RUNNERS:
            raise ValueError(f"runner must be one of {', '.join(RUNNERS)}, got {runner!r}")
        if nodes < 1 or gpus_per_node < 0:
            raise ValueError(f"nodes must be >= 1 and gpus_per_node >= 0, got {nodes} and {gpus_per_node}")
        import submitit

        self.folder, self.cluster = Path(folder), cluster
        self.nodes, self.runner, self.threads, self.python = nodes, runner, threads, python
        self.cwd, self.script = Path(cwd), script
        self.procs_per_node = procs_per_node or max(1, gpus_per_node)
        self.max_parallel = max_parallel
        self.executor = submitit.AutoExecutor(folder=self.folder, cluster=cluster)
        params = {"timeout_min": timeout_min, "nodes": nodes, "tasks_per_node": 1}
        if gpus_per_node:
            params["gpus_per_node"] = gpus_per_node
        if cluster == "slurm":  # e.g. {"partition": "gpu", "account": "...", "qos": "...", "constraint": "h100"}
            params.update({k if k.startswith("slurm_") else f"slurm_{k}": v for k, v in (slurm or {}).items()})
        elif slurm:
            raise ValueError("slurm parameters given for a non-slurm submitit cluster")
        self.executor.update_parameters(**params)

    @property
    def capacity(self) -> int:
        if self.max_parallel is not None:
            return self.max_parallel
        return 1_000_000 if self.cluster == "slurm" else max(1, (os.cpu_count() or 1) // self.procs_per_node)

    def describe(self) -> str:
        return (f"submitit/{self.cluster} ({self.nodes} node(s) x {self.procs_per_node} process(es) via "
                f"{self.runner}; jobs in {self.folder})")

    def launch(self, req: LaunchRequest) -> Optional[Handle]:
        if is_locked(req.run_dir):
            return None
        task = NodeTask(str(req.run_dir), str(req.log_path), self.runner, self.procs_per_node,
                        self.threads, self.python, str(self.cwd), self.script)
        self.executor.update_parameters(name=req.name)
        job = self.executor.submit(task)
        record = {"launcher": "submitit", "cluster": self.cluster, "job_id": str(job.job_id),
                  "folder": str(self.folder), "submitted": time.time()}
        atomic_write_json(req.run_dir / LAUNCH_RECORD, record)
        return SubmititHandle(job, f"{self.cluster} job {job.job_id}", cancel_on_exit=self.cluster != "slurm")

    def reattach(self, run_dir: Path) -> Optional[Handle]:
        if self.cluster != "slurm" or not (run_dir / LAUNCH_RECORD).exists():
            return None
        record = json.loads((run_dir / LAUNCH_RECORD).read_text())
        if record.get("cluster") != "slurm":
            return None
        from submitit.slurm.slurm import SlurmJob

        job = SlurmJob(folder=record["folder"], job_id=record["job_id"])
        state = _settled_state(job)
        if state in ENDED_STATES:
            return None
        # alive, or still unknown after re-querying: wait for it; never submit a duplicate blind
        how = "re-attached" if state != "UNKNOWN" else "state unknown to Slurm; waiting, not resubmitting"
        return SubmititHandle(job, f"slurm job {job.job_id} ({how})", cancel_on_exit=False)
