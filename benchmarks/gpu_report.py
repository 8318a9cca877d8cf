"""The short table of the GPU check: reads the JSON files ``gpu_check.sh`` wrote and prints Markdown
(ready for ``benchmarks/README.md``), each figure beside the issue's goal for it.

    python benchmarks/gpu_report.py OUT_DIR [--device-name "NVIDIA H200"]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path


def _load(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def rows_moe(d, _all) -> list[str]:
    return [f"| MoE layer / dense SwiGLU of equal active FLOPs, {r['size']} ({r['impl']}; fwd+bwd, fwd) | "
            f"{r['ratio_fwd_bwd']:.2f}, {r['ratio_fwd']:.2f} | lower is better |" for r in d["results"]]


def rows_engram(d, _all) -> list[str]:
    h, s = d["hashing"], d["step"]
    return [f"| hashing: ours vs the reference demo's numpy, per call (per step: the demo re-hashes in each "
            f"Engram layer) | {h['speedup']:.0f}x ({h['reference_per_step_speedup']:.0f}x; {h['ours_Mtok_s']:.0f} "
            f"Mtok/s) | >= 100x |",
            f"| one Engram layer, d {s['d_model']} x {s['n_layers']} layers, {s.get('dtype', 'fp32')}: step-time overhead | "
            f"{100 * s['overhead']:+.1f}% (FLOPs {100 * s['flops_overhead']:+.1f}%) | |"]


def _mfu(c) -> str:
    sheet = c.get("mfu_datasheet")
    return f"{c['mfu']:.1%}" + (f" ({sheet:.1%} of the datasheet peak)" if sheet else "")


def rows_train(d, _all) -> list[str]:
    out = [f"| measured peak ({d['peak_how']}) | {d['peak_flops'] / 1e12:.3g} TFLOP/s | |"]
    for c in d["cases"]:
        ratio = "-" if c.get("ratio") is None else f"{c['ratio']:.3f}"
        out.append(f"| {c['label']}: tokens/s, framework / bare loop | {c['framework_tokens_per_s']:,.0f}, "
                   f"{ratio} | >= 0.95 |")
        out.append(f"| {c['label']}: MFU vs measured peak ({c['flop_convention']}) | {_mfu(c)} | >= 45% at rho 0.75 |")
    if "engram_step_time_ratio" in d:
        out.append(f"| Engram overhead: step time rho 0.75 / rho 1 (per FLOP) | "
                   f"{d['engram_step_time_ratio']:.3f} ({d['engram_time_per_flop_ratio']:.3f}) | <= 1.02 |")
    return out


def rows_train_compiled(d, everything) -> list[str]:
    """The same cases with train.compile=blocks, framework only: the speed-up is over the eager run's
    framework (bench_train.json), when it ran."""
    eager = {c["label"]: c for c in (everything.get("bench_train.json") or {}).get("cases", [])}
    out = []
    for c in d["cases"]:
        e = eager.get(c["label"])
        gain = f", {c['framework_tokens_per_s'] / e['framework_tokens_per_s']:.3f}x eager" if e else ""
        out.append(f"| {c['label']}, train.compile=blocks: tokens/s, MFU | {c['framework_tokens_per_s']:,.0f}{gain}, "
                   f"{_mfu(c)} | decides train.compile=auto |")
    return out


def rows_tables(d, _all) -> list[str]:
    """Sharded vs replicated Engram tables (bench_tables.py) at the check's world size."""
    return [f"| {c['label']}: step time sharded / replicated tables, {d['world_size']} rank(s) | "
            f"{c['step_time_ratio']:.3f} ({1e3 * c['sharded']['step_s']:.0f} vs {1e3 * c['replicated']['step_s']:.0f} ms)"
            f" | |" for c in d["cases"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--device-name", default=None)
    p.add_argument("--optional", action="append", default=[], metavar="FILE",
                   help="a JSON file whose absence is no failure (the CPU check does not compile)")
    p.add_argument("--note", action="append", default=[], help="a line under the table (the parity tests' summary)")
    a = p.parse_args(argv)
    parts = {"bench_moe.json": rows_moe, "bench_engram.json": rows_engram, "bench_train.json": rows_train,
             "bench_train_compiled.json": rows_train_compiled, "bench_tables.json": rows_tables}
    lines = [f"GPU check {dt.date.today().isoformat()}" + (f" on {a.device_name}" if a.device_name else ""),
             "", "| figure | measured | goal |", "|---|---|---|"]
    found = {name: _load(a.out / name) for name in parts}
    missing = [name for name, d in found.items() if d is None and name not in a.optional]
    for name, rows in parts.items():
        if found[name] is not None:
            lines += rows(found[name], found)
    if missing:
        lines.append(f"\nnot measured (step failed or skipped): {', '.join(missing)}")
    lines += [f"\n{note}" for note in a.note]
    text = "\n".join(lines)
    print(text)
    (a.out / "gpu_check.md").write_text(text + "\n")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
