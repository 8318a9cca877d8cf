"""Run the real trainer (train/main.py) as a subprocess, the way users and the sweep driver do."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY_MODEL = ["model.vocab_size=1024", "model.d_model=64", "model.n_layers=2", "model.n_heads=2",
              "model.ffn_hidden=160", "model.max_seq_len=64"]
TINY_TRAIN = ["train.seq_len=64", "train.micro_batch_size=4", "train.global_batch_size=8",
              "train.eval_tokens=4096", "train.log_interval=1", "train.progress=false", "optim.warmup_steps=5"]
# a one-layer Engram with small tables (the data's own tokenizer for its compression)
TINY_ENGRAM = ["memory=engram_tiny", "model.engram.layer_ids=[1]", "model.engram.embed_dim_per_ngram=32",
               "model.engram.heads_per_ngram=2", "model.engram.table_sizes=[1000,1000]",
               "model.engram.tokenizer=data"]


def env(threads: int = 1) -> dict:
    e = dict(os.environ)
    e.update({"WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
              "HYDRA_FULL_ERROR": "0"})
    return e


def train_cmd(data_dir: Path, run_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    args = ["train/main.py", f"data.dir={data_dir}", f"run_dir={run_dir}", *TINY_MODEL, *TINY_TRAIN, *overrides]
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run_train(data_dir: Path, run_dir: Path, *overrides: str, nproc: int = 1, check: bool = True,
              timeout: int = 600, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    e = env()
    for k, v in (extra_env or {}).items():  # None removes a variable
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    p = subprocess.run(train_cmd(data_dir, run_dir, *overrides, nproc=nproc), cwd=REPO, env=e,
                       capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"trainer failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def grad_norms(run_dir: Path) -> list[float]:
    """The logged gradient norm of every logged step (before clipping). Adam barely feels a wrong clip
    coefficient (it rescales the update), so tests compare the norm the trainer clipped on itself."""
    return [json.loads(ln)["train/grad_norm"] for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
            if "train/grad_norm" in ln]


def assert_real_grad_norms(run_dir: Path) -> list[float]:
    """Every logged step carries a finite, positive gradient norm (DeepSpeed reports 0.0 where it computed
    none: the trainer must fill it in every mode)."""
    norms = grad_norms(run_dir)
    assert norms and all(math.isfinite(n) and n > 0 for n in norms), norms
    return norms


def final(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "final.json").read_text())


def kill_after_checkpoint(data_dir: Path, run_dir: Path, step: int, *overrides: str, timeout: int = 300) -> None:
    """Start a training run and SIGKILL its whole process group once checkpoint ``step`` is written."""
    import signal
    import time

    proc = subprocess.Popen(train_cmd(data_dir, run_dir, *overrides), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    latest = Path(run_dir) / "checkpoints" / "latest.json"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] == step:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (Path(run_dir) / "final.json").exists()
