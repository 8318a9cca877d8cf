"""Shared helpers for the dataclass configs (model, MoE, Engram)."""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Mapping


def checked_kwargs(cls, cfg: Any, what: str) -> dict:
    """``cfg`` as constructor kwargs of dataclass ``cls``; a clear error on a non-mapping or unknown keys."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{what} must be a mapping of {cls.__name__} fields, got {type(cfg).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"unknown {what} keys: {sorted(unknown)} (known: {sorted(known)})")
    return dict(cfg)
