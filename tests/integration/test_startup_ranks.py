"""Rank 0's start-up reads reach every rank through one broadcast, its errors too (2 gloo processes)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

pytestmark = pytest.mark.slow


class Unpicklable(Exception):
    def __init__(self, what, extra):  # two required arguments: pickle cannot rebuild it
        super().__init__(what)
        self.extra = extra

    def __reduce__(self):
        raise TypeError("not picklable")


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from train.distributed import DistInfo
    from rundir.schema import ConfigError
    from train.trainer import _on_main

    import torch

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    info = DistInfo(rank, rank, 2, torch.device("cpu"))
    seen = [_on_main(info, lambda: {"latest": rank, "tags": [f"step_{rank}"]})]
    for fail in (ConfigError("run_dir holds checkpoints (train.resume=never)"), Unpicklable("bad shard", 1)):
        def fn(fail=fail):
            raise fail
        try:
            _on_main(info, fn)
            seen.append("returned")
        except Exception as e:  # every rank must raise rank 0's error
            seen.append(f"{type(e).__name__}: {e}")
    Path(out, f"rank{rank}.txt").write_text(repr(seen))
    dist.destroy_process_group()


def test_every_rank_gets_rank_zeros_reads_and_errors(tmp_path):
    port = 29600 + os.getpid() % 300
    mp.spawn(_worker, args=(port, str(tmp_path)), nprocs=2, join=True)
    seen = [eval((tmp_path / f"rank{r}.txt").read_text()) for r in range(2)]
    assert seen[0] == seen[1]
    assert seen[0][0] == {"latest": 0, "tags": ["step_0"]}
    assert seen[0][1] == "ConfigError: run_dir holds checkpoints (train.resume=never)"
    assert seen[0][2] == "RuntimeError: Unpicklable: bad shard"
