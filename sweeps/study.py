"""A study: the allocation sweeps, their memory-ablation arm and an infinite-memory sweep, committed.

    python -m sweeps.study studies/cpu-small            # train what is missing, fit, write the report
    python -m sweeps.study studies/cpu-small --dry-run  # the plans and their state, nothing trained
    python -m sweeps.study studies/cpu-small --report   # rewrite RESULTS.md (and README) from what is there

A study is a folder holding ``study.yaml`` (what to run) and, once run, one sweep folder per budget and
mode, exactly as ``python -m sweeps.run`` writes them (run directories, results.parquet, summary.json,
PNGs). The folder is meant to be committed without checkpoints or W&B files (.gitignore keeps them out):
a finished run is its ``final.json``, so a later invocation of the same command, on any machine, treats
the committed points as finished and trains only what is missing (more seeds, another budget: edit
study.yaml). Every invocation is appended to ``study_log.json`` (commit, dirty tree, wall time, runs
trained, the exact commands), so the record says which code produced which point.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from rundir.files import FINAL, atomic_write_text
from sweeps.study_config import LOG_FILE, STUDY_FILE, Study, load_study  # noqa: F401  (the study's API)

def _g(v: float) -> str:
    return f"{v:g}".replace("e+", "e")


def sweep_commands(study: Study, out: Path, parallel: int, threads: int) -> list[list[str]]:
    """The ``python -m sweeps.run`` argument lists of the study, in the order they run."""
    common = ["--family", study.family, "--out", str(out), "--parallel", str(parallel), "--threads", str(threads)]
    a = study.allocation
    cmds = [["--budget", *map(_g, a.budgets), "--rho", *map(_g, a.rhos), "--seeds", str(a.seeds),
             *(["--ablate-memory"] if a.ablate_memory else []), *common]]
    if study.memory is not None:
        m = study.memory
        cmds.append(["--budget", _g(m.budget), "--mode", "memory", "--slots", *map(str, m.slots),
                     "--seeds", str(m.seeds), *common])
    return cmds


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def completed_runs(folder: Path) -> dict[str, int]:
    """Finished runs per sweep folder (a run directory with a final.json)."""
    return {d.name: sum(1 for _ in d.glob(f"*/{FINAL}")) for d in sorted(Path(folder).iterdir())
            if d.is_dir() and (d / "plan.json").exists()}


def append_log(folder: Path, entry: dict) -> None:
    path = Path(folder) / LOG_FILE
    log = json.loads(path.read_text()) if path.exists() else []
    log.append(entry)
    atomic_write_text(path, json.dumps(log, indent=2) + "\n")


def run_study(folder: Path, parallel: int, threads: int, dry_run: bool) -> int:
    from sweeps.run import main as run_sweep_command

    folder = Path(folder)
    study = load_study(folder)
    cmds = sweep_commands(study, folder, parallel, threads)
    before = completed_runs(folder) if folder.exists() else {}
    started, t0, codes = time.time(), time.monotonic(), []
    for argv in cmds:
        print(f"study {study.name}: python -m sweeps.run {' '.join(argv)}{' --dry-run' if dry_run else ''}",
              flush=True)
        codes.append(run_sweep_command([*argv, *(["--dry-run"] if dry_run else [])]))
    if dry_run:
        return max(codes)
    after = completed_runs(folder)
    trained = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))  # the study's own outputs are untracked
    append_log(folder, {"commit": _git("rev-parse", "HEAD"), "dirty": dirty,
                        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                        "wall_s": round(time.monotonic() - t0, 1), "runs_trained": trained,
                        "runs_finished": after, "exit_codes": codes, "host": platform.node(),
                        "cpus": os.cpu_count(), "threads_per_run": threads, "runs_at_once": parallel,
                        "commands": [["python", "-m", "sweeps.run", *c] for c in cmds]})
    print(f"study {study.name}: trained {sum(trained.values())} run(s) in {time.monotonic() - t0:.0f} s; "
          f"log: {folder / LOG_FILE}")
    write_report(folder)
    return max(codes)


def write_report(folder: Path) -> None:
    """RESULTS.md in the study folder (and the README's results section), from what is on disk."""
    try:
        from sweeps.study_report import write_all
    except ImportError:  # the report module lands separately; the study's runs do not depend on it
        print("study: no report writer in this checkout (sweeps/study_report.py); run --report later")
        return
    for path in write_all(Path(folder)):
        print(f"wrote {path}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweeps.study", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", type=Path, help="study folder holding study.yaml, e.g. studies/cpu-small")
    p.add_argument("--parallel", type=int, default=2, help="runs at once (default 2: one per core)")
    p.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    p.add_argument("--dry-run", action="store_true", help="print the plans and their state; train nothing")
    p.add_argument("--report", action="store_true", help="only rewrite the report from what is on disk")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        if args.report:
            load_study(args.folder)
            write_report(args.folder)
            return 0
        return run_study(args.folder, args.parallel, args.threads, args.dry_run)
    except ValueError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
