"""Print the runs of an allocation sweep at one training budget, before anything runs.

    python -m sweeps.plan --budget 2e20 --family paper --rho 1.0,0.8,0.6,0.4
    python -m sweeps.plan --budget 2e20 --family paper --rho 1.0,0.8,0.6,0.4 --json
    python -m sweeps.plan --budget 3e12 --family cpu --configs DIR   # each run's config.yaml + its command

Every rho of the plan has the same total parameters (within the family's tolerance, 0.5% by
default) and spends the budget's training FLOPs (0.2%: tokens are solved to the sequence, the last
optimizer step may be short); the table shows per run the counts, the active-parameter difference
and the active FLOPs drift against rho = 1, effective rho, tokens per active and per total
parameter, Engram lookups per table row, planned FLOPs and their error vs the budget, device-hours
at the given MFU and peak, and memory per device under the chosen ZeRO stage (a warning when it
will not fit). ``--json`` prints one object per rho.
Bad input (rho outside [0, 1], a budget outside the family, expert counts an expert-parallel size
cannot divide, tables larger than device memory) stops with a one-line ``error:`` and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

DEFAULT_RHOS = (1.0, 0.8, 0.6, 0.4, 0.2)  # the one default grid of sweeps.plan and sweeps.run


def parse_numbers(text: str) -> list[float]:
    """'1e13' or '1.0,0.8,0.6' -> finite floats (range checks are the solver's)."""
    out: list[float] = []
    for part in (p for p in text.split(",") if p.strip()):
        try:
            v = float(part)
        except ValueError:
            raise ValueError(f"not a number: {part!r}") from None
        if not math.isfinite(v):
            raise ValueError(f"not a finite number: {part!r}")
        out.append(v)
    if not out:
        raise ValueError(f"no number in {text!r}")
    return out


def numbers_arg(text: str) -> list[float]:
    """argparse type: '1e13' or '1.0,0.8,0.6' -> floats (a list may also be given space-separated)."""
    try:
        return parse_numbers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_rho_argument(parser) -> None:
    """``--rho``, space- or comma-separated, default :data:`DEFAULT_RHOS`: the same option
    in sweeps.plan and sweeps.run. Read the values back with :func:`flat`."""
    parser.add_argument("--rho", dest="rho", type=numbers_arg, nargs="+", default=[list(DEFAULT_RHOS)],
                        help=f"expert shares of the sparse parameters, space- or comma-separated "
                             f"(default {','.join(map(str, DEFAULT_RHOS))})")


def add_engram_tables_argument(parser) -> None:
    """``--engram-tables``: the same option in sweeps.plan and sweeps.run (every run's
    ``parallel.engram_tables``; the plan's memory estimate follows it)."""
    from rundir.schema import ENGRAM_TABLE_MODES

    parser.add_argument("--engram-tables", choices=ENGRAM_TABLE_MODES, default="replicated",
                        help="Engram tables replicated on every device, or their rows sharded over a run's ranks "
                             "(parallel.engram_tables of every run; the memory estimate follows)")


def flat(groups: Optional[Sequence[Sequence[float]]]) -> Optional[list[float]]:
    """The values of a ``nargs='+'`` list option whose items are lists (``--rho 1,0.8 0.6``)."""
    return None if groups is None else [v for g in groups for v in g]


def _human(n: float) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


COLUMNS = ["rho", "rho_eff", "experts", "P_tot", "P_act", "P_act err", "tables", "eng_dim", "FLOPs/tok", "drift",
           "tokens", "steps", "last", "tok/P_act", "tok/P_tot", "lookups/row", "C planned", "C err", "GPU-h",
           "wall-h", "GiB/GPU", "fits"]


def _run_row(run, res) -> list[str]:
    """One plan-table row (COLUMNS): counts, the per-point figures and the cost estimates of a run."""
    eng = run.model["engram"]
    lookups = run.lookups_per_row
    return [f"{run.rho:g}", f"{run.rho_effective:.3f}", str(run.n_routed_experts), _human(run.total_params),
            _human(run.active_params), f"{run.active_params_error:+.2%}", _human(run.engram_params),
            "-" if eng is None else str(eng["embed_dim_per_ngram"] * (eng["max_ngram"] - 1)),
            f"{run.flops_per_token:.4g}", f"{run.flops_drift:+.2%}", _human(run.train_tokens), str(run.steps),
            str(run.last_step_sequences), f"{run.tokens_per_active_param:.3g}",
            f"{run.tokens_per_total_param:.3g}", "-" if lookups is None else f"{lookups:.3g}",
            f"{run.train_flops:.5g}", f"{run.train_flops_error:+.3%}", f"{res.gpu_hours:.4g}",
            f"{res.wall_hours:.3g}", f"{res.total_gib:.1f}", "yes" if res.fits else "NO"]


def _spread(errors) -> str:
    """'-0.012% .. +0.020%': the range of relative errors over the runs."""
    errors = list(errors)
    return f"{min(errors):+.3%} .. {max(errors):+.3%}"


def format_plan(plan) -> str:
    """The plan as a readable table with its cost estimates, reference errors and warnings."""
    fam, bb, hw = plan.family, plan.backbone, plan.hardware
    m = bb.model
    head = [
        f"family {fam.name}: budget {plan.budget:.3g} training FLOPs, rung {bb.name} "
        f"(d_model {m['d_model']}, {m['n_layers']} layers, {m['n_heads']} heads, expert_hidden "
        f"{m['moe']['expert_hidden']}, top-{bb.top_k} of {bb.n_routed} routed + "
        f"{m['moe']['n_shared_experts']} shared, seq {fam.seq_len}, vocab {fam.vocab_size:,})",
        f"rule: {fam.budget_rule.tokens_per_active_param:g} tokens per active param (rho=1 gets "
        f"{bb.tokens_per_active_param(plan.budget):.3g}); sparsity target P_tot/P_act {fam.sparsity:g} "
        f"(rho=1: {bb.measured.total / bb.measured.active:.3f})",
        f"estimates: {hw.n_gpus} x {hw.name} ({hw.peak_tflops:g} TFLOP/s peak, MFU {hw.mfu:g}, "
        f"{hw.gpu_mem_gib:g} GiB), ZeRO-{plan.runs[0].train.get('zero_stage', 0)}, "
        f"{plan.runs[0].train.get('precision', 'fp32')}, expert-parallel {plan.ep_size}, Engram tables "
        f"{plan.engram_tables}",
        "",
    ]
    rows = [_run_row(run, res) for run, res in zip(plan.runs, plan.resources)]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]
    lines = head + ["  ".join(c.rjust(w) for c, w in zip(COLUMNS, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows]
    lines.append("")
    tol = fam.tolerances
    lines.append(f"P_tot spread over rho: {max(abs(r.total_params_error) for r in plan.runs):.3%} (tolerance "
                 f"{tol.total_params:.1%}); P_act vs rho=1: {_spread(r.active_params_error for r in plan.runs)} "
                 f"({tol.active_params:.1%}; charged: tables and tokens pay for it); training FLOPs vs budget: "
                 f"{_spread(r.train_flops_error for r in plan.runs)} ({tol.train_flops:.2%}); active FLOPs/token "
                 f"drift: {plan.max_flops_drift:.3%} ({tol.flops_drift:.1%}; tokens solved per rho to the "
                 f"sequence, so every run spends the budget)")
    for run in plan.runs:
        if run.engram_dim_reduced_from is not None:
            lines.append(f"rho={run.rho:g}: Engram memory narrowed from {run.engram_dim_reduced_from} to "
                         f"{run.model['engram']['embed_dim_per_ngram']} dims per order to keep the drift in tolerance")
    refs = [(run, plan.reference_errors(run)) for run in plan.runs]
    refs = [(run, r) for run, r in refs if r]
    if refs:
        lines.append("published points (relative error of this plan):")
        for run, r in refs:
            parts = [f"{k} {v['ours']:.4g} vs {v['published']:.4g} ({v['rel_error']:+.2%})" for k, v in r.items()]
            lines.append(f"  rho={run.rho:g}: " + "; ".join(parts))
    for w in plan.warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sweeps.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, required=True, help="training FLOPs per run, e.g. 2e20")
    p.add_argument("--family", default="auto",
                   help="family name (conf/family/NAME.yaml), a YAML path, or auto (the family whose range holds --budget)")
    add_rho_argument(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print a JSON array, one object per rho")
    out.add_argument("--configs", metavar="DIR",
                     help="also write each run's resolved trainer config to DIR/<run>/config.yaml and print the "
                          "train/main.py command that trains it")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel size that must divide every expert count")
    p.add_argument("--round-experts-to-ep", action="store_true",
                   help="round expert counts to multiples of --ep-size instead of failing")
    add_engram_tables_argument(p)
    p.add_argument("--data-dir", default=None, help="data.dir of the runs (default: the family's)")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2), default=None, help="train.zero_stage of the runs")
    p.add_argument("--n-gpus", type=int, default=None, help="devices per run for the estimates (hardware.n_gpus)")
    p.add_argument("--gpu-mem-gib", type=float, default=None, help="memory per device (GiB)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak TFLOP/s per device")
    p.add_argument("--mfu", type=float, default=None, help="model FLOPs utilisation for the device-hours")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from sweeps.planning.autofamily import resolve_family
        from sweeps.planning.budget import solve_plan
        from sweeps.planning.families import load_family

        name, picked = resolve_family(args.family, [args.budget])
        if picked:
            print(picked)
        family = load_family(name)
        if args.zero_stage is not None:
            family = family.with_train(zero_stage=args.zero_stage)
        family = family.with_hardware(n_gpus=args.n_gpus, gpu_mem_gib=args.gpu_mem_gib,
                                      peak_tflops=args.peak_tflops, mfu=args.mfu)
        plan = solve_plan(family, args.budget, flat(args.rho), ep_size=args.ep_size,
                          round_experts_to_ep=args.round_experts_to_ep, data_dir=args.data_dir,
                          engram_tables=args.engram_tables)
    except ValueError as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(plan.to_list(), indent=2))
        for w in plan.warnings:
            print(f"warning: {w}", file=sys.stderr)
    else:
        print(format_plan(plan))
    if args.configs:
        write_configs(plan.runs, Path(args.configs))
    return 0


def write_configs(runs, root: Path) -> None:
    """Each run's resolved trainer config in ``root/<run name>/config.yaml``, and the command that trains it."""
    from rundir.config import trainer_args, write_run_config
    from sweeps.planning.runconfig import TRAIN_SCRIPT, hydra_block, resolve_run_config

    for run in runs:
        run_dir = (root / run.name).resolve()
        write_run_config(run_dir, resolve_run_config(run.config(), own={"run_dir": str(run_dir)}), hydra_block())
        print(shlex.join(["python", TRAIN_SCRIPT, *trainer_args(run_dir)]))


if __name__ == "__main__":
    sys.exit(main())
