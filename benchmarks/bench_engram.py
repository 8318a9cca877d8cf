"""Engram benchmarks.

1. Hashing throughput: our indexer (compression lookup + n-gram hashing in torch, on the model's
   device) against the public reference demo's procedure (host numpy: ids to numpy, compress,
   hash every layer, back to a torch tensor on the device) on the same ids and machine. The demo
   repeats that whole call inside every Engram layer's forward; the ratio below is per call, so
   the demo's per-step cost is a further ``len(layer_ids)`` times higher.
2. Step-time overhead: one training step (forward, backward, AdamW) of a small backbone with an
   Engram layer against the same backbone without it.

    python benchmarks/bench_engram.py [--device cuda] [--tokens 32768] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from assembly import build_model, engram_tokenizer_file  # noqa: E402
from memory.compression import find_pad_id, load_compression  # noqa: E402
from memory.config import EngramConfig  # noqa: E402
from memory.hashing import NgramHasher  # noqa: E402
from memory.indexer import EngramIndexer  # noqa: E402
from memory.reference import reference_hash_ids  # noqa: E402
from models import ModelConfig  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_time(fn, device, repeats: int, warmup: int = 2) -> float:
    """Best of ``repeats`` runs. On CPU this is process CPU time, which other jobs sharing the
    machine disturb far less than wall time; on an accelerator it is synchronised wall time."""
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        _sync(device)
        times.append(clock() - t0)
    return min(times)


def numpy_reference_hash(ids: torch.Tensor, lookup: np.ndarray, multipliers: dict, primes: dict,
                         pad_id: int, max_ngram: int) -> dict:
    """The demo's per-call procedure: host numpy compression and hashing, results back on the device."""
    hashed = reference_hash_ids(lookup[ids.cpu().numpy()], multipliers, primes, pad_id, max_ngram)
    return {layer: torch.from_numpy(h).to(ids.device) for layer, h in hashed.items()}


def bench_hashing(device: torch.device, tokens: int, seq_len: int, repeats: int) -> dict:
    deepseek = engram_tokenizer_file("deepseek")
    comp = load_compression(deepseek)
    pad = int(comp.lookup[find_pad_id(deepseek)])
    layers, max_ngram, heads = [1, 15], 3, 8
    hasher = NgramHasher(comp.num_canonical, max_ngram, heads, [129280 * 5] * 2, layers, pad, seed=0)
    indexer = EngramIndexer(comp.lookup, hasher).to(device)
    mult = {l: hasher.multipliers[i].numpy() for i, l in enumerate(layers)}
    B = max(1, tokens // seq_len)
    ids = torch.randint(0, comp.vocab_size, (B, seq_len), device=device)
    ours, ref = indexer(ids), numpy_reference_hash(ids, comp.lookup, mult, hasher.table_sizes, pad, max_ngram)
    for l in layers:
        if not torch.equal(ours[l], ref[l]):
            raise RuntimeError(f"hash ids differ from the numpy reference at layer {l}")
    with torch.no_grad():
        t_ours = _best_time(lambda: indexer(ids), device, repeats)
    t_ref = _best_time(lambda: numpy_reference_hash(ids, comp.lookup, mult, hasher.table_sizes, pad,
                                                      max_ngram), device, repeats)
    n = B * seq_len
    return {"tokens": n, "layers": len(layers), "heads_per_layer": hasher.n_heads,
            "compressed_vocab": comp.num_canonical, "ours_ms": 1e3 * t_ours, "reference_ms": 1e3 * t_ref,
            "ours_Mtok_s": n / t_ours / 1e6, "reference_Mtok_s": n / t_ref / 1e6, "speedup": t_ref / t_ours,
            "reference_per_step_speedup": len(layers) * t_ref / t_ours}


def bench_step(device: torch.device, batch: int, seq_len: int, d_model: int, n_layers: int,
               repeats: int, dtype: str = "fp32") -> dict:
    base = dict(vocab_size=8192, d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // 64),
                ffn_hidden=int(8 * d_model / 3) // 32 * 32, max_seq_len=seq_len)
    engram = EngramConfig(layer_ids=[1], max_ngram=3, heads_per_ngram=4, embed_dim_per_ngram=d_model // 2,
                          table_sizes=[4000, 4000])
    idx = torch.randint(0, 8192, (batch, seq_len + 1), device=device)
    steps, out = {}, {}
    for name, eng in (("without", None), ("with", engram)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(**base, engram=eng)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def fwd_bwd(model=model, opt=opt):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = model(idx[:, :-1], idx[:, 1:]).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()

        def step(fwd_bwd=fwd_bwd, opt=opt):
            fwd_bwd()
            opt.step()

        steps[name], steps[name + "_fwd_bwd"] = step, fwd_bwd
        counts = model.model_counts(seq_len)
        out[f"{name}_flops_per_token"] = counts.flops_per_token
        out[f"{name}_total_params"] = counts.total_params
    # Alternate the two models so that drifting machine load hits both alike.
    times = {name: [] for name in steps}
    for name, step in steps.items():
        _best_time(step, device, repeats=1, warmup=2)
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_best_time(step, device, repeats=1, warmup=0))
    for name, ts in times.items():
        out[f"{name}_ms"] = 1e3 * min(ts)
    out["overhead"] = out["with_ms"] / out["without_ms"] - 1.0
    out["fwd_bwd_overhead"] = out["with_fwd_bwd_ms"] / out["without_fwd_bwd_ms"] - 1.0
    out["flops_overhead"] = out["with_flops_per_token"] / out["without_flops_per_token"] - 1.0
    out.update(batch=batch, seq_len=seq_len, d_model=d_model, n_layers=n_layers, dtype=dtype)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=32768, help="tokens per hashing call")
    p.add_argument("--hash-seq-len", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1: like the single-threaded numpy reference)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                   help="the step's matmul dtype (bf16: fp32 weights under autocast, as a GPU trains)")
    p.add_argument("--json", default=None, help="also write the numbers to this file")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    clock = "process CPU time" if device.type == "cpu" else "wall time"
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
          f"(best of {a.repeats}, {clock})")

    h = bench_hashing(device, a.tokens, a.hash_seq_len, a.repeats)
    print(f"[hashing] {h['tokens']} tokens, {h['layers']} layers x {h['heads_per_layer']} heads, "
          f"compressed vocab {h['compressed_vocab']}")
    print(f"  ours (torch, on {device}):  {h['ours_ms']:8.2f} ms  {h['ours_Mtok_s']:7.2f} Mtok/s")
    print(f"  reference (host numpy):   {h['reference_ms']:8.2f} ms  {h['reference_Mtok_s']:7.2f} Mtok/s")
    print(f"  speedup per call: {h['speedup']:.2f}x  (per step, as the demo re-hashes in every Engram "
          f"layer: {h['reference_per_step_speedup']:.2f}x)")

    s = bench_step(device, a.batch, a.seq_len, a.d_model, a.n_layers, a.repeats, a.dtype)
    print(f"[step] batch {s['batch']} x {s['seq_len']}, d_model {s['d_model']}, {s['n_layers']} layers, "
          f"Engram at layer 1, {s['dtype']}")
    print(f"  without Engram: {s['without_ms']:8.2f} ms/step")
    print(f"  with Engram:    {s['with_ms']:8.2f} ms/step  -> overhead {100 * s['overhead']:+.1f}% "
          f"(counted FLOPs {100 * s['flops_overhead']:+.1f}%)")
    print(f"  forward+backward only: {s['without_fwd_bwd_ms']:.2f} -> {s['with_fwd_bwd_ms']:.2f} ms "
          f"({100 * s['fwd_bwd_overhead']:+.1f}%); Engram adds "
          f"{s['with_total_params'] - s['without_total_params']} parameters, mostly table rows")
    if a.json:
        Path(a.json).write_text(json.dumps({"device": str(device), "hashing": h, "step": s}, indent=2))
    if not (math.isfinite(h["speedup"]) and math.isfinite(s["overhead"])):
        raise SystemExit("benchmark produced non-finite numbers")


if __name__ == "__main__":
    main()
