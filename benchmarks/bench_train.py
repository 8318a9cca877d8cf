"""End-to-end training throughput through the real trainer, side by side with a bare torch loop.

For each case (a shipped experiment, or the rho = 1 and rho = 0.75 runs of one plan) this runs, in
one process and one after the other on the same device:

* the framework: ``train.trainer.train`` (DeepSpeed engine, checkpoint/eval machinery, metrics) for
  2N optimizer steps, logging every N, so the last logged window is N steps after N warm-up steps;
  its ``train/tokens_per_s`` is the framework's throughput (evaluation and checkpoints are set
  beyond the run, so none fall in the window);
* the bare loop: the same model class, initial weights, batches, optimizer, learning-rate schedule,
  gradient accumulation and clipping in a plain ``for`` loop, timed over the same N steps after the
  same N warm-up steps. In bf16 the bare loop keeps fp32 weights under ``torch.autocast`` (DeepSpeed
  keeps bf16 weights with fp32 master copies): the ratio then also measures that difference.

It prints the measured peak (the device's dense matmul rate: bf16 on a GPU, fp32 on a CPU), tokens/s
of both, the ratio framework / bare, MFU from the model's own training FLOPs per token (the causal
attention convention when the model reports it) against the measured peak and, on a known GPU, against
its datasheet peak (what the trainer's ``perf/mfu`` and the plan's estimates use: on an H200 the
measured bf16 rate is about 0.8 of it) and, for a plan, the step-time ratio of the rho = 0.75 model to
the rho = 1 model (Engram's overhead at equal budget). ``--no-bare`` times the framework alone (a
compiled row, read against an eager run's bare loop). The trainer's final checkpoint, outside the
window, is not written (gigabytes per run at the gpu family's sizes).

    python benchmarks/bench_train.py --experiment moe_baseline --experiment engram_25pct   # CPU ratios
    python benchmarks/bench_train.py --family gpu --budget 3e17 --device cuda --steps 20   # GPU
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CONF = REPO / "conf"


# ---- device peak -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_peak(device: torch.device, n: Optional[int] = None, iters: int = 50) -> tuple[float, str]:
    """Dense matmul FLOP/s on ``device`` (mean of ``iters`` products after 3 warm-ups): bf16 on a
    GPU (the tensor-core rate MFU is read against), fp32 on a CPU (what the CPU runs train in)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    sync(device)
    dt = (time.perf_counter() - t0) / iters
    return 2.0 * n ** 3 / dt, f"{str(dtype).removeprefix('torch.')} {n}^3 matmul"


# ---- configurations --------------------------------------------------------------------------------
def compose(overrides: list[str], config_dir: Path = CONF):
    """The trainer's config for these overrides, exactly as ``train/main.py`` composes it (from conf/, or from
    a run's own config.yaml in ``config_dir``)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rundir.schema import register

    register()  # conf/config.yaml starts from the schema in Hydra's ConfigStore
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def plan_cases(family: str, budget: float, rhos: list[float]) -> list[tuple[str, list[str], Optional[dict]]]:
    """(label, overrides, run config) of the plan's runs: the config.yaml a sweep would write for each."""
    from sweeps.planning.budget import solve_plan
    from sweeps.planning.families import load_family

    plan = solve_plan(load_family(family), budget, rhos)
    from sweeps.planning.runconfig import resolve_run_config

    return [(f"{family}-{budget:g}-rho{spec.rho:g}", [], resolve_run_config(spec.config(include_name=False)))
            for spec in plan.runs]


def bench_overrides(run_dir: Path, steps: int, device: torch.device) -> list[str]:
    """Settings that make the trainer's last logged window exactly ``steps`` steps of pure training."""
    extra = [f"run_dir={run_dir}", f"train.max_steps={2 * steps}", "train.train_tokens=null",
             f"train.log_interval={steps}", f"train.eval_interval={10 ** 9}", f"train.ckpt_interval={10 ** 9}",
             "train.progress=false", "logging.wandb.mode=disabled", "train.resume=never",
             "train.eval_tokens=${train.seq_len}"]  # the final evaluation is outside the window: one sequence
    if device.type == "cpu":
        extra.append("train.precision=fp32")  # bf16 on CPU is emulated: not what a CPU study runs
    return extra


# ---- the two loops ---------------------------------------------------------------------------------
@contextmanager
def no_final_checkpoint():
    """The trainer without its checkpoint writes (the only one a benchmark run reaches is the final one,
    after the timed window): at the gpu family's sizes each is gigabytes, written and fsynced."""
    from train.loop import Loop

    save = Loop.save
    Loop.save = lambda self, step: self.check_diverged()
    try:
        yield
    finally:
        Loop.save = save


def release(device: torch.device) -> None:
    """Between timed runs in one process: the last run's engine (a reference cycle with its optimizer) and
    compiled graphs go, so a run neither starts on its predecessor's memory nor inherits its compile cache."""
    gc.collect()
    if "torch._dynamo" in sys.modules:  # something compiled (importing dynamo to reset nothing costs a second)
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def framework_tokens_per_s(cfg, dist) -> float:
    from train.trainer import train

    release(dist.device)
    with no_final_checkpoint():
        train(cfg, dist)
    from rundir.files import METRICS

    records = [json.loads(line) for line in (Path(cfg.run_dir) / METRICS).read_text().splitlines()]
    windows = [r for r in records if "train/tokens_per_s" in r]
    if not windows or windows[-1]["step"] != cfg.train.max_steps:
        raise RuntimeError(f"no timed window at the last step in {cfg.run_dir}/{METRICS}")
    return float(windows[-1]["train/tokens_per_s"])


def _model_config(cfg):
    """The trainer's model config for ``cfg`` and its training split."""
    from data_prep.reader import open_split
    from train.trainer import resolve_model_config

    split = open_split(Path(cfg.data.dir), "train")
    return resolve_model_config(cfg, Path(cfg.data.dir), split.vocab_size), split


def model_counts(cfg):
    """The model's parameter and FLOP counts (shapes only: built on the meta device, no weights)."""
    from assembly import build_model

    with torch.device("meta"):
        return build_model(_model_config(cfg)[0]).model_counts(cfg.train.seq_len)


def _bare_setup(cfg, device: torch.device):
    from assembly import build_model
    from train.data import TrainBatches
    from train.optim import build_optimizer
    from rundir.schema import check

    t = cfg.train
    mcfg, split = _model_config(cfg)
    torch.manual_seed(t.seed)
    model = build_model(mcfg).to(device)
    optimizer = build_optimizer(model, check(cfg).optim)
    batches = TrainBatches(split, t.seq_len, t.micro_batch_size, t.global_batch_size, 0, 1, t.seed)
    return model, optimizer, batches


def bare_tokens_per_s(cfg, device: torch.device, steps: int) -> float:
    """Tokens/s of a plain loop over the trainer's model, batches and optimizer (one process)."""
    from train.optim import set_lr
    from train.schedule import lr_factor

    t, o = cfg.train, cfg.optim
    release(device)
    model, optimizer, batches = _bare_setup(cfg, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16")
    total = 2 * steps
    t0 = None
    for step in range(total):
        if step == steps:
            sync(device)
            t0 = time.perf_counter()
        set_lr(optimizer, float(o.lr), lr_factor(step, total, o.schedule, o.warmup_steps, o.min_lr_ratio,
                                                 o.get("decay_frac", 0.2)))
        for micro in range(batches.accum_steps):
            x, y = batches.get(step, micro)
            with autocast:
                out = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            (out.loss / batches.accum_steps).backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(t.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.on_optimizer_step()
    sync(device)
    dt = time.perf_counter() - t0
    return steps * t.global_batch_size * t.seq_len / dt


# ---- one case --------------------------------------------------------------------------------------
@dataclass
class CaseResult:
    label: str
    tokens_per_step: int
    framework_tokens_per_s: float
    bare_tokens_per_s: Optional[float]  # None: --no-bare
    ratio: Optional[float]  # framework / bare
    train_flops_per_token: float
    flop_convention: str
    mfu: float  # framework, against the measured peak
    mfu_datasheet: Optional[float]  # framework, against the device's datasheet peak (train/hardware.py), if known
    active_params: int
    total_params: int


def train_flops_per_token(counts) -> tuple[float, str]:
    """Training FLOPs per token from the model's counts: causal attention when the model names it."""
    causal = getattr(counts, "train_flops_per_token_causal", None)
    if causal:
        return float(causal), "causal"
    return float(counts.train_flops_per_token), "full T x T attention"


def case_config(run_dir: Path, overrides: list[str], run_config: Optional[dict], steps: int, dist):
    """The trainer config of one timed run in ``run_dir`` (rank 0 creates it; a planned run gets its own
    config.yaml, as the sweep launches it), every rank composing it once the directory is there."""
    if dist.is_main:
        run_dir.mkdir(parents=True)  # Hydra's job creates it under train/main.py
        if run_config is not None:
            from rundir.config import write_run_config
            from sweeps.planning.runconfig import hydra_block

            write_run_config(run_dir, run_config, hydra_block())
    if dist.world_size > 1:
        torch.distributed.barrier()
    return compose([*overrides, *bench_overrides(run_dir, steps, dist.device)],
                   run_dir if run_config is not None else CONF)


def run_case(label: str, overrides: list[str], steps: int, dist, peak: float, workdir: Path,
             repeats: int = 1, run_config: Optional[dict] = None, bare_loop: bool = True) -> CaseResult:
    """Framework and bare loop alternately ``repeats`` times; each side keeps its best window (on a
    shared machine the slowest windows measure the neighbours, not the code)."""
    from train.hardware import peak_flops

    fw, bare, cfg = 0.0, 0.0, None
    for i in range(repeats):
        cfg = case_config(workdir / f"{label}-{i}", overrides, run_config, steps, dist)
        fw = max(fw, framework_tokens_per_s(cfg, dist))
        if bare_loop:
            bare = max(bare, bare_tokens_per_s(cfg, dist.device, steps))
    counts = model_counts(cfg)
    fpt, convention = train_flops_per_token(counts)
    sheet = peak_flops(dist.device, None) if dist.device.type == "cuda" else None
    return CaseResult(label=label, tokens_per_step=int(cfg.train.global_batch_size * cfg.train.seq_len),
                      framework_tokens_per_s=fw, bare_tokens_per_s=bare if bare_loop else None,
                      ratio=fw / bare if bare_loop else None, train_flops_per_token=fpt, flop_convention=convention,
                      mfu=fpt * fw / peak, mfu_datasheet=fpt * fw / sheet if sheet else None,
                      active_params=int(counts.active_params), total_params=int(counts.total_params))


def report(results: list[CaseResult], peak: float, peak_how: str, device: torch.device, plan: bool) -> dict:
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads); measured peak {peak / 1e12:.3g} TFLOP/s ({peak_how})")
    print(f"{'case':<28} {'tok/step':>9} {'framework tok/s':>16} {'bare tok/s':>11} {'fw/bare':>8} {'MFU':>7} "
          f"{'MFU sheet':>9}")
    for r in results:
        bare = "-" if r.bare_tokens_per_s is None else f"{r.bare_tokens_per_s:,.0f}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.3f}"
        sheet = "-" if r.mfu_datasheet is None else f"{r.mfu_datasheet:.1%}"
        print(f"{r.label:<28} {r.tokens_per_step:>9,} {r.framework_tokens_per_s:>16,.0f} {bare:>11} {ratio:>8} "
              f"{r.mfu:>7.1%} {sheet:>9}")
    out = {"device": str(device), "peak_flops": peak, "peak_how": peak_how, "cases": [asdict(r) for r in results]}
    if plan and len(results) == 2:
        base, engram = results
        step_ratio = base.framework_tokens_per_s / engram.framework_tokens_per_s
        per_flop = step_ratio * base.train_flops_per_token / engram.train_flops_per_token
        print(f"Engram overhead: step time {engram.label} / {base.label} = {step_ratio:.3f} "
              f"(per training FLOP: {per_flop:.3f})")
        out["engram_step_time_ratio"] = step_ratio
        out["engram_time_per_flop_ratio"] = per_flop
    print(f"MFU uses {results[0].flop_convention} FLOPs per token, against the measured peak (MFU sheet: the "
          f"datasheet's); window: N steps after N warm-up steps")
    return out


def add_case_args(p: argparse.ArgumentParser, rho: list, steps: int, repeats: int, repeats_help: str) -> None:
    """The options bench_train.py and bench_tables.py share: which cases, on which device, what window."""
    from sweeps.plan import numbers_arg

    p.add_argument("--experiment", action="append", default=[], help="a conf/experiment name (repeatable)")
    p.add_argument("--family", help="plan a family's runs at --budget instead")
    p.add_argument("--budget", type=float)
    p.add_argument("--rho", type=numbers_arg, nargs="+", default=[rho],
                   help="with --family: the rho values, space- or comma-separated (bench_train: first is the baseline)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: cuda if visible")
    p.add_argument("--steps", type=int, default=steps, help="timed optimizer steps (after as many warm-up steps)")
    p.add_argument("--repeats", type=int, default=repeats, help=repeats_help)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: one on a CPU, the cpu family's setting; on a GPU up to 16, "
                        "for the host-side model builds)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra trainer override")
    p.add_argument("--json", type=Path, help="also write the numbers to this file")


def start(p: argparse.ArgumentParser, args: argparse.Namespace):
    """Checks the case options, pins the device and starts the process group: (dist, [(label, overrides,
    run config or None)])."""
    from sweeps.plan import flat

    if bool(args.family) == bool(args.experiment) or (args.family and args.budget is None):
        p.error("give --experiment NAME (repeatable) or --family F --budget C")
    if args.device == "cpu":  # before anything asks CUDA: the trainer takes a GPU whenever it sees one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    elif args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.chdir(REPO)  # data.dir and run paths in the configs are relative to the checkout
    gpu = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    torch.set_num_threads(args.threads or (min(16, os.cpu_count() or 1) if gpu else 1))
    from train.distributed import setup

    cases = (plan_cases(args.family, args.budget, flat(args.rho)) if args.family
             else [(name, [f"+experiment={name}"], None) for name in args.experiment])
    return setup(), cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(p, [1.0, 0.75], 20, 1, "alternate framework / bare this often, keep each best")
    p.add_argument("--no-bare", action="store_true", help="time the framework only (no bare loop, no fw/bare)")
    p.add_argument("--compile-too", action="store_true",
                   help="also run every case with train.compile=blocks (the bare loop stays eager, so fw/bare of the "
                        "compiled row is the speed-up over eager PyTorch)")
    args = p.parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # its bare loop and MFU are one device's
        p.error("bench_train.py measures one process: run it without torchrun (bench_tables.py takes N ranks)")
    dist, cases = start(p, args)
    if args.compile_too:
        cases = [c for label, ov, rc in cases
                 for c in ((label, ov, rc), (f"{label}+compile", [*ov, "train.compile=blocks"], rc))]
    peak, peak_how = measure_peak(dist.device)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        results = [run_case(label, [*ov, *args.set], args.steps, dist, peak, Path(tmp), args.repeats, run_config,
                            bare_loop=not args.no_bare) for label, ov, run_config in cases]
    out = report(results, peak, peak_how, dist.device, plan=bool(args.family) and not args.compile_too)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    from train.distributed import teardown

    teardown()
    return 0 if all(math.isfinite(r.ratio if r.ratio is not None else r.framework_tokens_per_s) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
