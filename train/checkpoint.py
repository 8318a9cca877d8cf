"""Checkpoints that are committed atomically, load without executing code, and survive a bad file.

DeepSpeed writes each checkpoint into ``checkpoints/<tag>/`` (model, ZeRO-partitioned optimizer
states, our client state). Every rank fsyncs the files (and the directory) before rank 0 replaces
``checkpoints/latest.json`` (temp file, fsync, ``os.replace``, fsync of the directory), so after a
crash or power loss ``latest.json`` never names a checkpoint whose bytes are not on disk. A run
killed mid-save resumes from the previous committed checkpoint; the half-written directory is
removed before the same tag is written again.

Loading goes through ``torch.load(weights_only=True)`` with an allowlist of the few DeepSpeed
classes its checkpoints hold: a run directory copied from elsewhere cannot run code on load. A
checkpoint that does not load (truncated, empty, garbage) is reported and the previous kept one
(``latest.json``'s history, newest first) is tried instead.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from core.distributed import all_reduce_sum
from train.distributed import barrier
from train.run_files import LATEST, atomic_write_json, fsync_dir

log = logging.getLogger("train")


class CheckpointError(RuntimeError):
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(ckpt_dir: Path) -> Optional[dict]:
    """The committed index, or None when there is none. A corrupt index is reported, not fatal: the
    checkpoint directories themselves are then the candidates (see :func:`candidates`)."""
    p = Path(ckpt_dir) / LATEST
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text())
        if not isinstance(meta, dict) or "tag" not in meta:
            raise ValueError("no 'tag' entry")
    except ValueError as e:
        log.warning("checkpoint index %s is unreadable (%s); trying the checkpoint directories", p, e)
        return {"tag": None, "history": []}
    return meta


def candidates(ckpt_dir: Path, latest: dict) -> list[str]:
    """Tags to try, newest first: the index's history, or every ``step_*`` directory if it has none."""
    tags = list(reversed(latest.get("history") or ([latest["tag"]] if latest.get("tag") else [])))
    if not tags:
        tags = sorted((p.name for p in Path(ckpt_dir).glob("step_*") if p.is_dir()), reverse=True)
    return [t for t in tags if (Path(ckpt_dir) / t).is_dir()]


def layout(world_size: int, zero_stage: int) -> dict:
    return {"world_size": int(world_size), "zero_stage": int(zero_stage)}


def check_layout(saved: Optional[dict], now: dict, where: Path) -> None:
    """ZeRO-partitioned optimizer states cannot be read by another world size or stage (DeepSpeed
    fails with an internal traceback); stage 0 keeps whole states, so only its world size may change."""
    if not saved:
        return
    same_stage = saved.get("zero_stage") == now["zero_stage"]
    if same_stage and (now["zero_stage"] == 0 or saved.get("world_size") == now["world_size"]):
        return
    raise CheckpointError(
        f"checkpoint in {where} was written with world_size={saved.get('world_size')} "
        f"zero_stage={saved.get('zero_stage')}; this launch has world_size={now['world_size']} "
        f"zero_stage={now['zero_stage']}: relaunch with the saved layout (resharding is not supported)")


def check_compatible(meta: dict, expected: dict, ckpt_dir: Path) -> None:
    """Refuse to resume from a checkpoint written under a different model or data stream."""
    for key, what in (("model_fingerprint", "model config"), ("stream_fingerprint", "data/batch/seed config")):
        if meta.get(key) is not None and meta.get(key) != expected[key]:
            raise CheckpointError(
                f"checkpoint in {ckpt_dir} was written with a different {what} "
                f"({meta.get(key)} != {expected[key]}); use a new run_dir or restore the original config")


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (so names and bytes are both durable)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


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
    fsync_tree(ckpt_dir / tag)  # every rank: on a multi-node file system each node flushes its own writes
    barrier()
    if is_main:
        history = [t for t in (read_latest(ckpt_dir) or {}).get("history", []) if t != tag] + [tag]
        kept = history[-keep:] if keep > 0 else history
        # Commit the new index first: the pruned directories are no longer named by it when they go.
        atomic_write_json(ckpt_dir / LATEST, {**meta, "tag": tag, "step": step, "history": kept})
        fsync_dir(ckpt_dir)
        for old in history[:len(history) - len(kept)]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()


def _safe_globals() -> list:
    """The non-tensor classes DeepSpeed pickles into its checkpoints (data only, no code on load)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location=None):
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _load_one(engine, ckpt_dir: Path, tag: str) -> dict:
    engine.checkpoint_engine.load = safe_load  # DeepSpeed's own loader uses weights_only=False
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {ckpt_dir / tag}")
    return client.get("meta", {})


def load(engine, ckpt_dir: Path, tags: list[str], device: torch.device,
         check: Callable[[dict, Path], None]) -> dict:
    """Load the newest readable checkpoint of ``tags`` (newest first) on every rank; ``check`` vets
    its meta. All ranks agree on the outcome of each try (a file may be bad for one rank only)."""
    tried = []
    for i, tag in enumerate(tags):
        meta, reason = {}, None
        try:
            meta = _load_one(engine, ckpt_dir, tag)
        except CheckpointError as e:
            reason = str(e)
        except Exception as e:  # unpickling / zip / EOF / shape errors: the file is damaged
            empty = "a file ends early (empty or truncated)" if isinstance(e, EOFError) else "no message"
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else empty}"
        bad = all_reduce_sum(torch.tensor([1.0 if reason else 0.0], device=device)).item()
        if not bad:
            check(meta, ckpt_dir / tag)
            if tried:
                log.warning("resumed from the older checkpoint %s", ckpt_dir / tag)
            return meta
        tried.append(tag)
        nxt = tags[i + 1] if i + 1 < len(tags) else None
        log.warning("checkpoint %s is unreadable (%s); %s", ckpt_dir / tag, reason or "on another rank",
                    f"falling back to {ckpt_dir / nxt}" if nxt else "no older checkpoint is kept")
    raise CheckpointError(f"no readable checkpoint in {ckpt_dir} (tried {', '.join(tried) or 'none'}): "
                          f"delete the directory to start over, or restore the files")
