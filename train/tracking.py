"""Weights & Biases on rank 0 (offline by default), plus a local metrics.jsonl that is always written."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from rundir.files import METRICS, atomic_write_text, new_run_id

log = logging.getLogger("train")


def read_metrics(path: Path) -> list[tuple[str, dict]]:
    """``(line, record)`` for each line of a metrics.jsonl. A half-written last line (a kill mid-write)
    is dropped with a warning naming the file; a bad line before it is corruption and is an error."""
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    out = []
    for i, ln in enumerate(lines):
        try:
            out.append((ln, json.loads(ln)))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ValueError(f"{path} line {i + 1} is not JSON ({e}); repair or delete the file") from None
            log.warning("%s: dropping its half-written last line (%d chars)", path, len(ln))
    return out


class Tracker:
    """Rank 0 logs to W&B and to ``run_dir/metrics.jsonl``; other ranks do nothing.

    The W&B run id is chosen once per run and kept in the checkpoint (and in ``run_dir/run.json``),
    so a resumed job continues the same W&B run (``resume="allow"``).
    """

    def __init__(self, run_dir: Path, wandb_cfg: dict, config: dict, run_id: Optional[str],
                 is_main: bool, resume_step: int):
        self.is_main = is_main
        self.run = None
        self.run_id = run_id
        self.metrics_path = Path(run_dir) / METRICS
        if not is_main:
            return
        self._truncate_metrics_after(resume_step)
        mode = os.environ.get("WANDB_MODE") or wandb_cfg.get("mode", "offline")
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"W&B mode {mode!r} (WANDB_MODE or logging.wandb.mode) is not one of "
                             f"offline, online, disabled")
        if mode == "disabled":
            return
        import wandb

        if self.run_id is None:
            self.run_id = new_run_id()
        self.run = wandb.init(
            project=wandb_cfg.get("project"), entity=wandb_cfg.get("entity"),
            group=wandb_cfg.get("group"), name=wandb_cfg.get("name"), tags=list(wandb_cfg.get("tags") or []),
            id=self.run_id, resume="allow", mode=mode, dir=str(run_dir), config=config,
            settings=wandb.Settings(quiet=True, console="off"))

    def _truncate_metrics_after(self, step: int) -> None:
        """A killed run may have logged steps past its last checkpoint: drop them before redoing."""
        if not self.metrics_path.exists():
            return
        keep = [ln for ln, rec in read_metrics(self.metrics_path) if rec.get("step", 0) <= step]
        atomic_write_text(self.metrics_path, "".join(ln + "\n" for ln in keep))

    def log(self, metrics: dict, step: int) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.run is not None:
            self.run.log(metrics, step=step)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    @property
    def location(self) -> Optional[str]:
        if self.run is None:
            return None
        return getattr(self.run, "dir", None)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


class Progress:
    """Rank 0's progress: a tqdm bar on a terminal; on a pipe or log file, where a bar's carriage-return
    frames would fill the file, one plain line every ``every`` steps (and at the last step)."""

    def __init__(self, enabled: bool, total: int, initial: int, every: int, stream=None):
        self.total, self.every, self.bar = total, max(int(every), 1), None
        self.enabled = enabled
        stream = stream or sys.stderr
        if enabled and stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True, file=stream)

    def update(self, step: int) -> None:
        """Every step: advance the bar (no value is read from the device here)."""
        if self.bar is not None:
            self.bar.update(1)

    def report(self, step: int, loss: float, lr: float, tokens_per_s: Optional[float] = None) -> None:
        """At log steps: the loss and rate on the bar, or one plain line."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif self.enabled and (step % self.every == 0 or step == self.total):
            rate = f" {tokens_per_s:,.0f} tok/s" if tokens_per_s else ""
            log.info("step %d/%d loss %.4f lr %.2e%s", step, self.total, loss, lr, rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
