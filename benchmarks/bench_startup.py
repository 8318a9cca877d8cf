"""Per-rank start-up cost against the number of ranks, over a synthetic 20 GB data dir.

The data dir is written in the real format (``ShardWriter``'s shard names, ``write_manifest``), with sparse
shards (all-zero ids, no disk blocks) so that 20 GB costs nothing to create. For each simulated world size
W (default 1, 8, 64) every rank's start-up is run in turn, in this one process (no torchrun: what is
measured is the per-rank work, not contention between ranks; the broadcast of rank 0's reads runs on two
real ranks in tests/integration/test_startup_ranks.py), as :func:`train.trainer.prepare` does it:

* rank 0 reads the manifest and verifies the shards (:func:`data_prep.verify.verify_data_dir`): the first
  start after a build hashes every shard (cold, once per manifest), a restart finds ``.verified.json``;
* every rank opens both splits without re-hashing (sizes only) and builds its batch index
  (:class:`train.data.TrainBatches` and its first step's window ids, computed lazily).

Before this change every rank hashed every shard and materialised an epoch permutation at every start; that
per-rank cost is printed beside (its verification part is the cold verification measured here, which
reads the same bytes, and its permutation is measured). The cold verification reads all 20 GB once (minutes
on a shared CPU); the restarts after it find the record it wrote.

    python benchmarks/bench_startup.py [--gb 20] [--worlds 1 8 64] [--seq-len 4096] [--dir /tmp/bench_startup]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.manifest import write_manifest  # noqa: E402
from data_prep.reader import load_manifest, open_split  # noqa: E402
from data_prep.shards import shard_file_name  # noqa: E402
from data_prep.verify import VERIFIED_NAME, verify_data_dir  # noqa: E402
from train.data import TrainBatches  # noqa: E402

DTYPE = np.dtype("<u2")


def _zero_sha256(n_bytes: int) -> str:
    h, block = hashlib.sha256(), bytes(min(n_bytes, 64 << 20))
    left = n_bytes
    while left:
        h.update(block[:min(left, len(block))])
        left -= min(left, len(block))
    return h.hexdigest()


def build(out: Path, gb: float, shard_gb: float) -> dict:
    """Sparse shards (ftruncate) of zero ids plus a manifest in the data_prep format; returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    shard_tokens = int(shard_gb * 1e9) // DTYPE.itemsize
    n_train = max(1, round(gb / shard_gb))
    sha = _zero_sha256(shard_tokens * DTYPE.itemsize)  # every shard holds the same zeros
    splits = {}
    for name, n in (("train", n_train), ("val", 1)):
        shards = []
        for i in range(n):
            path = out / shard_file_name(name, i)
            with open(path, "wb") as f:
                f.truncate(shard_tokens * DTYPE.itemsize)
            shards.append({"file": path.name, "n_tokens": shard_tokens, "sha256": sha})
        splits[name] = {"n_docs": n, "n_tokens": n * shard_tokens, "n_bytes": n * shard_tokens * 4, "shards": shards}
    manifest = {"version": 1, "source": {"kind": "synthetic-sparse"},
                "tokenizer": {"kind": "bpe", "file": "tokenizer.json", "vocab_size": 1024, "eod_id": 0},
                "dtype": "uint16", "byte_order": "little", "splits": splits, "params": {"gb": gb}}
    write_manifest(out, manifest)
    return manifest


def rank_start(d: Path, manifest: dict, rank: int, world: int, seq_len: int, micro: int, global_batch: int) -> float:
    """One rank's share after rank 0's broadcast: open both splits (sizes only), build its batch index and
    the window ids of its first micro-batch (the prefetch thread computes the rest while the step runs)."""
    t0 = time.perf_counter()
    train = open_split(d, "train", verify=False, manifest=manifest)
    open_split(d, "val", verify=False, manifest=manifest)
    TrainBatches(train, seq_len, micro, global_batch, rank, world, seed=0).window_ids(0, 0)
    return time.perf_counter() - t0


def rank0_verify(d: Path) -> tuple[float, int]:
    t0 = time.perf_counter()
    report = verify_data_dir(d, load_manifest(d), ["train", "val"])
    return time.perf_counter() - t0, report.bytes_read


def cold_verify(d: Path) -> tuple[float, int]:
    """Seconds and bytes of rank 0's first verification (no record): every shard hashed, the record written."""
    (d / VERIFIED_NAME).unlink(missing_ok=True)
    return rank0_verify(d)


def old_permutation(n_windows: int) -> tuple[float, int]:
    t0 = time.perf_counter()
    order = np.random.default_rng([0, 0]).permutation(n_windows)
    return time.perf_counter() - t0, order.nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=20.0)
    ap.add_argument("--shard-gb", type=float, default=1.0)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5, help="each rank's start timed this often, best kept")
    ap.add_argument("--global-batch", type=int, default=512)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/bench_startup"))
    ap.add_argument("--keep", action="store_true", help="leave the sparse data dir in place")
    args = ap.parse_args()
    if any(args.global_batch % (w * args.micro_batch) for w in args.worlds):
        raise SystemExit(f"--global-batch {args.global_batch} must be a multiple of --micro-batch x every world "
                         f"size {args.worlds}")
    d = args.dir
    shutil.rmtree(d, ignore_errors=True)
    manifest = build(d, args.gb, args.shard_gb)
    gb = sum(os.path.getsize(d / s["file"]) for sp in manifest["splits"].values() for s in sp["shards"]) / 1e9
    n_windows = (manifest["splits"]["train"]["n_tokens"] - 1) // args.seq_len
    cold_s, cold_bytes = cold_verify(d)
    perm_s, perm_bytes = old_permutation(n_windows)
    print(f"data dir {d}: {gb:.1f} GB sparse, {sum(len(s['shards']) for s in manifest['splits'].values())} shards, "
          f"{n_windows:,} windows of {args.seq_len + 1} tokens")
    print(f"cold verification (rank 0, once per manifest): {cold_s:.1f} s, {cold_bytes / 1e9:.1f} GB read")
    print(f"before: every rank, every start: verify {cold_s:.1f} s (then a second pass for the id range) + "
          f"epoch permutation {perm_s:.2f} s ({perm_bytes / 1e6:.0f} MB per rank)\n")
    rows = []
    rank_start(d, manifest, 0, 1, args.seq_len, args.micro_batch, args.global_batch)  # first-call warm-up, untimed
    for w in args.worlds:
        warm_s, warm_bytes = min(rank0_verify(d) for _ in range(args.repeats))
        per_rank = [min(rank_start(d, manifest, r, w, args.seq_len, args.micro_batch, args.global_batch)
                        for _ in range(args.repeats)) for r in range(w)]  # best of repeats: shared-CPU noise
        rows.append((w, warm_s, warm_bytes, float(np.mean(per_rank)), max(per_rank)))
    base_restart, base_first = rows[0][1] + rows[0][4], cold_s + rows[0][4]
    print("Measured: rank-0 verify, open+index per rank (every simulated rank's start run in turn in this process).")
    print("Computed (*) from the measured parts: restart = rank 0's verification against the record + the slowest")
    print("rank's open and index (ranks wait for rank 0's broadcast); first start = the same with the cold")
    print("verification measured once above; GB read = manifest bytes (now) and W x manifest bytes (before).\n")
    print(f"{'ranks':>5} | {'rank-0 verify':>13} | {'open+index per rank':>21} | {'restart*':>8} | {'vs 1':>5} | "
          f"{'first start*':>12} | {'vs 1':>5} | {'GB read per start*, all ranks':>29} | {'before*: per rank':>17}")
    for w, warm, warm_bytes, mean, worst in rows:
        restart, first = warm + worst, cold_s + worst
        print(f"{w:>5} | {warm * 1e3:>10.1f} ms | {mean * 1e3:>6.1f} ms (max {worst * 1e3:4.1f}) | "
              f"{restart * 1e3:>5.1f} ms | {restart / base_restart:>5.2f} | {first:>10.1f} s | "
              f"{first / base_first:>5.2f} | "
              f"{'now %.1f (restart %d)' % (cold_bytes / 1e9, warm_bytes):>17}, before {w * cold_bytes / 1e9:>7.1f} | "
              f"{cold_s + perm_s:>15.1f} s")
    if not args.keep:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
