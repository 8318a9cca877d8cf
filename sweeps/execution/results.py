"""The results table of a sweep: one row per planned run, written atomically as Parquet.

A row merges what was planned (sweep, budget, family, rho, seed, slots, the run directory and the
planner's own description of the run as JSON) with what the run reported in ``final.json`` /
``failed.json`` (status, validation loss, parameters, tokens, FLOPs, wall time, W&B id).

Iso-FLOP bookkeeping per run (filled when the record is built, from the plan's spec and the run's
``final.json``; values already present, e.g. read back from Parquet, are kept): ``rho_eff`` (the
experts' share of the built model's sparse params), ``planned_flops`` (the plan's training FLOPs),
``flops_error`` (spent / budget - 1, spent = the tokens the trainer actually trained x its FLOPs
per token), ``excluded`` (why the point must stay out of the fit: an allocation run more than
``FLOPS_EXCLUDE`` off its budget; a memory sweep varies FLOPs by design and is never excluded),
tokens per active and per total parameter, Engram lookups per table row (mean over rows; None
without Engram) and ``active_params_error`` (P_act / P_act(rho = 1) - 1, charged to tables and
tokens by the planner).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from rundir.outcome import (COMPLETED, DIVERGED, INTERRUPTED, PENDING, RUNNING, STATUSES,  # noqa: F401  (re-exported)
                            TERMINAL)
from rundir.outcome import FAILED_STATUS as FAILED  # noqa: F401  (re-exported: the sweep's word for it)


@dataclass
class RunRecord:
    sweep: str  # the sweep's name (= its W&B group), e.g. "cpu-6e12"
    mode: str  # "allocation" (rho sweep at a budget) or "memory" (fixed backbone, slots swept)
    family: str
    budget: float  # training FLOPs of the sweep
    rho: float  # share of sparse parameters in routed experts
    seed: int
    run_name: str
    run_dir: str
    status: str = PENDING
    reason: Optional[str] = None
    slots: Optional[int] = None  # Engram table parameters (memory mode; also recorded when known)
    val_loss: Optional[float] = None
    total_params: Optional[int] = None  # P_tot (no embedding / head)
    active_params: Optional[int] = None  # P_act
    tokens: Optional[int] = None
    steps: Optional[int] = None
    train_flops: Optional[float] = None
    flops_per_token: Optional[float] = None  # training FLOPs per token (3x forward)
    wall_time_s: Optional[float] = None
    wandb_run_id: Optional[str] = None
    attempts: int = 0  # how many times this driver launched it
    spec: str = "{}"  # the planner's run description (JSON)
    rho_eff: Optional[float] = None  # experts' share of the planned model's sparse params
    planned_flops: Optional[float] = None  # training FLOPs of the plan
    flops_error: Optional[float] = None  # spent training FLOPs / budget - 1 (None until spent)
    excluded: Optional[str] = None  # why the point is left out of the fit, else None
    tokens_per_active_param: Optional[float] = None  # spent tokens if known, else planned
    tokens_per_total_param: Optional[float] = None
    lookups_per_row: Optional[float] = None  # Engram lookups per table row over the run (None at rho = 1)
    active_params_error: Optional[float] = None  # P_act / P_act(rho = 1) - 1

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"unknown run status {self.status!r} (expected one of {', '.join(STATUSES)})")
        _fill_iso_fields(self)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


SCHEMA = pa.schema([
    ("sweep", pa.string()), ("mode", pa.string()), ("family", pa.string()), ("budget", pa.float64()),
    ("rho", pa.float64()), ("seed", pa.int64()), ("run_name", pa.string()), ("run_dir", pa.string()),
    ("status", pa.string()), ("reason", pa.string()), ("slots", pa.int64()), ("val_loss", pa.float64()),
    ("total_params", pa.int64()), ("active_params", pa.int64()), ("tokens", pa.int64()), ("steps", pa.int64()),
    ("train_flops", pa.float64()), ("flops_per_token", pa.float64()), ("wall_time_s", pa.float64()),
    ("wandb_run_id", pa.string()), ("attempts", pa.int64()), ("spec", pa.string()),
    ("rho_eff", pa.float64()), ("planned_flops", pa.float64()), ("flops_error", pa.float64()),
    ("excluded", pa.string()), ("tokens_per_active_param", pa.float64()), ("tokens_per_total_param", pa.float64()),
    ("lookups_per_row", pa.float64()), ("active_params_error", pa.float64()),
])
# Columns added after results tables were first written: older tables read back with None there.
ISO_COLUMNS = ("rho_eff", "planned_flops", "flops_error", "excluded", "tokens_per_active_param",
               "tokens_per_total_param", "lookups_per_row", "active_params_error")
FLOPS_EXCLUDE = 0.005  # |spent / budget - 1| above which an allocation point is left out of the fit
ABLATED_REASON = ("memory-ablation control arm (tables of one row): compared with its full-memory twin "
                  "(sweeps/planning/ablation.py), not on the U-curve")


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or not den else float(num) / float(den)


def _fill_iso_fields(r: "RunRecord") -> None:
    """Fill the iso-FLOP fields left None from the spec (planned) and the outcome fields (spent)."""
    try:
        spec = json.loads(r.spec or "{}")
    except json.JSONDecodeError:
        spec = {}
    spec = spec if isinstance(spec, dict) else {}
    planned_tokens = spec.get("train_tokens")
    tokens = r.tokens if r.tokens is not None else planned_tokens
    if r.rho_eff is None:
        r.rho_eff = spec.get("rho_effective")
    if r.planned_flops is None:
        r.planned_flops = spec.get("train_flops")
    if r.active_params_error is None:
        r.active_params_error = spec.get("active_params_error")
    if r.flops_error is None and r.train_flops is not None and r.budget:
        r.flops_error = float(r.train_flops) / float(r.budget) - 1.0
    if r.excluded is None and r.mode == "allocation" and r.flops_error is not None \
            and abs(r.flops_error) > FLOPS_EXCLUDE:
        r.excluded = (f"spent {r.train_flops:.4g} training FLOPs, {r.flops_error:+.2%} from the budget "
                      f"{r.budget:.4g} (limit {FLOPS_EXCLUDE:.1%}): not iso-FLOP")
    if r.excluded is None and spec.get("memory_ablated"):
        r.excluded = ABLATED_REASON
    if r.tokens_per_active_param is None:
        r.tokens_per_active_param = _ratio(tokens, r.active_params or spec.get("active_params"))
    if r.tokens_per_total_param is None:
        r.tokens_per_total_param = _ratio(tokens, r.total_params or spec.get("total_params"))
    if r.lookups_per_row is None and spec.get("lookups_per_row") is not None:
        r.lookups_per_row = spec["lookups_per_row"] * (_ratio(tokens, planned_tokens) or 1.0)

assert [f.name for f in fields(RunRecord)] == SCHEMA.names, "RunRecord and SCHEMA must list the same columns"


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def to_table(records: Iterable[RunRecord]) -> pa.Table:
    rows = [{k: _clean(v) for k, v in r.as_dict().items()} for r in records]
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def write_results(records: Iterable[RunRecord], path: Path) -> Path:
    """Write the table to ``path`` atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    pq.write_table(to_table(records), tmp)
    os.replace(tmp, path)
    return path


def read_results(path: Path) -> list[RunRecord]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no results table at {path}")
    table = pq.read_table(path)
    missing = set(SCHEMA.names) - set(table.column_names) - set(ISO_COLUMNS)
    if missing:
        raise ValueError(f"{path} is not a sweep results table (missing columns {sorted(missing)})")
    return [RunRecord(**{k: row.get(k) for k in SCHEMA.names}) for row in table.to_pylist()]


def spec_json(spec_dict: dict) -> str:
    return json.dumps(spec_dict, sort_keys=True, default=str)
