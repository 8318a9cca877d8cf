"""The sweep's summary run in Weights & Biases (offline by default).

Every training run of a sweep logs itself (through the trainer) into one W&B group, the sweep name,
with rho, seed and budget in its config. This module adds one more run to that group, job type
``sweep-summary``: the results table (``wandb.Table``), the U-curve as W&B charts (a line of the fitted
curve and a scatter of the runs), the PNG figures, and as summary values the verdict first (``verdict``
and a one-line ``headline``: verdict, rho* and gain with intervals), then every fit value. Its run id
is chosen once per sweep directory and kept in ``wandb_summary.json`` there, so later invocations
update the same run (``resume="allow"``); nothing is logged when the results have not changed since
the last time.

Find it after ``wandb sync <sweep_dir>/wandb/offline-run-*`` (or live, with ``mode="online"``) in the
project's Runs table, grouped by the sweep name; the summary run is the one with job type
``sweep-summary``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

from sweeps.execution.results import RunRecord
from core.fingerprint import fingerprint
from rundir.files import atomic_write_json, new_run_id

STATE_FILE = "wandb_summary.json"
TABLE_COLUMNS = ("run_name", "rho", "seed", "slots", "status", "val_loss", "total_params", "active_params",
                 "tokens", "train_flops", "wall_time_s", "reason")


def content_digest(records: Sequence[RunRecord], fit: Optional[dict]) -> str:
    return fingerprint([[r.as_dict() for r in records], fit], sort_keys=True, default=str)


def log_summary(sweep_dir: Path, group: str, records: Sequence[RunRecord], fit: Optional[dict],
                curve: Optional[dict], images: Sequence[Path], config: dict, *, project: str,
                entity: Optional[str] = None, mode: str = "offline") -> Optional[str]:
    """Log (or update) the sweep's summary run. Returns its local directory, or None if nothing was
    logged (W&B disabled, or results unchanged since the last call).

    ``curve``: {"x": [...], "loss": [...], "lo": [...], "hi": [...], "x_name": "rho"} — the fitted
    curve to chart (None: no fit). ``fit``: the fit's summary values (flat scalars and [lo, hi] pairs).
    """
    mode = os.environ.get("WANDB_MODE") or mode
    if mode not in ("offline", "online", "disabled"):
        raise ValueError(f"W&B mode must be offline, online or disabled, got {mode!r}")
    if mode == "disabled":
        return None
    sweep_dir = Path(sweep_dir)
    state_path = sweep_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    digest = content_digest(records, fit)
    if state.get("digest") == digest:
        return None
    run_id = state.get("run_id") or new_run_id()
    run = _init_run(sweep_dir, group, run_id, config, project=project, entity=entity, mode=mode)
    try:
        run.log(_payload(group, records, curve, images))
        _write_summary(run, fit)
        location = str(Path(run.dir).parent)
    finally:
        run.finish()
    atomic_write_json(state_path, {"run_id": run_id, "digest": digest, "location": location})
    return location


def _init_run(sweep_dir: Path, group: str, run_id: str, config: dict, *, project: str, entity: Optional[str],
              mode: str):
    import wandb

    silent = os.environ.get("WANDB_SILENT")
    os.environ["WANDB_SILENT"] = "true"  # the driver prints where the run went and how to sync it
    try:
        return wandb.init(project=project, entity=entity, group=group, name=f"{group}-summary", id=run_id,
                          resume="allow", job_type="sweep-summary", mode=mode, dir=str(sweep_dir), config=config,
                          settings=wandb.Settings(quiet=True, console="off"))
    finally:
        if silent is None:
            os.environ.pop("WANDB_SILENT", None)
        else:
            os.environ["WANDB_SILENT"] = silent


def _payload(group: str, records: Sequence[RunRecord], curve: Optional[dict], images: Sequence[Path]) -> dict:
    """The results table, the runs' scatter, the fitted curve with its band, and the figures."""
    import wandb

    rows = [[getattr(r, c) for c in TABLE_COLUMNS] for r in records]
    payload = {"results": wandb.Table(columns=list(TABLE_COLUMNS), data=rows)}
    x_name = (curve or {}).get("x_name", "rho")
    done = [[getattr(r, x_name), r.val_loss] for r in records
            if r.status == "completed" and r.val_loss is not None and getattr(r, x_name) is not None]
    if done:
        pts = wandb.Table(columns=[x_name, "val_loss"], data=done)
        payload["runs_scatter"] = wandb.plot.scatter(pts, x_name, "val_loss", title=f"{group}: runs")
    if curve:
        n = len(curve["x"])
        fitted = wandb.Table(columns=[x_name, "fitted_loss", "ci_low", "ci_high"],
                             data=[list(v) for v in zip(curve["x"], curve["loss"], curve.get("lo") or [None] * n,
                                                        curve.get("hi") or [None] * n)])
        payload["fitted_curve"] = fitted
        payload["u_curve"] = wandb.plot.line(fitted, x_name, "fitted_loss", title=f"{group}: fitted loss")
    for img in images:
        payload[f"figures/{Path(img).stem}"] = wandb.Image(str(img))
    return payload


def _write_summary(run, fit: Optional[dict]) -> None:
    """The verdict, its headline line, and every fit value ([lo, hi] pairs as _low / _high)."""
    if fit and "verdict" in fit:
        from sweeps.analysis.fit import verdict_line

        run.summary["verdict"] = fit["verdict"]
        run.summary["headline"] = verdict_line(fit)
    for key, value in (fit or {}).items():
        if isinstance(value, (list, tuple)) and len(value) == 2:
            run.summary[f"{key}_low"], run.summary[f"{key}_high"] = value
        elif isinstance(value, (int, float, str, bool)) or value is None:
            run.summary[key] = value
