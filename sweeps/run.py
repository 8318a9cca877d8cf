"""Run an allocation sweep (or an "infinite memory" sweep) from one command.

    python -m sweeps.run --budget 6e12 --family cpu --out sweeps_out              # 5 rho values, 1 seed
    python -m sweeps.run --budget 6e12 2e13 --family cpu --rho 1 .9 .8 .7 .5 .3 --seeds 3
    python -m sweeps.run --budget 6e12 --family cpu --dry-run                      # plan and cost only
    python -m sweeps.run --budget 2e20 --family paper --launcher slurm --nodes 2 --gpus-per-node 8 \\
        --slurm partition=h100 --slurm account=myproj --data-dir /data/ds_tok
    python -m sweeps.run --budget 6e12 --family cpu --mode memory --slots 1e4 3e4 1e5 3e5 1e6
    python -m sweeps.run ... --set train.eval_tokens=32768        # a trainer setting of every run

Re-running the same command skips completed runs, resumes interrupted ones from their last checkpoint
and launches only what is missing. Output: <out>/<family>-<budget>/{results.parquet, summary.json,
u_curve.png, plan.json}, one run directory per (rho, seed), and <out>/u_curves.png over all budgets.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from sweeps.execution.driver import build_sweep, plan_allocation, plan_memory
from sweeps.execution.sweep import ALLOCATION, MEMORY
from sweeps.analysis.planview import describe_plan, write_plan
from sweeps.execution.runloop import SweepLocked, check_plan_unchanged, run_sweeps
from sweeps.analysis.summary import overlay_allocation_sweeps, summarize
from sweeps.plan import add_engram_tables_argument, add_rho_argument, flat, numbers_arg

LAUNCHERS = ("local", "gpus", "submitit-local", "slurm")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to sweep")
    g.add_argument("--budget", "--budgets", type=numbers_arg, nargs="+", required=True,
                   help="training FLOPs (one sweep per budget)")
    g.add_argument("--family", default="auto",
                   help="model family: conf/family/<name>.yaml, a path, or auto (the family whose budget range holds "
                        "the budget: cpu, gpu, paper)")
    g.add_argument("--mode", choices=(ALLOCATION, MEMORY), default=ALLOCATION,
                   help="allocation: rho swept at fixed P_tot and FLOPs; memory: rho=1 backbone + Engram slots")
    add_rho_argument(g)
    g.add_argument("--slots", type=numbers_arg, nargs="+",
                   help="memory mode: Engram table rows in total, e.g. 1e4 1e5 1e6")
    g.add_argument("--ablate-memory", action="store_true",
                   help="allocation: add a control run per rho < 1 with each Engram table collapsed to one row "
                        "(same model compute; sweeps/planning/ablation.py) and report full minus ablated")
    g.add_argument("--seeds", type=int, default=1, help="seeds per point (seeds 0..N-1 + --seed-offset)")
    g.add_argument("--seed-offset", type=int, default=0)
    g.add_argument("--data-dir", help="token shards for every run (default: the family's data_dir)")
    g.add_argument("--ep-size", type=int, default=1, help="expert-parallel size the expert counts must divide")
    g.add_argument("--round-experts-to-ep", action="store_true")
    add_engram_tables_argument(g)
    g.add_argument("--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="a trainer config value of every run, e.g. train.eval_tokens=32768 (repeatable; keys the "
                        "plan solves are refused)")
    g = p.add_argument_group("where and how to run")
    g.add_argument("--out", type=Path, default=Path("sweeps_out"), help="output root (default: sweeps_out)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="local",
                   help="local: this machine, --parallel runs at once; gpus: local, one run per --devices group; "
                        "submitit-local: submitit's local executor; slurm: one submitit job per run")
    g.add_argument("--parallel", type=int, default=1, help="local: runs at once")
    g.add_argument("--devices", help="gpus: comma-separated device ids, e.g. 0,1,2,3")
    g.add_argument("--procs-per-run", type=int,
                   help="processes (devices) of a run on each of its nodes (default: --gpus-per-node for slurm and "
                        "submitit-local, else 1)")
    g.add_argument("--runner", choices=("auto", "python", "torchrun", "deepspeed"), default="auto",
                   help="how a run's processes are started (auto: python for one process, else torchrun)")
    g.add_argument("--threads", type=int, help="OMP threads per process (default: cores / processes in flight)")
    g.add_argument("--nodes", type=int, default=1, help="slurm: nodes per run")
    g.add_argument("--gpus-per-node", type=int, default=0, help="slurm/submitit: GPUs per node")
    g.add_argument("--timeout-min", type=int, default=240, help="slurm: job time limit (requeued on time-out)")
    g.add_argument("--max-jobs", type=int, help="slurm/submitit: jobs in flight at once")
    g.add_argument("--slurm", dest="slurm_params", action="append", type=_key_value, default=[],
                   metavar="KEY=VALUE", help="slurm parameter, e.g. partition=gpu, account=x, qos=y (repeatable)")
    g.add_argument("--run-timeout", type=float, help="seconds before a run is stopped and recorded as failed")
    g.add_argument("--retry-failed", action="store_true", help="relaunch runs recorded as failed or diverged")
    g.add_argument("--dry-run", action="store_true", help="print the plan (shapes, cost, state) and launch nothing")
    g.add_argument("--force", action="store_true",
                   help="launch locally even if the plan does not fit this machine (memory per rank, accelerators)")
    g.add_argument("--noise", type=float, help="dry run: seed-noise sd of val loss (nats) for the power report "
                                                "(default: estimated from finished sweeps of the family in --out)")
    g.add_argument("--report-every", type=float, default=30.0, help="seconds between progress lines")
    g = p.add_argument_group("fit and logging")
    g.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates")
    g.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals")
    g.add_argument("--wandb-mode", choices=("offline", "online", "disabled"), default="offline")
    g.add_argument("--wandb-project", default="isoflop-engram")
    g.add_argument("--wandb-entity")
    return p


def _procs(args: argparse.Namespace) -> int:
    """A run's processes on each of its nodes: ``--procs-per-run``, else a Slurm node's GPUs (one process
    per GPU), else 1."""
    if args.procs_per_run is not None:
        return args.procs_per_run
    return max(1, args.gpus_per_node) if args.launcher in ("slurm", "submitit-local") else 1


def make_launcher(args: argparse.Namespace, out_dir: Path):
    from sweeps.execution.launchers import LocalLauncher
    from sweeps.execution.submitit_launcher import SubmititLauncher

    if args.launcher == "local":
        return LocalLauncher(None, _procs(args), args.runner, args.parallel, args.threads)
    if args.launcher == "gpus":
        devices = [d.strip() for d in args.devices.split(",") if d.strip()]
        return LocalLauncher(devices, _procs(args), args.runner, threads=args.threads)
    cluster = "local" if args.launcher == "submitit-local" else "slurm"
    return SubmititLauncher(out_dir / "submitit", cluster=cluster, nodes=args.nodes,
                            gpus_per_node=args.gpus_per_node, procs_per_node=_procs(args), runner=_runner(args),
                            timeout_min=args.timeout_min, max_parallel=args.max_jobs, threads=args.threads,
                            slurm=dict(args.slurm_params) or None)


def _runner(args: argparse.Namespace) -> str:
    """A submitit job's runner: ``--runner``, or auto: python for one process on one node, else torchrun."""
    if args.runner != "auto":
        return args.runner
    return "python" if _procs(args) == 1 and args.nodes == 1 else "torchrun"


def _first_command(args: argparse.Namespace, run_dir: Path) -> list[str]:
    """The command the launcher would start for ``run_dir`` (torchrun / deepspeed for several processes per
    run); for a submitit job, node 0's, with the node names and port Slurm gives the job in brackets."""
    if args.launcher in ("local", "gpus"):
        launcher = make_launcher(args, Path(args.out).resolve())
        return launcher.command(run_dir, launcher.slots[0])[0]
    from sweeps.execution.submitit_launcher import NodeTask

    task = NodeTask(str(run_dir), "", _runner(args), _procs(args), args.threads)
    hosts = [f"<node{i}>" for i in range(args.nodes)]
    return task.command(hosts, args.nodes, 0, "<20000 + job id % 20000>" if args.nodes > 1 else None)[0]


def _fit_line(summary: dict) -> str:
    fit = summary.get("fit")
    if not fit:
        return f"  no fit ({summary.get('fit_error')})"
    if summary["mode"] == MEMORY:
        lo, hi = fit["beta_ci"]
        return (f"  loss = {fit['a']:.4f} + {fit['b']:.4f} (slots/{fit['s0']:.3g})^-{fit['c']:.3f};  "
                f"log-linear slope {fit['beta']:+.4f} per decade [{_f(lo)}, {_f(hi)}]")
    from sweeps.analysis.fit import verdict_line

    return f"  {verdict_line(fit)}"


def _f(v: Optional[float]) -> str:
    return "?" if v is None else f"{v:.3f}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    args.budget, args.rho, args.slots = flat(args.budget), flat(args.rho), flat(args.slots)
    try:
        return _main(args)
    except (ValueError, SweepLocked) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        return 130


def _plan(args: argparse.Namespace, family: str, budget: float, seeds: list[int]):
    """One budget's sweep (raises on a budget the family refuses, or on --set over a planned field)."""
    if args.mode == MEMORY:
        specs, warnings = plan_memory(args.family, budget, [int(s) for s in args.slots], data_dir=args.data_dir)
    else:
        specs, warnings = plan_allocation(args.family, budget, args.rho, data_dir=args.data_dir,
                                          ep_size=args.ep_size, round_experts_to_ep=args.round_experts_to_ep,
                                          ablate_memory=args.ablate_memory, engram_tables=args.engram_tables,
                                          n_gpus=_ranks_per_run(args))
    sweep = build_sweep(specs, out=args.out, family=family, budget=budget, seeds=seeds, mode=args.mode,
                        settings=args.settings, wandb_mode=args.wandb_mode,
                        wandb_project=args.wandb_project, warnings=warnings)
    from rundir.schema import check  # the trainer's schema: a bad --set (+train.max_stepz=3) fails here, not at launch

    for run in sweep.runs:
        try:
            check(run.config)
        except ValueError as e:
            raise ValueError(f"{run.run_dir.name}: {e}") from None
    return sweep


def _check_machine(args: argparse.Namespace, sweeps) -> None:
    from sweeps.execution.preflight import check_fits, local_machine

    devices = [d.strip() for d in (args.devices or "").split(",") if d.strip()]
    ranks = _procs(args) * (args.parallel if args.launcher == "local" else 1)
    hint = (f"python -m sweeps.run --budget {' '.join(f'{b:g}' for b in args.budget)} --family {args.family} "
            f"--launcher slurm --nodes N --gpus-per-node 8 --slurm partition=P --data-dir D")
    check_fits(sweeps, local_machine(ranks, devices), hint)


def _ranks_per_run(args: argparse.Namespace) -> Optional[int]:
    """Ranks of one run when expert parallelism or sharded tables split work over them (the plan's
    device count then: EP must divide it, the memory estimate divides by it); None: the family's."""
    if args.ep_size > 1 or args.engram_tables == "sharded":
        return _procs(args) * args.nodes
    return None


def _check_args(args: argparse.Namespace) -> None:
    """One-line errors for option values and combinations that cannot make a sweep."""
    if args.seeds < 1 or args.seed_offset < 0:
        raise ValueError(f"--seeds must be >= 1 and --seed-offset >= 0, got {args.seeds} and {args.seed_offset}")
    if args.noise is not None and not args.noise > 0:
        raise ValueError(f"--noise must be a positive sd in nats, got {args.noise}")
    if args.n_boot < 100 or not 0 < args.level < 1:
        raise ValueError(f"--n-boot must be >= 100 and --level in (0, 1), got {args.n_boot} and {args.level}")
    if args.parallel < 1 or _procs(args) < 1:
        raise ValueError("--parallel and --procs-per-run must be >= 1")
    if args.ep_size > 1 and (_procs(args) * args.nodes) % args.ep_size:
        raise ValueError(f"--ep-size {args.ep_size} must divide a run's ranks (--procs-per-run {_procs(args)}"
                         f" x --nodes {args.nodes})")
    if args.mode == MEMORY and args.ablate_memory:
        raise ValueError("--ablate-memory is a control arm of allocation sweeps, not of --mode memory")
    if args.mode == MEMORY and not args.slots:
        raise ValueError("--mode memory needs --slots (Engram table rows in total), e.g. --slots 1e4 3e4 1e5 3e5 1e6")
    if args.mode == MEMORY and any(s <= 0 or s != int(s) for s in args.slots):
        raise ValueError(f"--slots must be positive whole numbers, got {args.slots}")
    if args.launcher == "gpus" and not args.devices:
        raise ValueError("--launcher gpus needs --devices, e.g. --devices 0,1,2,3")
    if args.slurm_params and args.launcher != "slurm":
        raise ValueError("--slurm parameters only apply to --launcher slurm")


def _main(args: argparse.Namespace) -> int:
    _check_args(args)
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    from sweeps.planning.families import load_family

    from sweeps.planning.autofamily import resolve_family

    args.family, picked = resolve_family(args.family, args.budget)
    if picked:
        print(picked)
    fam = load_family(args.family)
    family = fam.name  # a family given as a path is named by its own `name`
    if not args.dry_run:
        fam.launch_data_dir(args.data_dir)  # refuse before planning: runs would train on the default corpus
    sweeps = [_plan(args, family, budget, seeds) for budget in args.budget]  # every budget, before any run
    if args.dry_run:
        for sweep in sweeps:
            print(describe_plan(sweep, noise=args.noise, command=_first_command(args, sweep.runs[0].run_dir)))
        return 0
    for sweep in sweeps:
        check_plan_unchanged(sweep)
    if args.launcher in ("local", "gpus") and not args.force:
        _check_machine(args, sweeps)
    for sweep in sweeps:  # the plan record is written only once the plan is accepted
        write_plan(sweep)
    exit_code = 0
    launcher = make_launcher(args, Path(args.out).resolve())  # one queue: every budget's runs share the slots
    all_records = run_sweeps(sweeps, launcher, retry_failed=args.retry_failed, run_timeout_s=args.run_timeout,
                             report_every_s=args.report_every)
    for sweep, records in zip(sweeps, all_records):
        summary = summarize(sweep, records, n_boot=args.n_boot, level=args.level, wandb_mode=args.wandb_mode,
                            wandb_project=args.wandb_project, wandb_entity=args.wandb_entity)
        print(f"[{sweep.name}] summary: {sweep.dir / 'summary.json'}")
        print(_fit_line(summary))
        if summary.get("wandb_summary_dir") and args.wandb_mode == "offline":
            print(f"  W&B (offline): wandb sync {sweep.dir}/wandb/offline-run-* {sweep.dir}/*/wandb/offline-run-*")
        elif summary.get("wandb_summary_dir"):
            print(f"  W&B: project {args.wandb_project}, group {sweep.name}")
        if not summary["counts"]["completed"]:
            exit_code = 1
    if args.mode == ALLOCATION:
        overlay = overlay_allocation_sweeps(args.out)
        if overlay:
            print(f"all budgets: {overlay}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
