"""What a run directory says about its run: the one reader of ``final.json`` / ``failed.json`` and the
run's states, shared by the sweep driver, the results table and the tests."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional

from rundir.files import (FAILED, FINAL, FINAL_DIVERGED, LAUNCH_MARKER, latest_checkpoint_index,
                          read_json_object)

# Run states. Terminal: completed, failed, diverged. Others describe a run not (yet) finished.
COMPLETED, FAILED_STATUS, DIVERGED = "completed", "failed", "diverged"
PENDING, RUNNING, INTERRUPTED = "pending", "running", "interrupted"
TERMINAL = (COMPLETED, FAILED_STATUS, DIVERGED)
STATUSES = (COMPLETED, FAILED_STATUS, DIVERGED, PENDING, RUNNING, INTERRUPTED)

# final.json fields a results row carries
FINAL_FIELDS = ("val_loss", "total_params", "active_params", "tokens", "steps", "train_flops", "flops_per_token",
                "wall_time_s", "wandb_run_id")


def read_outcome(run_dir: Path) -> tuple[str, dict]:
    """What the run directory says about the run: (status, fields for a results row).

    ``final.json`` -> completed (diverged if its validation loss is not finite); ``failed.json`` ->
    its status and reason; a checkpoint or a launch marker without either -> interrupted (resumable);
    nothing -> pending. An unreadable outcome file counts as a failure naming the file.
    """
    run_dir = Path(run_dir)
    final, broken = read_json_object(run_dir / FINAL)
    if broken:
        return FAILED_STATUS, {"reason": broken}
    if final is not None:
        info = {k: final.get(k) for k in FINAL_FIELDS}
        loss = info["val_loss"]
        if not isinstance(loss, (int, float)) or not math.isfinite(loss):
            return DIVERGED, {**info, "val_loss": None, "reason": f"final validation loss is {loss}"}
        if final.get("status", COMPLETED) != COMPLETED:
            return FAILED_STATUS, {**info, "reason": f"final.json has status {final.get('status')!r}"}
        return COMPLETED, info
    failed, broken = read_json_object(run_dir / FAILED)
    if broken:
        return FAILED_STATUS, {"reason": broken}
    if failed is not None:
        status = failed.get("status", FAILED_STATUS)
        status = status if status in (FAILED_STATUS, DIVERGED) else FAILED_STATUS
        step = failed.get("step")
        reason = str(failed.get("reason") or "no reason recorded")
        return status, {"reason": reason if step is None else f"{reason} (step {step})"}
    if latest_checkpoint_index(run_dir).exists() or (run_dir / LAUNCH_MARKER).exists():
        return INTERRUPTED, {}
    return PENDING, {}


def last_step(run_dir: Path) -> Optional[int]:
    """The step of the last committed checkpoint, None without one."""
    try:
        return int(json.loads(latest_checkpoint_index(run_dir).read_text())["step"])
    except (FileNotFoundError, KeyError, ValueError, json.JSONDecodeError):
        return None


def supersede_outcome(run_dir: Path) -> None:
    """A retried run starts without its recorded failure. A diverged run's final.json (a NaN validation
    loss) is set aside as final.diverged.json: with final.json in place the trainer would not run again."""
    run_dir = Path(run_dir)
    (run_dir / FAILED).unlink(missing_ok=True)
    if (run_dir / FINAL).exists():
        os.replace(run_dir / FINAL, run_dir / FINAL_DIVERGED)


def launch_attempts(run_dir: Path) -> int:
    """How many times a sweep driver launched this run (its launch marker; 0 if never)."""
    marker, _ = read_json_object(Path(run_dir) / LAUNCH_MARKER)
    return int((marker or {}).get("attempts", 0))
