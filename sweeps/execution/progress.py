"""Live progress of a sweep: which runs are done, running, failed, and an estimate of the time left.

The estimate uses the wall times this sweep has measured: the median over completed runs of their
duration (launch to finish as the driver saw it; for runs finished by an earlier invocation,
``final.json``'s ``wall_time_s``), the runs still to start at that duration each, the running ones at
what is left of it, all spread over the launcher's capacity. Until one run has finished there is no
estimate.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Optional, Sequence

from sweeps.execution.results import COMPLETED, DIVERGED, FAILED, INTERRUPTED, PENDING, RUNNING, RunRecord


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "?"
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
    def __init__(self, sweep: str, capacity: int, emit: Callable[[str], None] = print,
                 clock: Callable[[], float] = time.monotonic):
        self.sweep, self.capacity, self.emit, self.clock = sweep, max(1, capacity), emit, clock
        self.t0 = clock()
        self.started: dict[str, float] = {}  # run name -> start time of its current attempt
        self.durations: list[float] = []  # wall times of completed runs

    def run_started(self, name: str) -> None:
        self.started[name] = self.clock()

    def run_ended(self, name: str) -> None:
        self.started.pop(name, None)

    def record_duration(self, seconds: Optional[float]) -> None:
        if seconds is not None and seconds > 0:
            self.durations.append(float(seconds))

    def eta(self, records: Sequence[RunRecord]) -> Optional[float]:
        if not self.durations:
            return None
        per_run = statistics.median(self.durations)
        now = self.clock()
        waiting = sum(r.status in (PENDING, INTERRUPTED) for r in records)
        running = [max(per_run - (now - self.started[r.run_name]), 0.05 * per_run)
                   for r in records if r.status == RUNNING and r.run_name in self.started]
        remaining = waiting * per_run + sum(running)
        if not remaining:
            return 0.0
        lanes = min(self.capacity, waiting + len(running))
        return remaining / max(lanes, 1)

    def counts(self, records: Sequence[RunRecord]) -> dict[str, int]:
        out = {s: 0 for s in (COMPLETED, RUNNING, FAILED, DIVERGED, PENDING, INTERRUPTED)}
        for r in records:
            out[r.status] += 1
        return out

    def line(self, records: Sequence[RunRecord]) -> str:
        c = self.counts(records)
        now = self.clock()
        running = ", ".join(f"{r.run_dir.rsplit('/', 1)[-1]} {fmt_duration(now - self.started[r.run_name])}"
                            for r in records if r.status == RUNNING and r.run_name in self.started)
        bad = c[FAILED] + c[DIVERGED]
        parts = [f"[{self.sweep}] done {c[COMPLETED]}/{len(records)}"]
        if bad:
            parts.append(f"failed {bad}")
        parts.append(f"running {c[RUNNING]}" + (f" ({running})" if running else ""))
        parts.append(f"to run {c[PENDING] + c[INTERRUPTED]}")
        parts.append(f"elapsed {fmt_duration(now - self.t0)}")
        eta = self.eta(records)
        parts.append(f"ETA {fmt_duration(eta)}" if eta is not None else "ETA after the first run")
        return " | ".join(parts)

    def report(self, records: Sequence[RunRecord]) -> None:
        self.emit(self.line(records))


def table(records: Sequence[RunRecord]) -> str:
    """A plain-text table of every run (for the end of a sweep and for --dry-run)."""
    head = f"{'run':<24} {'rho':>6} {'seed':>4} {'status':<11} {'val_loss':>9} {'wall':>8}  note"
    lines = [head, "-" * len(head)]
    for r in records:
        loss = f"{r.val_loss:.4f}" if r.val_loss is not None else "-"
        wall = fmt_duration(r.wall_time_s) if r.wall_time_s is not None else "-"
        note = (r.reason or "")[:80]
        lines.append(f"{r.run_dir.rsplit('/', 1)[-1]:<24} {r.rho:>6.3f} {r.seed:>4d} {r.status:<11} {loss:>9} "
                     f"{wall:>8}  {note}")
    return "\n".join(lines)
