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

from train.schema import register  # noqa: E402  conf/config.yaml starts from the schema in Hydra's ConfigStore

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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data") / "stdlib_bpe1k"
    subprocess.run(
        [sys.executable, "-m", "data_prep.prepare", "--source", "stdlib", "--tokenizer", "bpe",
         "--vocab-size", "1024", "--max-bytes", "1500000", "--val-fraction", "0.05", "--shard-tokens", "200000", "--out", str(out)],
        cwd=REPO, check=True, capture_output=True, text=True)
    return out
