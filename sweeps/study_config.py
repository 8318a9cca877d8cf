"""What a study is: ``<folder>/study.yaml`` read into typed sections, validated with one-line errors.
Shared by the study command (sweeps/study.py) and its report (sweeps/study_report.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

STUDY_FILE, LOG_FILE = "study.yaml", "study_log.json"
_ALLOCATION_KEYS = {"budgets", "rhos", "seeds", "ablate_memory"}
_MEMORY_KEYS = {"budget", "slots", "seeds"}


@dataclass(frozen=True)
class Allocation:
    budgets: tuple[float, ...]
    rhos: tuple[float, ...]
    seeds: int
    ablate_memory: bool = True


@dataclass(frozen=True)
class MemorySweep:
    budget: float
    slots: tuple[int, ...]
    seeds: int


@dataclass(frozen=True)
class Study:
    name: str
    family: str
    allocation: Allocation
    memory: Optional[MemorySweep] = None
    description: str = ""


def _section(raw: dict, key: str, allowed: set[str], where: Path) -> Optional[dict]:
    sec = raw.get(key)
    if sec is None:
        return None
    if not isinstance(sec, dict):
        raise ValueError(f"{where}: `{key}` must be a mapping, got {type(sec).__name__}")
    unknown = set(sec) - allowed
    if unknown:
        raise ValueError(f"{where}: unknown key(s) in `{key}`: {', '.join(sorted(unknown))} "
                         f"(allowed: {', '.join(sorted(allowed))})")
    return sec


def _positive_int(value, what: str, where: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
        raise ValueError(f"{where}: {what} must be a positive whole number, got {value!r}")
    return int(value)


def _floats(values, what: str, where: Path) -> tuple[float, ...]:
    if not isinstance(values, list) or not values:
        raise ValueError(f"{where}: {what} must be a non-empty list")
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {what} must be numbers, got {values!r}") from None


def load_study(folder: Path) -> Study:
    """Read and validate ``<folder>/study.yaml`` (unknown keys refused, one line naming the problem)."""
    path = Path(folder) / STUDY_FILE
    if not path.exists():
        raise ValueError(f"{path}: no study definition (write {STUDY_FILE}: family, allocation, memory)")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"name", "family", "description", "allocation", "memory"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    alloc = _section(raw, "allocation", _ALLOCATION_KEYS, path)
    if alloc is None or "family" not in raw:
        raise ValueError(f"{path}: a study needs `family` and an `allocation` section")
    allocation = Allocation(budgets=_floats(alloc.get("budgets"), "allocation.budgets", path),
                            rhos=_floats(alloc.get("rhos"), "allocation.rhos", path),
                            seeds=_positive_int(alloc.get("seeds", 1), "allocation.seeds", path),
                            ablate_memory=bool(alloc.get("ablate_memory", True)))
    mem = _section(raw, "memory", _MEMORY_KEYS, path)
    memory = None
    if mem is not None:
        slots = _floats(mem.get("slots"), "memory.slots", path)
        memory = MemorySweep(budget=_floats([mem.get("budget")], "memory.budget", path)[0],
                             slots=tuple(_positive_int(s, "memory.slots", path) for s in slots),
                             seeds=_positive_int(mem.get("seeds", 1), "memory.seeds", path))
    return Study(name=str(raw.get("name") or Path(folder).resolve().name), family=str(raw["family"]),
                 allocation=allocation, memory=memory, description=str(raw.get("description", "")))
