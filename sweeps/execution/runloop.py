"""The sweep driver's run loop: launch what is missing from one queue, watch it, record every outcome.

Split from :mod:`sweeps.execution.driver` (which names and plans; :mod:`sweeps.analysis.summary` collects). Each launch
first writes the run's resolved ``config.yaml``, the only thing the trainer is given; a run launched
before is continued only if its recorded config equals the plan's (:func:`check_plan_unchanged`). The
loop survives its own death (results rewritten after every finished run; a re-run re-attaches to live
runs and never launches one twice), counts a run timeout from when the run leaves any scheduler queue,
and drives the budgets of one command as one queue.
"""
from __future__ import annotations

import fcntl
import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from rundir import files
from rundir.config import config_changes, read_run_config, write_run_config
from rundir.locks import is_locked
from rundir.outcome import last_step, read_outcome, supersede_outcome
from sweeps.execution.launchers import ForeignHandle, Handle, LaunchRequest, Launcher
from sweeps.execution.progress import Progress, fmt_duration, table
from sweeps.planning.runconfig import hydra_block
from sweeps.execution.sweep import Sweep, SweepRun
from sweeps.execution.results import (COMPLETED, DIVERGED, FAILED, INTERRUPTED, PENDING, RUNNING, TERMINAL, RunRecord,
                                      write_results)

SWEEP_LOCK = ".sweep.lock"
FIRST_POLL_S = 0.05  # the wait after a launch or an ending; it doubles up to poll_s while nothing changes


class _Queue:
    """The runs of several sweeps (the budgets of one command) driven as one queue: a free launcher slot
    or Slurm submission goes to the next run of any budget, not after the previous budget finished."""

    def __init__(self, parts: Sequence[Sweep]):
        self.parts = list(parts)
        self.owner = {r.name: s for s in self.parts for r in s.runs}
        self.name = "+".join(s.name for s in self.parts)
        self.runs = [r for s in self.parts for r in s.runs]

    def record(self, run: SweepRun) -> RunRecord:
        return self.owner[run.name].record(run)

    def label(self, run: SweepRun) -> str:
        return self.owner[run.name].label(run)


class SweepLocked(RuntimeError):
    pass


class _SweepLock:
    def __init__(self, sweep_dir: Path):
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self.path = sweep_dir / SWEEP_LOCK
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "?"
            os.close(self.fd)
            raise SweepLocked(f"another driver (pid {holder}) is running sweep {sweep_dir}; wait for it or stop it")
        os.ftruncate(self.fd, 0)
        os.write(self.fd, str(os.getpid()).encode())

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def log_tail_reason(log_path: Path, max_chars: int = 400) -> str:
    """The most telling line near the end of a run's log: an ``error:`` line, else a Python exception,
    else the last line."""
    try:
        with open(log_path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except FileNotFoundError:
        return "no log"
    lines = [ln for ln in lines if not ln.startswith("=== ")]
    for pred in (lambda ln: ln.startswith("error:"),
                 lambda ln: ("Error" in ln or "Exception" in ln) and not ln.startswith("File ")):
        hits = [ln for ln in lines if pred(ln)]
        if hits:
            return hits[-1][:max_chars]
    return lines[-1][:max_chars] if lines else "empty log"


def _record_failure(run: SweepRun, reason: str) -> None:
    """failed.json for a run whose trainer died without writing one (killed, crashed in C, timed out)."""
    files.write_record(run.run_dir / files.FAILED, {"status": FAILED, "reason": reason, "step": last_step(run.run_dir),
                                          "source": "sweep driver"})


def _mark_launch(run: SweepRun) -> int:
    marker = run.run_dir / files.LAUNCH_MARKER
    state = json.loads(marker.read_text()) if marker.exists() else {}
    attempts = int(state.get("attempts", 0)) + 1
    files.write_record(marker, {"attempts": attempts, "name": run.name, "last_launch": time.time(),
                         "config": files.RUN_CONFIG})
    return attempts


def run_sweep(sweep: Sweep, launcher: Launcher, **kwargs) -> list[RunRecord]:
    """Launch every run of ``sweep`` that is not finished, wait for all, return the final records
    (:func:`run_sweeps` with one sweep)."""
    return run_sweeps([sweep], launcher, **kwargs)[0]


def run_sweeps(sweeps: Sequence[Sweep], launcher: Launcher, *, retry_failed: bool = False,
               run_timeout_s: Optional[float] = None, poll_s: float = 1.0, report_every_s: float = 30.0,
               emit: Callable[[str], None] = print) -> list[list[RunRecord]]:
    """Launch every unfinished run of ``sweeps`` from one queue, wait for all; the final records per sweep.

    SIGINT / SIGTERM stop the runs this driver started (they stay resumable) and re-raise
    KeyboardInterrupt after the results tables are written. Runs held by another live process are
    waited for, never launched twice.
    """
    locks: list[_SweepLock] = []
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        for sweep in sweeps:
            locks.append(_SweepLock(sweep.dir))
        if main_thread:
            signal.signal(signal.SIGTERM, _interrupt)
        driver = _Driver(_Queue(sweeps), launcher, retry_failed, run_timeout_s, emit)
        records = {r.run_name: r for r in driver.run(poll_s, report_every_s)}
        return [[records[r.name] for r in sweep.runs] for sweep in sweeps]
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        for lock in locks:
            lock.release()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def check_plan_unchanged(sweep: Sweep) -> None:
    """Refuse to continue a sweep whose runs were launched under a different plan (say, the family
    config changed): their finished results would be mixed with the new plan's, silently. A run that was
    launched (or finished) is compared by the config it recorded (its config.yaml, or Hydra's record in a
    run directory from before that file) with the resolved config the plan gives it now."""
    changed = []
    for run in sweep.runs:
        if read_outcome(run.run_dir)[0] == PENDING:
            continue
        recorded = read_run_config(run.run_dir)
        diff = [] if recorded is None else config_changes(recorded, run.config)
        if diff:
            keys = [d.split(":", 1)[0] for d in diff]
            changed.append(f"{run.run_dir.name} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    if changed:
        raise ValueError(f"sweep {sweep.name} in {sweep.dir}: the plan changed since these runs were launched: "
                         f"{'; '.join(changed)}; use a new --out, or remove those run directories to redo them")


class _Driver:
    """One invocation's loop over a :class:`_Queue`: launch while slots are free, poll, finish, report."""

    def __init__(self, sweep: _Queue, launcher: Launcher, retry_failed: bool, run_timeout_s: Optional[float],
                 emit: Callable[[str], None]):
        for part in sweep.parts:
            check_plan_unchanged(part)
        self.sweep, self.launcher, self.retry_failed, self.timeout_s, self.emit = (
            sweep, launcher, retry_failed, run_timeout_s, emit)
        self.by_name = {r.name: r for r in sweep.runs}
        self.records = {r.name: sweep.record(r) for r in sweep.runs}
        self.progress = Progress(sweep.name, launcher.capacity, emit)
        for rec in self.records.values():
            if rec.status == COMPLETED:
                self.progress.record_duration(rec.wall_time_s)
        self.active: dict[str, tuple[Handle, float]] = {}  # name -> (handle, launch time)
        self.queue: list[str] = []
        self.resumed: set[str] = set()  # runs this invocation continued from a checkpoint
        self.running_since: dict[str, float] = {}  # when each active run was first seen running (out of any queue)
        self._adopt_or_queue()

    def _adopt_or_queue(self) -> None:
        """Re-attach to runs that are alive (ours from before, or another process's); queue the rest."""
        for name, rec in self.records.items():
            run = self.by_name[name]
            handle = self.launcher.reattach(run.run_dir) if not rec.is_terminal else None
            if handle is None and not rec.is_terminal and is_locked(run.run_dir):
                handle = ForeignHandle(run.run_dir)
            if handle is not None:
                self.active[name] = (handle, time.monotonic())
                self.records[name].status = RUNNING
                self.progress.run_started(name)
                self.emit(f"{self.sweep.label(run)}: already running ({handle.description}); waiting for it")
            elif rec.status in (PENDING, INTERRUPTED) or (self.retry_failed and rec.status in (FAILED, DIVERGED)):
                self.queue.append(name)
        recs = self.records.values()
        skipped = sum(r.status == COMPLETED for r in recs)
        failed_kept = sum(r.status in (FAILED, DIVERGED) for r in recs) if not self.retry_failed else 0
        self.emit(f"[{self.sweep.name}] {len(self.sweep.runs)} runs: {skipped} already completed, {failed_kept} "
                  f"failed earlier (kept; --retry-failed relaunches them), {len(self.queue)} to launch, "
                  f"{len(self.active)} running elsewhere; launcher: {self.launcher.describe()}")

    def save(self) -> None:
        for part in self.sweep.parts:
            write_results([self.records[r.name] for r in part.runs], part.dir / "results.parquet")

    def own_in_flight(self) -> int:
        return sum(not isinstance(h, ForeignHandle) for h, _ in self.active.values())

    def launch(self, name: str) -> None:
        run, label = self.by_name[name], self.sweep.label(self.by_name[name])
        if self.records[name].status in (FAILED, DIVERGED):
            supersede_outcome(run.run_dir)
        run.run_dir.mkdir(parents=True, exist_ok=True)
        was_resumed = files.latest_checkpoint_index(run.run_dir).exists()
        if was_resumed:
            self.resumed.add(name)
        try:
            if not is_locked(run.run_dir):  # a live trainer owns the directory (and read its file): leave both
                write_run_config(run.run_dir, run.config, hydra_block())  # what the trainer reads, whole
            handle = self.launcher.launch(LaunchRequest(run.name, run.run_dir, run.run_dir / files.RUN_LOG))
        except (OSError, RuntimeError, ValueError) as e:  # e.g. sbatch refused the job
            _record_failure(run, f"launch failed: {type(e).__name__}: {e}")
            self.records[name] = self.sweep.record(run)
            self.emit(f"{label}: FAILED to launch: {e}")
            self.save()
            return
        if handle is None:
            handle = ForeignHandle(run.run_dir)
            self.emit(f"{label}: locked by another process; waiting for it")
        else:
            _mark_launch(run)
            how = f"resuming from step {last_step(run.run_dir)}" if was_resumed else "starting"
            self.emit(f"{label}: {how} ({handle.description})")
        self.active[name] = (handle, time.monotonic())
        self.records[name] = replace(self.sweep.record(run), status=RUNNING)
        self.progress.run_started(name)

    def poll(self) -> bool:
        """Poll every active run once; whether any ended (or timed out)."""
        changed = False
        for name, (handle, started) in list(self.active.items()):
            outcome = handle.poll()
            if outcome is None:
                if name not in self.running_since and handle.is_running():
                    self.running_since[name] = time.monotonic()  # the timeout counts run time, not queue time
                ran = time.monotonic() - self.running_since.get(name, time.monotonic())
                if self.timeout_s is not None and not isinstance(handle, ForeignHandle) and ran > self.timeout_s:
                    handle.stop()
                    self._end(name)
                    self.finish(name, None, None, started, timed_out=True)
                    changed = True
                continue
            self._end(name)
            self.finish(name, outcome.exit_code, outcome.reason, started)
            changed = True
        return changed

    def _end(self, name: str) -> None:
        del self.active[name]
        self.running_since.pop(name, None)

    def finish(self, name: str, exit_code: Optional[int], reason: Optional[str], started: float,
               timed_out: bool = False) -> None:
        run, label = self.by_name[name], self.sweep.label(self.by_name[name])
        self.progress.run_ended(name)
        if timed_out:
            _record_failure(run, f"timed out after {fmt_duration(self.timeout_s)} of run time "
                                 f"(resumable with --retry-failed)")
        status, _ = read_outcome(run.run_dir)
        if reason == "released":  # a foreign trainer let go of the run: look at it afresh
            rec = self.records[name] = self.sweep.record(run)
            if rec.status in (PENDING, INTERRUPTED):
                self.queue.insert(0, name)
            self.emit(f"{label}: released by the other process ({rec.status})")
            return
        if status not in TERMINAL:
            if exit_code == 0:
                _record_failure(run, "trainer exited 0 without writing final.json")
            else:
                _record_failure(run, f"exit code {exit_code}: {reason or log_tail_reason(run.run_dir / files.RUN_LOG)}")
        rec = self.records[name] = self.sweep.record(run)
        took = fmt_duration(time.monotonic() - started)
        if rec.status == COMPLETED:
            # launch to finish as the driver saw it (start-up included); a resumed run's is partial
            self.progress.record_duration(None if name in self.resumed else time.monotonic() - started)
            self.emit(f"{label}: completed, val_loss {rec.val_loss:.4f} ({took})")
        else:
            self.emit(f"{label}: {rec.status.upper()} after {took}: {rec.reason}")
        self.save()

    def run(self, poll_s: float, report_every_s: float) -> list[RunRecord]:
        try:
            self.save()
            last_report, wait = time.monotonic(), FIRST_POLL_S
            while self.queue or self.active:
                launched = False
                while self.queue and self.own_in_flight() < self.launcher.capacity:
                    self.launch(self.queue.pop(0))
                    launched = True
                changed = self.poll()
                now = time.monotonic()
                if changed or now - last_report >= report_every_s:
                    self.progress.report(list(self.records.values()))
                    last_report = now
                if self.queue or self.active:
                    # soon after a launch or an ending (a short run, a failure at start-up), then backing off
                    wait = FIRST_POLL_S if launched or changed else min(poll_s, 2 * wait)
                    time.sleep(min(wait, poll_s))
        except KeyboardInterrupt:
            self.stop_all()
            raise
        for part in self.sweep.parts:
            self.emit(table([self.records[r.name] for r in part.runs]))
        return [self.records[r.name] for r in self.sweep.runs]

    def stop_all(self) -> None:
        self.emit(f"[{self.sweep.name}] interrupted: stopping {len(self.active)} run(s); re-run the same command "
                  f"to resume")
        for name, (handle, _) in self.active.items():
            if handle.stoppable_on_exit:
                handle.stop()
                self.records[name] = self.sweep.record(self.by_name[name])
            else:
                self.emit(f"{self.sweep.label(self.by_name[name])}: left running ({handle.description})")
        self.save()
