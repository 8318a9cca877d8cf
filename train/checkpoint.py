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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from core.distributed import all_reduce_sum
from rundir.files import LATEST, atomic_write_json, fsync_dir
from rundir.schema import parallel_of
from train.distributed import barrier
from train.expert_checkpoint import ExpertCheckpoint, saved_layout
from train.zero_state import NotReshardable
from train.safe_load import safe_load

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


def layout(world_size: int, zero_stage: int, engram_tables: str = "replicated", expert: int = 1) -> dict:
    """``expert``: the EP size (``parallel.expert``); a record without it was written at EP = 1."""
    return {"world_size": int(world_size), "zero_stage": int(zero_stage), "engram_tables": engram_tables,
            "expert": int(expert)}


def run_layout(cfg: Any, world_size: int) -> dict:
    """The layout of a run config launched on ``world_size`` ranks: what its checkpoints record and what a
    resume is checked against (one place, so the two cannot disagree)."""
    par = parallel_of(cfg)
    return layout(world_size, cfg.train.zero_stage, par.engram_tables, par.expert)


def check_layout(saved: Optional[dict], now: dict, where: Path) -> None:
    """ZeRO-partitioned optimizer states cannot be read by another world size, stage or EP size
    (DeepSpeed fails with an internal traceback); stage 0 keeps whole states, so its world size may
    change. A checkpoint of an EP > 1 run also holds its experts by global id and, at ZeRO 1/2, every
    rank's partitions as fragments of whole tensors by name (train/expert_checkpoint.py,
    train/zero_state.py), so it resumes at another EP and world size at its own ZeRO stage."""
    if not saved:
        return
    tables = (saved.get("engram_tables", "replicated"), now.get("engram_tables", "replicated"))
    was, now_ep = int(saved.get("expert", 1)), now.get("expert", 1)
    if tables[0] != tables[1] and (tables[0] == "replicated" or now["zero_stage"] != 0
                                   or saved.get("zero_stage") != 0 or was > 1):
        raise CheckpointError(
            f"checkpoint in {where} was written with engram_tables={tables[0]}; this launch has {tables[1]}: "
            f"a sharded checkpoint resumes replicated at ZeRO 0 only and without expert parallelism (its "
            f"table optimizer state is restored by DeepSpeed's load, which an EP checkpoint bypasses), a "
            f"replicated one resumes replicated only")
    if saved.get("zero_stage") == now["zero_stage"] and (
            was > 1 or was == now_ep and (now["zero_stage"] == 0 or saved.get("world_size") == now["world_size"])):
        return
    ep = was > 1 or now_ep > 1

    def describe(lay: dict, expert: int) -> str:
        return f"world_size={lay.get('world_size')} zero_stage={lay.get('zero_stage')}" + (
            f" parallel.expert={expert}" if ep else "")

    raise CheckpointError(
        f"checkpoint in {where} was written with {describe(saved, was)}; this launch has {describe(now, now_ep)}: "
        f"relaunch with the saved layout (resharding is not supported"
        + (": experts reshard at the saved ZeRO stage, from a checkpoint written with parallel.expert > 1)"
           if ep else ")"))


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


@contextmanager
def _dense_layout(engine):
    """DeepSpeed's dense checkpoint files (module on rank 0, ZeRO partitions per rank) even for an engine
    with expert-parallel parameters: its MoE format wants its own MoE layer's key names; the experts
    are saved and restored by train/expert_checkpoint.py instead."""
    moe = getattr(engine, "has_moe_layers", False)
    if moe:
        engine.has_moe_layers = False
    try:
        yield
    finally:
        if moe:
            engine.has_moe_layers = True


@contextmanager
def _partition_files(engine, write: bool):
    """DeepSpeed's ZeRO partition files, or not (an EP run's fragment files hold the same state)."""
    if write:
        yield
        return
    before = engine.save_zero_checkpoint
    engine.save_zero_checkpoint = False
    try:
        yield
    finally:
        engine.save_zero_checkpoint = before


def save(engine, ckpt_dir: Path, step: int, meta: dict, is_main: bool, keep: int,
         save_extra: Optional[Callable[[Path], None]] = None, experts: Optional["ExpertCheckpoint"] = None) -> None:
    """``save_extra(tag_dir)``: every rank's own files besides the engine's (sharded Engram tables);
    ``experts``: an expert-parallel run's expert files, written next to DeepSpeed's (every rank)."""
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        stale = ckpt_dir / tag
        if stale.exists():  # left over by a run killed mid-save: never referenced by latest.json
            shutil.rmtree(stale)
    barrier()
    plan = experts.plan_save() if experts is not None else None  # every rank: agrees the fragment split
    with _dense_layout(engine), _partition_files(engine, plan is None or plan.partition_files):
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"meta": meta}, save_latest=False)
    if save_extra is not None:
        save_extra(ckpt_dir / tag)
    if experts is not None:
        experts.save(ckpt_dir / tag, plan)
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


def _load_one(engine, ckpt_dir: Path, tag: str, hooks: Optional["LoadHooks"] = None,
              experts: Optional["ExpertCheckpoint"] = None) -> dict:
    loader = safe_load
    if hooks is not None and hooks.adapt is not None:
        def loader(path, map_location=None):  # noqa: F811  every file DeepSpeed reads passes through adapt
            return hooks.adapt(safe_load(path, map_location=map_location), Path(path).parent)
    engine.checkpoint_engine.load = loader  # DeepSpeed's own loader uses weights_only=False
    record = saved_layout(ckpt_dir / tag)
    kwargs = experts.load_kwargs(record) if experts is not None else {"load_optimizer_states": True}
    with _dense_layout(engine):
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=False, **kwargs)
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {ckpt_dir / tag}")
    if hooks is not None and hooks.after is not None:
        hooks.after(ckpt_dir / tag)
    if experts is not None and record is not None:
        experts.restore(ckpt_dir / tag, record)
    return client.get("meta", {})


@dataclass
class LoadHooks:
    """What a run with sharded Engram tables adds to a load: ``after(tag_dir)`` reads this rank's shards once
    the engine has loaded; ``adapt(state, tag_dir)`` rewrites a file DeepSpeed read before it sees it."""
    after: Optional[Callable[[Path], None]] = None
    adapt: Optional[Callable[[dict, Path], dict]] = None


def load(engine, ckpt_dir: Path, tags: list[str], device: torch.device,
         check: Callable[[dict, Path], None], hooks: Optional[LoadHooks] = None,
         experts: Optional["ExpertCheckpoint"] = None) -> dict:
    """Load the newest readable checkpoint of ``tags`` (newest first) on every rank; ``check`` vets
    its meta. All ranks agree on the outcome of each try (a file may be bad for one rank only)."""
    tried = []
    for i, tag in enumerate(tags):
        meta, reason, layout_error = {}, None, False
        try:
            meta = _load_one(engine, ckpt_dir, tag, hooks, experts)
        except NotReshardable as e:  # the layout, not damage: no older checkpoint would do better
            reason, layout_error = f"checkpoint {ckpt_dir / tag}: {e}", True
        except CheckpointError as e:
            reason = str(e)
        except Exception as e:  # unpickling / zip / EOF / shape errors: the file is damaged
            empty = "a file ends early (empty or truncated)" if isinstance(e, EOFError) else "no message"
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else empty}"
        bad, layout = all_reduce_sum(torch.tensor([1.0 if reason else 0.0, 1.0 if layout_error else 0.0],
                                                  device=device)).tolist()
        if layout:  # every rank stops, with its own reason or the news that another rank had one
            raise CheckpointError(reason if layout_error else f"checkpoint {ckpt_dir / tag} does not reshard to "
                                  f"this layout (the reason is in another rank's log)")
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
