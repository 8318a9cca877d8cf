"""MoE layer throughput relative to a dense SwiGLU layer with the same active FLOPs.

For each size, the dense hidden width H is chosen so that 6*d*H equals the MoE layer's forward
FLOPs per token (shared + top-k routed experts + router), rounded to the nearest integer width.
Both layers are timed in the same run, interleaved (MoE, dense, MoE, dense, ...) on the same
inputs, over forward+backward (a training micro-step) and forward only; medians are reported.

    python benchmarks/bench_moe.py                        # CPU, fp32, all presets
    python benchmarks/bench_moe.py --device cuda --dtype bf16 --tokens 16384 --json moe_gpu.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.ffn import SwiGLU  # noqa: E402
from models.moe import MoEConfig, MoEFFN  # noqa: E402

# name: (d_model, n_routed, n_shared, top_k, expert_hidden)
PRESETS = {
    "tiny": (128, 16, 1, 3, 88),  # conf/model/moe.yaml
    "small": (256, 32, 1, 4, 128),
    "medium": (512, 64, 2, 6, 256),  # the paper's shape of routing: 2 shared + top-6, fine-grained
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matched_dense_hidden(moe: MoEFFN) -> int:
    return max(1, round(moe.counts(1).flops_per_token / (6 * moe.d_model)))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(module: torch.nn.Module, x: torch.Tensor, gy: torch.Tensor, backward: bool) -> float:
    sync(x.device)
    t0 = time.perf_counter()
    if backward:
        module(x).backward(gy)
    else:
        with torch.no_grad():
            module(x)
    sync(x.device)
    return time.perf_counter() - t0


def bench_size(name: str, shape, args, device: torch.device, dtype: torch.dtype) -> dict:
    d, n_routed, n_shared, top_k, hidden = shape
    cfg = MoEConfig(n_routed_experts=n_routed, n_shared_experts=n_shared, top_k=top_k, expert_hidden=hidden,
                    n_dense_layers=0, balance="aux_free", impl=args.impl)
    torch.manual_seed(0)
    moe = MoEFFN(cfg, d, layer_id=0).to(device=device, dtype=dtype)
    dense_hidden = matched_dense_hidden(moe)
    dense = SwiGLU(d, dense_hidden).to(device=device, dtype=dtype)
    x = torch.randn(1, args.tokens, d, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(1, args.tokens, d, device=device, dtype=dtype)
    impl = moe.experts.resolve_impl(cfg.impl, x.reshape(-1, d))

    results = {}
    for backward in (True, False):
        times = {"moe": [], "dense": []}
        for it in range(args.warmup + args.iters):
            for label, module in (("moe", moe), ("dense", dense)):
                dt = time_once(module, x, gy, backward)
                if it >= args.warmup:
                    times[label].append(dt)
            x.grad = None
            moe.zero_grad(set_to_none=True)
            dense.zero_grad(set_to_none=True)
        results[backward] = {k: statistics.median(v) for k, v in times.items()}
    moe.on_optimizer_step()  # routing imbalance over all timed training forwards (router at init)
    imbalance = moe.metrics().get("moe/layer0/load_max_over_mean", float("nan"))

    c = moe.counts(args.tokens)
    print(f"[{name}] d={d} routed={n_routed} shared={n_shared} top_k={top_k} expert_hidden={hidden} "
          f"impl={impl} tokens={args.tokens} | MoE {c.flops_per_token / 1e6:.3f} MFLOP/tok "
          f"({c.active_params / 1e6:.3f}M active / {c.total_params / 1e6:.3f}M total params), dense hidden "
          f"{dense_hidden}: {dense.counts(args.tokens).flops_per_token / 1e6:.3f} MFLOP/tok | "
          f"load max/mean {imbalance:.2f}")
    for backward, label in ((True, "fwd+bwd"), (False, "fwd")):
        r = results[backward]
        print(f"  {label:8s} moe {r['moe'] * 1e3:8.2f} ms ({args.tokens / r['moe']:10.0f} tok/s)   "
              f"dense {r['dense'] * 1e3:8.2f} ms ({args.tokens / r['dense']:10.0f} tok/s)")
    ratio_train = results[True]["moe"] / results[True]["dense"]
    ratio_fwd = results[False]["moe"] / results[False]["dense"]
    print(f"  moe/dense time ratio at equal active FLOPs: {ratio_train:.2f} (fwd+bwd), {ratio_fwd:.2f} (fwd)")
    return {"size": name, "d_model": d, "n_routed": n_routed, "n_shared": n_shared, "top_k": top_k,
            "expert_hidden": hidden, "dense_hidden": dense_hidden, "impl": impl, "tokens": args.tokens,
            "moe_flops_per_token": c.flops_per_token,
            "dense_flops_per_token": dense.counts(args.tokens).flops_per_token,
            "load_max_over_mean": imbalance,
            "moe_s": {"fwd_bwd": results[True]["moe"], "fwd": results[False]["moe"]},
            "dense_s": {"fwd_bwd": results[True]["dense"], "fwd": results[False]["dense"]},
            "ratio_fwd_bwd": ratio_train, "ratio_fwd": ratio_fwd}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--impl", choices=["auto", "grouped_mm", "batched"], default="auto")
    p.add_argument("--sizes", nargs="+", choices=sorted(PRESETS), default=list(PRESETS))
    p.add_argument("--tokens", type=int, default=None, help="tokens per call (default 2048 cpu, 16384 cuda)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.tokens is None:
        args.tokens = 16384 if device.type == "cuda" else 2048
    if args.tokens <= 0 or args.iters <= 0 or args.warmup < 0:
        p.error("--tokens and --iters must be positive, --warmup >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"torch {torch.__version__} on {where}, {dtype}, median of {args.iters} (after {args.warmup} warm-up)")
    rows = [bench_size(name, PRESETS[name], args, device, dtype) for name in args.sizes]
    if args.json is not None:
        meta = {"torch": torch.__version__, "device": where, "dtype": str(dtype), "iters": args.iters}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
