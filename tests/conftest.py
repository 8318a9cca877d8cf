"""Shared fixtures: one small real dataset (this machine's Python stdlib, BPE-1k) per test session, and
one torch thread for modules of small CPU workloads."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "disabled")

from rundir.schema import register  # noqa: E402  conf/config.yaml starts from the schema in Hydra's ConfigStore

register()


@pytest.fixture(scope="module")
def one_thread():
    """Small CPU workloads: one thread (two threads on a busy 2-core machine stall each other). Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


_DIST_ENV = ("MASTER_PORT",)  # RANK / LOCAL_RANK / WORLD_SIZE stay: DeepSpeed reads them at every initialize


@pytest.fixture(scope="session")
def inprocess_dist():
    """One one-rank process group in this pytest process, for every test that builds engines or runs the
    trainer in-process (DeepSpeed cannot start a second group once one was torn down). The torch.distributed
    port it set is taken out of the environment at once: trainer subprocesses inherit the environment, and a
    MASTER_PORT held by this live group made every later single-process trainer fail with EADDRINUSE."""
    from train.distributed import setup, teardown

    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    info = setup()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    yield info
    teardown()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stdlib_bpe1k"
    subprocess.run(
        [sys.executable, "-m", "data_prep.prepare", "--source", "stdlib", "--tokenizer", "bpe",
         "--vocab-size", "1024", "--max-bytes", "1500000", "--val-fraction", "0.05", "--shard-tokens", "200000", "--out", str(out)],
        cwd=REPO, check=True, capture_output=True, text=True)
    return out
