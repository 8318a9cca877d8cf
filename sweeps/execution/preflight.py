"""Checks a sweep's plan against the machine that would run it, before anything is launched.

Why: ``make sweep BUDGET=1e20 FAMILY=paper`` on a CPU-only machine used to start a 5.7B-parameter run
that died of memory a minute later. A plan launched on this machine (``--launcher local`` or ``gpus``)
is refused, with its cost and how to launch it on a cluster, when a run needs more memory per rank
than a rank gets here, or when the plan assumes accelerators this machine does not have;
``--force`` launches it anyway. Slurm plans are the cluster's business and are not checked here.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional, Sequence

GPU_PEAK_TFLOPS = 20.0  # a plan whose hardware peaks above this assumes accelerators (CPUs peak far below)
CPU_FLOPS = 5e10  # model FLOP/s a CPU-only machine sustains in training (conf/family/cpu.yaml measured ~4.6e10)
MAX_CPU_HOURS = 24.0  # an accelerator plan that would take longer than this on CPUs is refused


@dataclass(frozen=True)
class Machine:
    gpus: int
    mem_per_rank_gib: float
    what: str


def local_machine(ranks_in_flight: int, devices: Optional[Sequence[str]] = None) -> Machine:
    """This machine as the local launchers would use it: GPU memory per device, else host RAM per rank."""
    gpu_mem = _gpu_memory_gib()
    if devices:
        gpu_mem = [gpu_mem[int(d)] for d in devices if d.isdigit() and int(d) < len(gpu_mem)] or gpu_mem
    if gpu_mem:
        return Machine(len(gpu_mem), min(gpu_mem), f"{len(gpu_mem)} GPU(s) of {min(gpu_mem):.0f} GiB")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    ranks = max(1, ranks_in_flight)
    return Machine(0, ram / ranks, f"no GPU, {ram:.0f} GiB RAM shared by {ranks} rank(s) in flight")


def _gpu_memory_gib() -> list[float]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout
        return [float(x) / 1024 for x in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def check_fits(sweeps: Sequence, machine: Machine, cluster_hint: str) -> None:
    """Raise ValueError (one line) if some run of ``sweeps`` cannot run on ``machine``."""
    for sweep in sweeps:
        est = [r.spec.get("estimates") or {} for r in sweep.runs]
        if not est or not est[0]:
            continue
        need = max(e.get("mem_per_gpu_gib", 0.0) for e in est)
        hours = sum(e.get("gpu_hours", 0.0) for e in est)
        hw, peak = est[0].get("hardware", "?"), float(est[0].get("peak_tflops") or 0.0)
        flops = hours * 3600 * peak * 1e12 * float(est[0].get("mfu") or 0.0)
        cpu_hours = flops / CPU_FLOPS / 3600
        problem = None
        if peak > GPU_PEAK_TFLOPS and machine.gpus == 0 and cpu_hours > MAX_CPU_HOURS:
            problem = (f"it assumes {hw} accelerators, this machine has {machine.what}, and on CPUs it would "
                       f"take about {cpu_hours:.3g} hours")
        elif need > machine.mem_per_rank_gib:
            problem = (f"a run needs {need:.3g} GiB per rank and a rank gets {machine.mem_per_rank_gib:.3g} GiB "
                       f"here ({machine.what})")
        if problem:
            raise ValueError(f"sweep {sweep.name} will not run on this machine: {problem}; its cost: "
                             f"{hours:.4g} GPU-hours on {hw}, {need:.3g} GiB per rank. Launch it on a cluster "
                             f"({cluster_hint}), or pass --force")
