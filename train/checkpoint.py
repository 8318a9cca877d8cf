"""Checkpoints that are committed atomically.

DeepSpeed writes each checkpoint into ``checkpoints/<tag>/`` (model, ZeRO-partitioned optimizer
states, our client state). Only after every rank has finished does rank 0 replace
``checkpoints/latest.json`` (write to a temp file, fsync, ``os.replace``). A run killed mid-save
therefore still resumes from the previous committed checkpoint; the half-written directory is
removed before the same tag is written again.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from train.distributed import barrier
from train.run_files import LATEST, atomic_write_json


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(ckpt_dir: Path) -> Optional[dict]:
    p = Path(ckpt_dir) / LATEST
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt checkpoint index {p}: {e}") from e
    if not (Path(ckpt_dir) / meta["tag"]).is_dir():
        raise CheckpointError(f"checkpoint index {p} names {meta['tag']}, which is missing")
    return meta


def check_compatible(meta: dict, expected: dict, ckpt_dir: Path) -> None:
    """Refuse to resume from a checkpoint written under a different model or data stream."""
    for key, what in (("model_fingerprint", "model config"), ("stream_fingerprint", "data/batch/seed config")):
        if meta.get(key) != expected[key]:
            raise CheckpointError(
                f"checkpoint in {ckpt_dir} was written with a different {what} "
                f"({meta.get(key)} != {expected[key]}); use a new run_dir or restore the original config")


def save(engine, ckpt_dir: Path, step: int, meta: dict, is_main: bool, keep: int) -> None:
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt_dir / tag
        if stale.exists():  # left over by a run killed mid-save: never referenced by latest.json
            shutil.rmtree(stale)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"meta": meta}, save_latest=False)
    barrier()
    if is_main:
        history = [t for t in (read_latest(ckpt_dir) or {}).get("history", []) if t != tag] + [tag]
        kept = history[-keep:] if keep > 0 else history
        # Commit the new index first: the pruned directories are no longer named by it when they go.
        atomic_write_json(ckpt_dir / LATEST, {**meta, "tag": tag, "step": step, "history": kept})
        for old in history[:len(history) - len(kept)]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()


def load(engine, ckpt_dir: Path, meta: dict) -> dict:
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=meta["tag"], load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {ckpt_dir / meta['tag']}")
    return client.get("meta", {})
