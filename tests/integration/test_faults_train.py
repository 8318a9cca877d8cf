"""Fault-injection suite, training part (slow): real runs of train/main.py that are damaged, changed,
killed or failed on one rank, and the outcome each must have. Rows of the README's table (``@row``)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fault_rows import row
from trainer_utils import REPO, env, final, run_train, train_cmd

pytestmark = pytest.mark.slow

BASE = ["train.max_steps=12", "train.ckpt_interval=6", "train.eval_interval=1000"]


@pytest.fixture(scope="module")
def finished(tiny_data, tmp_path_factory) -> Path:
    """One finished 12-step run with checkpoints at steps 6 and 12 (copied by each test)."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    run_train(tiny_data, run_dir, *BASE)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path, unfinish: bool = True) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    if unfinish:
        (out / "final.json").unlink()
    return out


def _error_line(p: subprocess.CompletedProcess) -> str:
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1, (p.returncode, p.stderr[-3000:])
    return errors[0]


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 3], "garbage": os.urandom(len(data)), "empty": b""}[how])


@row("a checkpoint file truncated, garbage or empty",
     "a warning naming the file's checkpoint and the fallback; resumes from the previous kept checkpoint, "
     "and ends with the uninterrupted run's exact validation loss")
@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_falls_back_to_the_previous_one(tiny_data, finished, tmp_path, how):
    run_dir = _copy(finished, tmp_path)
    _damage(run_dir / "checkpoints" / "step_00000012" / "mp_rank_00_model_states.pt", how)
    p = run_train(tiny_data, run_dir, *BASE, "train.progress=true")
    out = p.stdout + p.stderr
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_00000012'} is unreadable" in out
    assert f"falling back to {run_dir / 'checkpoints' / 'step_00000006'}" in out
    assert final(run_dir)["val_loss"] == final(finished)["val_loss"]  # steps 7-12 redone exactly
    assert "\r" not in out  # progress=true but no TTY: log lines, no bar frames


@row("every kept checkpoint unreadable", "one `error:` line naming the checkpoint directory and the tags tried")
def test_no_readable_checkpoint_is_one_line_error(tiny_data, finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    for tag in ("step_00000006", "step_00000012"):
        _damage(run_dir / "checkpoints" / tag / "mp_rank_00_model_states.pt", "empty")
    msg = _error_line(run_train(tiny_data, run_dir, *BASE, check=False))
    assert "no readable checkpoint in" in msg and "step_00000012, step_00000006" in msg
    assert "no readable checkpoint" in json.loads((run_dir / "failed.json").read_text())["reason"]


@row("a finished run relaunched with other overrides (`model.d_model=192 optim.lr=0.5 data.dir=/nonexistent`)",
     "refused in one line listing the changed settings (the same command still returns at once)")
def test_finished_run_relaunched_with_other_settings_is_refused(tiny_data, finished, tmp_path):
    run_dir = _copy(finished, tmp_path, unfinish=False)
    p = run_train(tiny_data, run_dir, *BASE, "model.d_model=192", "optim.lr=0.5", check=False)
    msg = _error_line(p)
    assert "holds a finished run trained with other settings" in msg
    assert "model.d_model: 64 -> 192" in msg and "optim.lr: 0.003 -> 0.5" in msg
    p = run_train(Path("/nonexistent"), run_dir, *BASE, check=False)
    assert "data.dir: " in _error_line(p) and "-> /nonexistent" in _error_line(p)
    assert "run already completed" in run_train(tiny_data, run_dir, *BASE).stdout
    assert not (run_dir / "failed.json").exists()  # a refusal does not mark a finished run failed
    assert final(run_dir) == final(finished)


@row("`optim.lr` x100 or `train.max_steps` changed mid-run",
     "refused in one line naming the change; with `train.allow_config_change=true` it resumes and "
     "`run.json` records the change and its step")
def test_changed_trajectory_setting_is_refused_unless_allowed(tiny_data, finished, tmp_path):
    run_dir = _copy(finished, tmp_path)
    before = (run_dir / "checkpoints" / "latest.json").read_text()
    msg = _error_line(run_train(tiny_data, run_dir, *BASE, "optim.lr=0.3", check=False))
    assert "optim.lr: 0.003 -> 0.3" in msg and "train.allow_config_change=true" in msg
    msg = _error_line(run_train(tiny_data, run_dir, "train.max_steps=20", *BASE[1:], check=False))
    assert "train.max_steps: 12 -> 20" in msg
    assert (run_dir / "checkpoints" / "latest.json").read_text() == before
    run_train(tiny_data, run_dir, "train.max_steps=14", *BASE[1:], "train.allow_config_change=true")
    changes = json.loads((run_dir / "run.json").read_text())["config_changes"]
    assert changes == [{"step": 12, "changes": ["train.max_steps: 12 -> 14"]}]
    assert final(run_dir)["steps"] == 14


@row("world size or `zero_stage` changed on resume",
     "refused in one line naming the saved and the new layout")
def test_layout_change_on_resume_is_refused(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    run_train(tiny_data, run_dir, *BASE, "train.zero_stage=2", nproc=2)
    (run_dir / "final.json").unlink()
    msg = _error_line(run_train(tiny_data, run_dir, *BASE, "train.zero_stage=2", check=False))
    assert "written with world_size=2 zero_stage=2; this launch has world_size=1 zero_stage=2" in msg


@row("an error on one rank only (a data error on rank 1, injected with `ISOFLOP_FAULT=1:3`)",
     "every rank stops within seconds; `failed.json` and stderr carry rank 1's message")
def test_one_rank_failure_stops_every_rank_with_its_message(tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.time()
    p = run_train(tiny_data, run_dir, "train.max_steps=50", nproc=2, check=False, timeout=180,
                  extra_env={"ISOFLOP_FAULT": "1:3"})
    assert p.returncode != 0 and time.time() - t0 < 120
    assert "error: rank 1: InjectedFault: injected fault on rank 1 at step 3" in p.stderr
    failed = json.loads((run_dir / "failed.json").read_text())
    assert failed["status"] == "failed" and failed["reason"].startswith("rank 1: InjectedFault")


def _workers_of(run_dir: Path) -> list[int]:
    """The trainer processes of ``run_dir``: not the launchers, whose command lines also name the script."""
    out = subprocess.run(["pgrep", "-f", f"train/main.py .*run_dir={run_dir} "], capture_output=True, text=True)
    pids = [int(x) for x in out.stdout.split()]
    return [p for p in pids if not any(w in _cmdline(p) for w in (b"deepspeed", b"torch.distributed.run"))]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _launch(tiny_data: Path, run_dir: Path, launcher: str) -> list[str]:
    cmd = train_cmd(tiny_data, run_dir, "train.max_steps=100000", nproc=2 if launcher == "torchrun" else 1)
    if launcher == "torchrun":
        return cmd
    port = 29500 + os.getpid() % 1000
    return [str(Path(sys.executable).with_name("deepspeed")), "--no_local_rank", "--num_gpus=2",
            f"--master_port={port}", *cmd[1:]]


@row("the torchrun or `deepspeed` launcher killed with SIGKILL",
     "its workers get SIGTERM and exit: `PR_SET_PDEATHSIG` for the worker's parent (torchrun, DeepSpeed's "
     "`launcher.launch`), and a watch on DeepSpeed's runner above it")
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_workers_exit_when_their_launcher_dies(tiny_data, tmp_path, launcher):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_launch(tiny_data, run_dir, launcher), cwd=REPO, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.2)
    workers = _workers_of(run_dir)
    assert len(workers) == 2, workers
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()]
    for w in alive:  # do not leave them running if the test fails
        os.kill(w, signal.SIGKILL)
    assert not alive
