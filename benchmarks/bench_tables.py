"""Step time of sharded vs replicated Engram tables through the real trainer, side by side in one run.

Launched plainly for one rank, or under torchrun for N (gloo on CPU, NCCL on GPUs):

    torchrun --nproc_per_node 2 benchmarks/bench_tables.py --experiment engram_25pct        # CPU, 2 ranks
    python benchmarks/bench_tables.py --family gpu --budget 3e17 --rho 0.75 --device cuda \\
        --set train.grad_clip=0                                                              # one GPU, NCCL

Each case trains ``parallel.engram_tables=replicated`` and ``=sharded`` alternately ``--repeats`` times
(2N optimizer steps, the last N timed: bench_train.py's window, no evaluation or checkpoint inside it) and
keeps each side's best window. It prints both step times, the ratio sharded / replicated, and each side's
per-rank table parameters and table Adam state as the trainer's start-up line reports them (final.json's
memory record). Sharded tables clip on the global norm themselves, which needs fp32 ZeRO 0; in bf16 pass
``--set train.grad_clip=0`` (both sides get it: they differ only in where the table rows live).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import add_case_args, case_config, framework_tokens_per_s, start  # noqa: E402

MODES = ("replicated", "sharded")
MiB = 2.0 ** 20


def run_side(label: str, mode: str, overrides: list[str], run_config, steps: int, dist, workdir: Path) -> dict:
    """One trainer run of ``mode``: its timed window's tokens/s and its memory record."""
    run_dir = workdir / f"{label}-{mode}"
    cfg = case_config(run_dir, [*overrides, f"parallel.engram_tables={mode}"], run_config, steps, dist)
    tps = framework_tokens_per_s(cfg, dist)
    memory = json.loads((run_dir / "final.json").read_text()).get("memory", {})
    return {"tokens_per_s": tps, "step_s": cfg.train.global_batch_size * cfg.train.seq_len / tps,
            "table_params_per_rank": int(memory.get("table_params", 0)),
            "table_optimizer_bytes_per_rank": int(memory.get("table_optimizer_state_bytes", 0))}


def run_case(label: str, overrides: list[str], run_config, steps: int, repeats: int, dist, workdir: Path) -> dict:
    best: dict[str, dict] = {}
    for i in range(repeats):
        for mode in MODES:
            got = run_side(f"{label}-{i}", mode, overrides, run_config, steps, dist, workdir)
            if mode not in best or got["step_s"] < best[mode]["step_s"]:
                best[mode] = got
    return {"label": label, **{m: best[m] for m in MODES},
            "step_time_ratio": best["sharded"]["step_s"] / best["replicated"]["step_s"]}


def report(cases: list[dict], dist) -> None:
    print(f"device {dist.device}, {dist.world_size} rank(s), backend "
          f"{torch.distributed.get_backend() if torch.distributed.is_initialized() else 'none'}")
    print(f"{'case':<26} {'replicated ms':>14} {'sharded ms':>11} {'ratio':>6} {'tables/rank rep':>16} "
          f"{'sharded':>10} {'Adam MiB rep':>13} {'sharded':>8}")
    for c in cases:
        r, s = c["replicated"], c["sharded"]
        print(f"{c['label']:<26} {1e3 * r['step_s']:>14.1f} {1e3 * s['step_s']:>11.1f} {c['step_time_ratio']:>6.3f} "
              f"{r['table_params_per_rank']:>16,} {s['table_params_per_rank']:>10,} "
              f"{r['table_optimizer_bytes_per_rank'] / MiB:>13.2f} {s['table_optimizer_bytes_per_rank'] / MiB:>8.2f}")
    print("ratio: sharded / replicated step time (best of the repeats, N steps after N warm-up steps)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_case_args(p, [0.75], 10, 2, "alternate replicated / sharded this often, keep each best")
    args = p.parse_args(argv)
    dist, cases = start(p, args)
    with tempfile.TemporaryDirectory(prefix="bench_tables_") as tmp:
        shared = [tmp]
        if dist.world_size > 1:  # one work directory for every rank: rank 0's
            torch.distributed.broadcast_object_list(shared, src=0)
        results = [run_case(label, [*ov, *args.set], rc, args.steps, args.repeats, dist, Path(shared[0]))
                   for label, ov, rc in cases]
        if dist.world_size > 1:
            torch.distributed.barrier()
    if dist.is_main:
        report(results, dist)
        if args.json:
            args.json.write_text(json.dumps({"world_size": dist.world_size, "device": str(dist.device),
                                             "cases": results}, indent=2))
    from train.distributed import teardown

    teardown()
    return 0 if all(math.isfinite(c["step_time_ratio"]) for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
