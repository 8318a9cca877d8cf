"""``make demo``: the product's main job at the smallest scale that still is that job.

An allocation sweep of the cpu family on the embedded corpus (this machine's stdlib, BPE-8k): MoE +
Engram at four rho, one seed, two runs at a time on one thread each, then the U-curve fit with its
verdict and intervals, the figure, the results table and the offline W&B runs, and what more seeds
would need. The same code path as any study (``python -m sweeps.run``); re-running it trains nothing.

Why this point. 3e12 FLOPs is just above the cpu family's floor (2.8e12: 0.25 tokens per active
parameter at rung c0), so one run costs about 70 s of one core (measured: rho = 0.6, OMP_NUM_THREADS=1,
64 s user + 17 s sys for the whole one-run sweep; 3m45s wall on a machine five others shared). Four rho
at two runs a time are two waves, the same wall time as three rho, and give the quadratic fit one noise
degree of freedom, so the verdict comes with intervals (three rho x one seed leave none: "insufficient").
Measured once (issue 16): 625 s wall at load average 8-10 on this 2-core machine (five other jobs),
5m20s of CPU in all (user + sys), i.e. an estimated 3-4 minutes on 2 free cores; verdict "flat", noise sd
0.019 nats (1 dof), 31 seeds per rho needed for a 0.014-nat gain.
What the demo cannot do: at 0.26 tokens per active parameter and ~11-20 lookups per table row, the
models are far from trained and the tables barely touched (see conf/family/cpu.yaml); one seed's noise
(~0.03 nats at 6e12) is twice the paper's gain. The demo prints that, with the seeds a 0.014-nat gain needs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

FAMILY, BUDGET_TEXT, RHOS = "cpu", "3e12", (1.0, 0.8, 0.6, 0.4)
BUDGET = float(BUDGET_TEXT)


def sweep_argv(out: Path, parallel: int, threads: int) -> list[str]:
    """The ``sweeps.run`` command line of the demo."""
    return ["--budget", BUDGET_TEXT, "--family", FAMILY, "--rho", *map(str, RHOS), "--seeds", "1",
            "--parallel", str(parallel), "--threads", str(threads), "--out", str(out), "--wandb-mode", "offline"]


def report(sweep_dir: Path) -> list[str]:
    """What the demo found and where it is: paths, and what the noise it measured means for more seeds."""
    from sweeps.analysis.power import power_lines

    summary = json.loads((sweep_dir / "summary.json").read_text())
    fit = summary.get("fit") or {}
    lines = [f"results table: {sweep_dir / summary['results_table']}",
             *(f"figure:        {sweep_dir / f}" for f in summary.get("figures", [])),
             f"summary:       {sweep_dir / 'summary.json'}"]
    if summary.get("wandb_summary_dir"):
        lines.append(f"W&B (offline): {summary['wandb_summary_dir']}  (wandb sync it to upload)")
    done = summary["counts"]["completed"]
    sigma, dof = fit.get("sigma"), fit.get("sigma_dof") or 0
    if sigma is not None and dof >= 1:
        lines += power_lines(sigma, f"this sweep's ({dof} dof, itself uncertain)", len(RHOS), 1)
    else:
        lines.append(f"no noise estimate from {done} finished run(s): {fit.get('reason') or summary.get('fit_error')}")
    command = " ".join(sweep_argv(sweep_dir.parent, 2, 1)).replace("--seeds 1", "--seeds N")
    lines.append(f"more seeds: python -m sweeps.run {command}\n  (finished runs are kept and only the new seeds "
                 f"train; add --ablate-memory for the one-row-table control arm)")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sweeps.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output root (default: demo_out)")
    p.add_argument("--parallel", type=int, default=2, help="runs at once (default 2: one per core)")
    p.add_argument("--threads", type=int, default=1, help="threads per run (default 1)")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))  # 2 threads on a shared core run slower than 1
    from sweeps.execution.sweep import sweep_name
    from sweeps.run import main as run_sweep_command

    print(f"demo: allocation sweep of the {FAMILY} family at {BUDGET_TEXT} FLOPs, rho {', '.join(map(str, RHOS))}, "
          f"one seed (MoE + Engram, iso-parameter and iso-FLOP)")
    t0 = time.time()
    code = run_sweep_command(sweep_argv(args.out, args.parallel, args.threads))
    sweep_dir = args.out.resolve() / sweep_name(FAMILY, BUDGET)
    if (sweep_dir / "summary.json").exists():
        print("\n".join(report(sweep_dir)))
    print(f"demo finished in {time.time() - t0:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
