"""The sweep driver: plan a sweep, launch what is missing, survive failures, collect, fit, summarise.

Layout (deterministic from budget, family, rho / slots and seed, so re-running the same command finds
its own runs)::

    <out>/<family>-<budget>/                       allocation sweep, e.g. cpu-6e12/ (W&B group = dir name)
        plan.json  results.parquet  summary.json  u_curve.png  launch.log  wandb/
        rho0.80-seed0/                             one run_dir of train/main.py (final.json, checkpoints/, ...)
    <out>/<family>-<budget>-memory/                "infinite memory" sweep: fixed backbone, Engram slots swept
        slots1000000-seed0/ ...
    <out>/u_curves.png                             every allocation sweep under <out> overlaid

A run is ``completed`` (final.json), ``failed`` / ``diverged`` (failed.json, written by the trainer or,
when the trainer died without a word, by the driver with the tail of its log), ``interrupted``
(checkpoints or an earlier launch but no outcome: relaunching resumes it) or ``pending``. Completed runs
are never relaunched; failed ones only with ``retry_failed``. The results table is rewritten after
every finished run, so nothing finished is lost when the driver itself dies.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from sweeps.fit import json_safe
from train import run_files
from sweeps.launchers import ForeignHandle, Handle, LaunchRequest, Launcher, is_locked
from sweeps.progress import Progress, fmt_duration, table
from sweeps.results import (COMPLETED, DIVERGED, FAILED, INTERRUPTED, LAUNCH_MARKER, PENDING, RUNNING, TERMINAL,
                            RunRecord, read_outcome, spec_json, write_results)

ALLOCATION, MEMORY = "allocation", "memory"
SWEEP_LOCK = ".sweep.lock"
RUN_LOG = "launch.log"  # the trainer's stdout/stderr, appended per attempt


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
def budget_tag(budget: float) -> str:
    """1e13 -> '1e13', 2.5e20 -> '2.5e20', 3e+18 -> '3e18'."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive number of FLOPs, got {budget!r}")
    mant, exp = f"{float(budget):.3e}".split("e")
    return f"{mant.rstrip('0').rstrip('.')}e{int(exp)}"


def rho_tag(rho: float) -> str:
    """Two decimals, more only when needed: 0.8 -> '0.80', 0.825 -> '0.825'."""
    two = f"{rho:.2f}"
    return two if abs(float(two) - rho) < 1e-9 else f"{rho:.6f}".rstrip("0")


def sweep_name(family: str, budget: float, mode: str = ALLOCATION) -> str:
    if mode not in (ALLOCATION, MEMORY):
        raise ValueError(f"sweep mode must be {ALLOCATION} or {MEMORY}, got {mode!r}")
    if not family or not all(c.isalnum() or c in "_.-" for c in family):
        raise ValueError(f"family name {family!r} must be letters, digits, '_', '.' or '-' (it names directories)")
    return f"{family}-{budget_tag(budget)}" + ("-memory" if mode == MEMORY else "")


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------
@dataclass
class SweepRun:
    """One (rho or slots, seed) point: what to run and where."""

    rho: float
    seed: int
    run_dir: Path
    name: str  # W&B run name: <sweep>-<dir name>
    overrides: list[str]  # complete Hydra overrides for train/main.py
    spec: dict  # the planner's description (to_dict())
    slots: Optional[int] = None


@dataclass
class Sweep:
    name: str
    mode: str
    family: str
    budget: float
    dir: Path
    runs: list[SweepRun]
    warnings: list[str] = field(default_factory=list)

    def record(self, run: SweepRun) -> RunRecord:
        """The run's current record, from its directory."""
        status, info = read_outcome(run.run_dir)
        marker = run.run_dir / LAUNCH_MARKER
        attempts = json.loads(marker.read_text()).get("attempts", 0) if marker.exists() else 0
        return RunRecord(sweep=self.name, mode=self.mode, family=self.family, budget=self.budget, rho=run.rho,
                         seed=run.seed, run_name=run.name, run_dir=str(run.run_dir), status=status,
                         slots=run.slots, attempts=attempts, spec=spec_json(run.spec), **info)

    def records(self) -> list[RunRecord]:
        return [self.record(r) for r in self.runs]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge_overrides(*groups: Sequence[str]) -> list[str]:
    """Concatenate override lists; a later override of the same key replaces an earlier one (Hydra
    refuses two values for one key)."""
    merged: dict[str, str] = {}
    for group in groups:
        for o in group:
            if "=" not in o:
                raise ValueError(f"override {o!r} is not of the form key=value")
            merged.pop(_key(o), None)
            merged[_key(o)] = o
    return list(merged.values())


def build_sweep(specs: Sequence[Any], *, out: Path, family: str, budget: float, seeds: Sequence[int],
                mode: str = ALLOCATION, extra_overrides: Sequence[str] = (), wandb_mode: Optional[str] = None,
                wandb_project: Optional[str] = None, warnings: Sequence[str] = ()) -> Sweep:
    """Turn planner specs (objects with ``.rho``, ``.overrides()``, ``.to_dict()``; memory sweeps also
    ``.slots``) into runs, one per (spec, seed), with deterministic directories and names."""
    if not specs:
        raise ValueError("the plan has no runs")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {seeds}")
    name = sweep_name(family, budget, mode)
    sweep_dir = Path(out).resolve() / name
    runs, seen = [], set()
    for spec in specs:
        slots = getattr(spec, "slots", None) if mode == MEMORY else None
        if mode == MEMORY and slots is None:
            raise ValueError("a memory sweep needs specs with a slot count (.slots)")
        label = getattr(spec, "requested_slots", slots)
        point = f"slots{int(label)}" if mode == MEMORY else f"rho{rho_tag(float(spec.rho))}"
        if point in seen:
            raise ValueError(f"two planned runs share the point {point}: give distinct values")
        seen.add(point)
        for seed in seeds:
            run_dir = sweep_dir / f"{point}-seed{seed}"
            run_name = f"{name}-{run_dir.name}"
            own = [f"run_dir={run_dir}", f"experiment_name={run_name}", f"train.seed={seed}",
                   "train.progress=false", f"logging.wandb.group={name}", f"logging.wandb.name={run_name}",
                   f"+sweep.name={name}", f"+sweep.mode={mode}", f"+sweep.family={family}",
                   f"+sweep.budget={float(budget)!r}", f"+sweep.rho={float(spec.rho)!r}", f"+sweep.seed={seed}"]
            if slots is not None:
                own.append(f"+sweep.slots={int(slots)}")
            if wandb_mode is not None:
                own.append(f"logging.wandb.mode={wandb_mode}")
            if wandb_project is not None:
                own.append(f"logging.wandb.project={wandb_project}")
            overrides = merge_overrides(spec.overrides(), extra_overrides, own)
            runs.append(SweepRun(float(spec.rho), seed, run_dir, run_name, overrides, spec.to_dict(),
                                 None if slots is None else int(slots)))
    return Sweep(name, mode, family, float(budget), sweep_dir, runs, list(warnings))


# --------------------------------------------------------------------------------------------------
# Planning from the budget solver
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _PlannedRun:
    """A budget-solver run spec as the driver launches it."""

    spec: Any  # sweeps.budget.RunSpec

    @property
    def rho(self) -> float:
        return self.spec.rho

    def overrides(self) -> list[str]:
        return self.spec.overrides(include_name=False)


@dataclass(frozen=True)
class MemorySpec(_PlannedRun):
    """A memory-sweep point: the budget solver's run spec with Engram tables of ``slots`` rows in all."""

    slots: int = 0  # exact table rows (prime-sized tables)
    requested_slots: int = 0  # what was asked for (names the run directory)
    estimates: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.spec.to_dict(), "slots": self.slots, "requested_slots": self.requested_slots,
                "estimates": self.estimates}


@dataclass(frozen=True)
class _AllocationSpec(_PlannedRun):
    described: dict = field(default_factory=dict)  # its Plan.to_list() entry: spec fields + cost estimates

    def to_dict(self) -> dict:
        return self.described


def plan_allocation(family: str, budget: float, rhos: Sequence[float], *, data_dir: Optional[str] = None,
                    ep_size: int = 1, round_experts_to_ep: bool = False) -> tuple[list[Any], list[str]]:
    """Run specs of an allocation sweep from the budget solver, and its warnings."""
    from sweeps.budget import solve_plan
    from sweeps.families import load_family

    plan = solve_plan(load_family(family), float(budget), list(rhos), ep_size=ep_size,
                      round_experts_to_ep=round_experts_to_ep, data_dir=data_dir)
    return [_AllocationSpec(s, d) for s, d in zip(plan.runs, plan.to_list())], list(plan.warnings)


def plan_memory(family: str, budget: float, slots: Sequence[int], *,
                data_dir: Optional[str] = None) -> tuple[list[MemorySpec], list[str]]:
    """Run specs of an "infinite memory" sweep (sized by ``sweeps.budget.solve_memory_points``),
    each with its cost estimates."""
    from sweeps.budget import estimate_resources, solve_memory_points
    from sweeps.families import load_family

    fam = load_family(family)
    out = []
    for (spec, exact_slots), requested in zip(solve_memory_points(fam, budget, slots, data_dir=data_dir),
                                              sorted(int(s) for s in slots)):
        res = estimate_resources(spec, fam.hardware)
        est = {"hardware": fam.hardware.name, "n_gpus": fam.hardware.n_gpus, "mfu": fam.hardware.mfu,
               "gpu_hours": res.gpu_hours, "mem_per_gpu_gib": res.total_gib, "fits": res.fits}
        out.append(MemorySpec(spec, exact_slots, requested, est))
    return out, []


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------
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


def _write_json(path: Path, obj: Any) -> None:
    run_files.atomic_write_json(path, obj, default=str, allow_nan=False)


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
    _write_json(run.run_dir / run_files.FAILED, {"status": FAILED, "reason": reason, "step": _last_step(run.run_dir),
                                              "source": "sweep driver"})


def _last_step(run_dir: Path) -> Optional[int]:
    latest = run_files.latest_checkpoint_index(run_dir)
    try:
        return int(json.loads(latest.read_text())["step"])
    except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError):
        return None


def _mark_launch(run: SweepRun) -> int:
    marker = run.run_dir / LAUNCH_MARKER
    state = json.loads(marker.read_text()) if marker.exists() else {}
    attempts = int(state.get("attempts", 0)) + 1
    _write_json(marker, {"attempts": attempts, "name": run.name, "last_launch": time.time(),
                         "overrides": run.overrides})
    return attempts


def run_sweep(sweep: Sweep, launcher: Launcher, *, retry_failed: bool = False,
              run_timeout_s: Optional[float] = None, poll_s: float = 1.0, report_every_s: float = 30.0,
              emit: Callable[[str], None] = print) -> list[RunRecord]:
    """Launch every run of ``sweep`` that is not finished, wait for all, return the final records.

    SIGINT / SIGTERM stop the runs this driver started (they stay resumable) and re-raise
    KeyboardInterrupt after the results table is written. Runs held by another live process are
    waited for, never launched twice.
    """
    lock = _SweepLock(sweep.dir)
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    if main_thread:
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _drive(sweep, launcher, retry_failed, run_timeout_s, poll_s, report_every_s, emit)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        lock.release()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


# Overrides that decide what a run computes; a re-run whose plan changes any of them must not reuse it.
_DEFINING = ("model.", "train.", "optim.", "data.")


def _defining(overrides: Sequence[str]) -> dict[str, str]:
    return {_key(o): o.split("=", 1)[1] for o in overrides
            if _key(o).startswith(_DEFINING) and _key(o) != "train.progress"}


def check_plan_unchanged(sweep: Sweep) -> None:
    """Refuse to continue a sweep whose runs were launched under a different plan (say, the family
    config changed): their finished results would be mixed with the new plan's, silently."""
    changed = []
    for run in sweep.runs:
        marker = run.run_dir / LAUNCH_MARKER
        if not marker.exists():
            continue
        before = _defining(json.loads(marker.read_text()).get("overrides", []))
        now = _defining(run.overrides)
        keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
        if keys:
            changed.append(f"{run.run_dir.name} ({', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
    if changed:
        raise ValueError(f"sweep {sweep.name} in {sweep.dir}: the plan changed since these runs were launched: "
                         f"{'; '.join(changed)}; use a new --out, or remove those run directories to redo them")


def _drive(sweep: Sweep, launcher: Launcher, retry_failed: bool, run_timeout_s: Optional[float], poll_s: float,
           report_every_s: float, emit: Callable[[str], None]) -> list[RunRecord]:
    check_plan_unchanged(sweep)
    results_path = sweep.dir / "results.parquet"
    by_name = {r.name: r for r in sweep.runs}
    records = {r.name: sweep.record(r) for r in sweep.runs}
    progress = Progress(sweep.name, launcher.capacity, emit)
    for rec in records.values():
        if rec.status == COMPLETED:
            progress.record_duration(rec.wall_time_s)
    active: dict[str, tuple[Handle, float]] = {}
    queue: list[str] = []
    resumed: set[str] = set()  # runs this invocation continued from a checkpoint
    for name, rec in records.items():
        run = by_name[name]
        handle = launcher.reattach(run.run_dir) if not rec.is_terminal else None
        if handle is None and not rec.is_terminal and is_locked(run.run_dir):
            handle = ForeignHandle(run.run_dir)
        if handle is not None:
            active[name] = (handle, time.monotonic())
            records[name].status = RUNNING
            progress.run_started(name)
            emit(f"[{sweep.name}] {run.run_dir.name}: already running ({handle.description}); waiting for it")
        elif rec.status in (PENDING, INTERRUPTED) or (retry_failed and rec.status in (FAILED, DIVERGED)):
            queue.append(name)
    skipped = sum(r.status == COMPLETED for r in records.values())
    failed_kept = sum(r.status in (FAILED, DIVERGED) for r in records.values()) if not retry_failed else 0
    emit(f"[{sweep.name}] {len(sweep.runs)} runs: {skipped} already completed, {failed_kept} failed earlier "
         f"(kept; --retry-failed relaunches them), {len(queue)} to launch, {len(active)} running elsewhere; "
         f"launcher: {launcher.describe()}")

    def save() -> None:
        write_results([records[r.name] for r in sweep.runs], results_path)

    def own_in_flight() -> int:
        return sum(not isinstance(h, ForeignHandle) for h, _ in active.values())

    def finish(name: str, exit_code: Optional[int], reason: Optional[str], started: float,
               timed_out: bool = False) -> None:
        run = by_name[name]
        progress.run_ended(name)
        if timed_out:
            _record_failure(run, f"timed out after {fmt_duration(run_timeout_s)} (resumable with --retry-failed)")
        status, _ = read_outcome(run.run_dir)
        if reason == "released":  # a foreign trainer let go of the run: look at it afresh
            rec = sweep.record(run)
            records[name] = rec
            if rec.status in (PENDING, INTERRUPTED):
                queue.insert(0, name)
            emit(f"[{sweep.name}] {run.run_dir.name}: released by the other process ({rec.status})")
            return
        if status not in TERMINAL:
            if exit_code == 0:
                _record_failure(run, "trainer exited 0 without writing final.json")
            else:
                detail = reason or log_tail_reason(run.run_dir / RUN_LOG)
                _record_failure(run, f"exit code {exit_code}: {detail}")
        rec = sweep.record(run)
        records[name] = rec
        took = fmt_duration(time.monotonic() - started)
        if rec.status == COMPLETED:
            # launch to finish as the driver saw it (start-up included); a resumed run's is partial
            progress.record_duration(None if name in resumed else time.monotonic() - started)
            emit(f"[{sweep.name}] {run.run_dir.name}: completed, val_loss {rec.val_loss:.4f} ({took})")
        else:
            emit(f"[{sweep.name}] {run.run_dir.name}: {rec.status.upper()} after {took}: {rec.reason}")
        save()

    try:
        save()
        last_report = time.monotonic()
        while queue or active:
            while queue and own_in_flight() < launcher.capacity:
                name = queue.pop(0)
                run = by_name[name]
                if records[name].status in (FAILED, DIVERGED):
                    (run.run_dir / run_files.FAILED).unlink(missing_ok=True)  # this attempt supersedes it
                run.run_dir.mkdir(parents=True, exist_ok=True)
                was_resumed = run_files.latest_checkpoint_index(run.run_dir).exists()
                if was_resumed:
                    resumed.add(name)
                try:
                    handle = launcher.launch(LaunchRequest(run.name, run.run_dir, run.overrides,
                                                           run.run_dir / RUN_LOG))
                except (OSError, RuntimeError, ValueError) as e:  # e.g. sbatch refused the job
                    _record_failure(run, f"launch failed: {type(e).__name__}: {e}")
                    records[name] = sweep.record(run)
                    emit(f"[{sweep.name}] {run.run_dir.name}: FAILED to launch: {e}")
                    save()
                    continue
                if handle is None:
                    handle = ForeignHandle(run.run_dir)
                    emit(f"[{sweep.name}] {run.run_dir.name}: locked by another process; waiting for it")
                else:
                    _mark_launch(run)
                    how = f"resuming from step {_last_step(run.run_dir)}" if was_resumed else "starting"
                    emit(f"[{sweep.name}] {run.run_dir.name}: {how} ({handle.description})")
                active[name] = (handle, time.monotonic())
                records[name] = replace(sweep.record(run), status=RUNNING)
                progress.run_started(name)
            changed = False
            for name, (handle, started) in list(active.items()):
                outcome = handle.poll()
                if outcome is None:
                    if (run_timeout_s is not None and not isinstance(handle, ForeignHandle)
                            and time.monotonic() - started > run_timeout_s):
                        handle.stop()
                        del active[name]
                        finish(name, None, None, started, timed_out=True)
                        changed = True
                    continue
                del active[name]
                finish(name, outcome.exit_code, outcome.reason, started)
                changed = True
            now = time.monotonic()
            if changed or now - last_report >= report_every_s:
                progress.report(list(records.values()))
                last_report = now
            if queue or active:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        emit(f"[{sweep.name}] interrupted: stopping {len(active)} run(s); re-run the same command to resume")
        for name, (handle, _) in active.items():
            if handle.stoppable_on_exit:
                handle.stop()
                records[name] = sweep.record(by_name[name])
            else:
                emit(f"[{sweep.name}] {by_name[name].run_dir.name}: left running ({handle.description})")
        save()
        raise
    final = [records[r.name] for r in sweep.runs]
    emit(table(final))
    return final


# --------------------------------------------------------------------------------------------------
# Collecting: results table, fit, figures, summary.json, W&B
# --------------------------------------------------------------------------------------------------
def _fit_inputs(records: Sequence[RunRecord], x_name: str) -> tuple[list, list, list, list[dict]]:
    """(x, seed, loss) of completed runs that the fit may use, and the excluded ones with their reason.
    Allocation sweeps fit on the run's effective rho when the planner recorded one."""
    xs, seeds, losses, excluded = [], [], [], []
    for r in records:
        if r.status != COMPLETED or r.val_loss is None:
            continue
        why = getattr(r, "excluded", None)
        if why:
            excluded.append({"run_name": r.run_name, "rho": r.rho, "seed": r.seed, "reason": why})
            continue
        x = getattr(r, x_name)
        if x_name == "rho" and getattr(r, "rho_eff", None) is not None:
            x = r.rho_eff
        xs.append(x), seeds.append(r.seed), losses.append(r.val_loss)
    return xs, seeds, losses, excluded


def _points(records: Sequence[RunRecord], fit: Any) -> list[dict]:
    """Every record's fields (spec aside) plus the fit's noise estimate and the seeds finished at its rho."""
    per_rho: dict[float, int] = {}
    for r in records:
        if r.status == COMPLETED and r.val_loss is not None and not getattr(r, "excluded", None):
            per_rho[round(r.rho, 9)] = per_rho.get(round(r.rho, 9), 0) + 1
    sigma = getattr(fit, "sigma", None)
    out = []
    for r in records:
        d = {k: v for k, v in r.as_dict().items() if k != "spec"}
        d["seeds_at_rho"] = per_rho.get(round(r.rho, 9), 0)
        d["noise_sd"] = sigma
        out.append(d)
    return out


def summarize(sweep: Sweep, records: Sequence[RunRecord], *, n_boot: int = 4000, level: float = 0.95,
              rho_ref: float = 1.0, wandb_mode: str = "offline", wandb_project: str = "isoflop-engram",
              wandb_entity: Optional[str] = None, emit: Callable[[str], None] = print) -> dict:
    """Fit what the completed runs allow and write results.parquet, summary.json, the figure and the W&B
    summary run into the sweep directory. Returns the summary."""
    from sweeps.fit import fit_power_law, fit_u_curve, verdict_line
    from sweeps.plots import CurveData, plot_memory_scaling, plot_u_curves
    from sweeps.wandb_summary import log_summary

    write_results(records, sweep.dir / "results.parquet")
    x_name = "slots" if sweep.mode == MEMORY else "rho"
    xs, seeds, losses, excluded = _fit_inputs(records, x_name)
    fit, fit_error, figure, curve = None, None, None, None
    data = CurveData(f"{sweep.family} {budget_tag(sweep.budget)} FLOPs", xs, losses, len(records) - len(xs))
    if sweep.mode == MEMORY:
        try:
            fit = fit_power_law(xs, losses, n_boot=n_boot, level=level)
            curve = {"x": sorted(xs), "loss": [float(v) for v in fit.predict(sorted(xs))], "x_name": "slots"}
        except ValueError as e:  # too few completed points for the fit
            fit_error = str(e)
            emit(f"[{sweep.name}] no fit: {fit_error}")
        if xs:
            figure = plot_memory_scaling(data, fit, sweep.dir / "memory_scaling.png")
    else:
        fit = fit_u_curve(xs, losses, seeds, rho_ref=rho_ref, n_boot=n_boot, level=level)
        data.outliers = list(fit.outliers)
        if fit.verdict == "insufficient":
            fit_error = fit.reason
        if xs:
            figure = plot_u_curves([(data, fit)], sweep.dir / "u_curve.png", title=f"{sweep.name}: loss vs rho")
        curve = {"x": fit.band_rho, "loss": [float(v) for v in fit.predict(fit.band_rho)], "lo": fit.band_lo,
                 "hi": fit.band_hi, "x_name": "rho"} if fit.band_rho else None
        emit(f"[{sweep.name}] {verdict_line(fit.to_dict())}")
    counts = {s: sum(r.status == s for r in records) for s in (COMPLETED, FAILED, DIVERGED, PENDING, INTERRUPTED,
                                                                RUNNING)}
    fit_dict = fit.to_dict() if fit is not None else None
    summary = {"sweep": sweep.name, "mode": sweep.mode, "family": sweep.family, "budget": sweep.budget,
               "points": _points(records, fit), "fit": fit_dict, "fit_error": fit_error, "excluded": excluded,
               "counts": counts, "results_table": "results.parquet", "figures": [figure.name] if figure else [],
               "warnings": sweep.warnings}
    wandb_dir = None
    try:
        wandb_dir = log_summary(
            sweep.dir, sweep.name, records, fit_dict, curve, [figure] if figure else [],
            {"sweep": sweep.name, "mode": sweep.mode, "family": sweep.family, "budget": sweep.budget,
             "n_runs": len(records)}, project=wandb_project, entity=wandb_entity, mode=wandb_mode)
    except Exception as e:  # W&B trouble must not lose the sweep's results
        emit(f"[{sweep.name}] W&B summary not logged: {type(e).__name__}: {e}")
    state = sweep.dir / "wandb_summary.json"
    if wandb_dir is None and state.exists():  # unchanged since it was last logged: point at that run
        wandb_dir = json.loads(state.read_text()).get("location")
    if wandb_dir:
        summary["wandb_summary_dir"] = wandb_dir
    _write_json(sweep.dir / "summary.json", json_safe(summary))
    return summary


def overlay_allocation_sweeps(out: Path, path: Optional[Path] = None) -> Optional[Path]:
    """Every allocation sweep under ``out`` with a summary, in one figure (``<out>/u_curves.png``); with two
    or more budgets, also rho* and the gain against budget (``<out>/trend.png``) and their fitted trend in
    ``<out>/summary.json``."""
    from sweeps.fit import UCurveFit, fit_trend
    from sweeps.plots import CurveData, plot_trend, plot_u_curves

    curves = []
    for summary_path in sorted(Path(out).glob("*/summary.json"), key=lambda p: p.parent.name):
        s = json.loads(summary_path.read_text())
        if s.get("mode") != ALLOCATION:
            continue
        done = [p for p in s["points"] if p["status"] == COMPLETED and p["val_loss"] is not None]
        if not done:
            continue
        fit = UCurveFit.from_dict(s["fit"]) if s.get("fit") else None
        data = CurveData(f"{s['family']} {budget_tag(s['budget'])} FLOPs",
                         [p.get("rho_eff") or p["rho"] for p in done], [p["val_loss"] for p in done],
                         len(s["points"]) - len(done))
        curves.append((s["budget"], s["family"], data, fit, s.get("fit")))
    if not curves:
        return None
    curves.sort(key=lambda c: c[0])
    figure = plot_u_curves([(d, f) for _, _, d, f, _ in curves], path or Path(out) / "u_curves.png",
                           title="Allocation sweeps: loss vs rho, all budgets")
    budgets = [c[0] for c in curves]
    if len(set(budgets)) >= 2:
        trend = fit_trend(budgets, [c[4] for c in curves])
        trend["families"] = sorted({c[1] for c in curves})
        if len(trend["points"]) >= 2:
            trend["figure"] = plot_trend(trend, Path(out) / "trend.png").name
        _write_json(Path(out) / "summary.json", json_safe({"trend": trend, "u_curves": figure.name}))
    return figure


def _power_report(sweep: Sweep, noise: Optional[float]) -> list[str]:
    """Dry-run power lines: from ``noise`` or from finished sweeps of the same family under the output root."""
    from sweeps.power import noise_from_earlier, power_lines

    n_rho = len({round(r.rho, 9) for r in sweep.runs})
    n_seeds = len({r.seed for r in sweep.runs})
    if noise is not None:
        return power_lines(noise, "given", n_rho, n_seeds)
    earlier = noise_from_earlier(sweep.dir.parent, sweep.family)
    if earlier is None:
        return power_lines(None, "", n_rho, n_seeds)
    return power_lines(earlier[0], f"earlier sweeps' ({earlier[1]} dof)", n_rho, n_seeds)


def describe_plan(sweep: Sweep, noise: Optional[float] = None) -> str:
    """The dry-run view: every run's shape, cost and state, the command of the first one and, for an
    allocation sweep, the smallest gain it could detect (noise sd ``noise``, else from earlier sweeps)."""
    import shlex
    import sys

    from sweeps.launchers import TRAIN_SCRIPT

    lines = [f"sweep {sweep.name} ({sweep.mode}): {len(sweep.runs)} runs in {sweep.dir}"]
    lines += [f"warning: {w}" for w in sweep.warnings]
    head = (f"{'run':<24} {'state':<11} {'P_tot':>9} {'P_act':>9} {'experts':>7} {'engram':>9} {'tokens':>9} "
            f"{'FLOPs':>8} {'drift':>7} {'GPU-h':>8} {'GiB/dev':>7}")
    lines += [head, "-" * len(head)]
    total_hours = 0.0
    for run in sweep.runs:
        s = run.spec
        est = s.get("estimates") or {}
        total_hours += est.get("gpu_hours", 0.0)
        rec = sweep.record(run)
        lines.append(f"{run.run_dir.name:<24} {rec.status:<11} {s.get('total_params', 0):>9.3g} "
                     f"{s.get('active_params', 0):>9.3g} {s.get('n_routed_experts', '-'):>7} "
                     f"{s.get('engram_params', 0):>9.3g} {s.get('train_tokens', 0):>9.3g} "
                     f"{s.get('train_flops', 0):>8.3g} {s.get('flops_drift', 0):>+7.2%} "
                     f"{est.get('gpu_hours', math.nan):>8.3g} {est.get('mem_per_gpu_gib', math.nan):>7.3g}")
    if total_hours:
        est = sweep.runs[0].spec["estimates"]
        lines.append(f"total: {total_hours:.4g} GPU-hours on {est['hardware']} at {est['mfu']:.0%} MFU "
                     f"(the family's assumptions)")
    first = sweep.runs[0]
    lines.append(f"command of {first.run_dir.name}:\n  {shlex.join([sys.executable, TRAIN_SCRIPT, *first.overrides])}")
    if sweep.mode == ALLOCATION:
        lines += _power_report(sweep, noise)
    return "\n".join(lines)


def write_plan(sweep: Sweep) -> None:
    sweep.dir.mkdir(parents=True, exist_ok=True)
    _write_json(sweep.dir / "plan.json", json_safe({
        "sweep": sweep.name, "mode": sweep.mode, "family": sweep.family, "budget": sweep.budget,
        "warnings": sweep.warnings,
        "runs": [{"name": r.name, "run_dir": str(r.run_dir), "rho": r.rho, "seed": r.seed, "slots": r.slots,
                  "overrides": r.overrides, "spec": r.spec} for r in sweep.runs]}))
