"""The training loop: DeepSpeed engine, exact resume, evaluation, checkpoints, W&B."""
from __future__ import annotations

import logging
import os
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from assembly import build_model, engram_tokenizer_file
from core.distributed import all_reduce_sum
from data_prep.reader import DataError, load_manifest, open_split
from data_prep.verify import verify_data_dir
from models import ModelConfig
from train import checkpoint as ckpt
from train.compile import compile_blocks
from train.data import TrainBatches, eval_windows, run_length
from train.ds_config import deepspeed_config, fp32_grad_accumulation
from train.distributed import DistInfo, barrier, broadcast_object
from train.determinism import apply_determinism
from train.expert_checkpoint import engine_hooks
from train.expert_parallel import (build_shard, built_slices_line, check_expert_parallel, expert_layout,
                                   expert_memory_lines, routed_experts, setup_expert_parallel)
from train.optim import build_optimizer, describe_optimizer, memory_line, optimizer_memory
from train.resume import check_finished, trajectory_settings, vet_settings
from core.fingerprint import fingerprint
from core.partial_init import building
from rundir.files import CHECKPOINTS, FAILED, FINAL, RUN_STATE, atomic_write_json, read_json_object
from rundir.locks import LOCK_FD_ENV, LOCK_NAME, try_lock
from rundir.schema import ConfigError, Config, check, parallel_of
from train.shards import ShardedTables, load_hooks
from train.loop import Diverged, Loop
from train.tracking import Tracker

log = logging.getLogger("train")


VOCAB_PAD_MULTIPLE = 128  # a model vocabulary may pad the data's up to the next multiple of this


class RunLocked(ConfigError):
    """Another live trainer owns the run directory: say so, and write nothing into it."""


def resolve_model_config(cfg: DictConfig, data_dir: Path, data_vocab: int,
                         manifest: Optional[dict] = None) -> ModelConfig:
    """The model config for this data, refusing any data/model tokenizer mismatch before compute.

    The model's vocabulary must be the data's (or it padded to a multiple of 128), and the tokenizer
    Engram compresses for must be the one the data was tokenized with (compared by tokenizer id):
    otherwise a model sized for one tokenizer trains on another's ids, and Engram merges ids as if
    they were the other tokenizer's. ``manifest``: the data dir's, already read (else read here).
    """
    mcfg = ModelConfig.from_dict(cfg.model)
    engram = mcfg.engram
    if engram is not None and engram.tokenizer == "data":  # compress with the tokenizer the data was made with
        manifest = manifest if manifest is not None else load_manifest(data_dir)
        engram.tokenizer = str((data_dir / manifest["tokenizer"]["file"]).resolve())
    padded = -(-data_vocab // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    if not data_vocab <= mcfg.vocab_size <= padded:
        raise ValueError(f"data in {data_dir} uses a {data_vocab}-token vocabulary but model.vocab_size="
                         f"{mcfg.vocab_size} (allowed: {data_vocab}..{padded}, the data's padded to a multiple "
                         f"of {VOCAB_PAD_MULTIPLE}): data and model were made for different tokenizers")
    if engram is not None and engram.tokenizer is not None:
        from data_prep.reader import data_tokenizer_id
        from data_prep.tokenization import tokenizer_id
        from tokenizers import Tokenizer

        data_id = data_tokenizer_id(data_dir, manifest)
        engram_id = tokenizer_id(Tokenizer.from_file(str(engram_tokenizer_file(engram.tokenizer))))
        if engram_id != data_id:
            raise ValueError(f"model.engram.tokenizer={engram.tokenizer!r} (id {engram_id}) is not the tokenizer "
                             f"the data in {data_dir} was made with (id {data_id}): Engram would compress another "
                             f"tokenizer's ids; use engram.tokenizer=data or data tokenized with it")
    if cfg.train.seq_len > mcfg.max_seq_len:
        raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    return mcfg


def stream_fingerprint(data_dir: Path, cfg: DictConfig, manifest: Optional[dict] = None) -> str:
    manifest = manifest if manifest is not None else load_manifest(data_dir)
    shards = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    return fingerprint([shards, cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.seed])


def step_schedule(cfg: DictConfig) -> tuple[int, int]:
    """(optimizer steps, sequences of the last step): ``train.train_tokens`` to the sequence (the last
    step may be short, see train/data.py), else ``train.max_steps`` full steps."""
    t = cfg.train
    if t.train_tokens:
        return run_length(float(t.train_tokens), int(t.seq_len), int(t.global_batch_size), int(t.micro_batch_size))
    return int(t.max_steps), int(t.global_batch_size)  # positive: rundir.schema checked it


def total_steps(cfg: DictConfig) -> int:
    return step_schedule(cfg)[0]


@dataclass
class Prepared:
    """Everything checked before any compute: data, model config, resume point, step count."""
    config: Config  # the typed tree (rundir/schema.py); the model section's tokenizer resolved in mcfg
    run_dir: Path
    ckpt_dir: Path
    train_split: Any
    val_split: Any
    mcfg: ModelConfig
    fingerprints: dict
    run_state: dict
    tags: list  # checkpoint tags to resume from, newest first (empty: a fresh start)
    steps: int
    batches: TrainBatches
    startup: dict = field(default_factory=dict)  # rank 0's read/verify seconds and verification line


def _hold_run_lock(run_dir: Path, dist: DistInfo) -> Optional[int]:
    """Rank 0 takes run_dir/.run.lock for the trainer's life (unless its launcher holds it for us);
    every rank learns the outcome, so a second launch into a live run stops on all ranks at once."""
    fd, held_by_launcher = None, os.environ.get(LOCK_FD_ENV) is not None
    if dist.is_main and not held_by_launcher:
        fd = try_lock(run_dir)
    ok = broadcast_object(held_by_launcher or not dist.is_main or fd is not None)
    if not ok:
        raise RunLocked(f"run_dir {run_dir} is in use by another live trainer ({run_dir / LOCK_NAME}); "
                        f"wait for it, stop it, or use another run_dir")
    return fd


def _read_json(path: Path) -> dict:
    """A run-directory JSON file, or {} if absent; a damaged one is a one-line error naming it."""
    obj, broken = read_json_object(path)
    if broken:
        raise ConfigError(f"{path}: {broken}; repair or delete it")
    return obj or {}


def _check_resume(cfg: DictConfig, p: Prepared, latest: dict, dist: DistInfo) -> None:
    """Layout and trajectory settings of the committed checkpoint against this launch's."""
    ckpt.check_layout(latest.get("layout"), ckpt.run_layout(cfg, dist.world_size), p.ckpt_dir)
    diff = vet_settings(cfg, latest, p.fingerprints, p.run_state["settings"], p.ckpt_dir)
    if diff:
        log.warning("resuming at step %s under changed settings (train.allow_config_change=true): %s",
                    latest.get("step"), "; ".join(diff))
        p.run_state.setdefault("config_changes", []).append({"step": latest.get("step"), "changes": diff})


def _on_main(dist: DistInfo, fn):
    """``fn()`` on rank 0 alone, its result or its exception broadcast: every rank returns or raises the same
    (rank 0's view of the run directory and data is the one all ranks act on)."""
    out, err = None, None
    if dist.is_main:
        try:
            out = fn()
        except Exception as e:  # raised on every rank below, not only here
            err = e
        try:
            pickle.dumps(err)
        except Exception:  # an unpicklable exception would stall the broadcast: send its message
            err = RuntimeError(f"{type(err).__name__}: {err}")
    out, err = broadcast_object((out, err))
    if err is not None:
        raise err
    return out


def _read_start(cfg: DictConfig, run_dir: Path, ckpt_dir: Path) -> dict:
    """Rank 0's start-up reads: run state, finished run, committed checkpoint (the resume point), then the
    manifest (once) and its shards (verified once per manifest, :mod:`data_prep.verify`)."""
    t0 = time.perf_counter()
    start = {"run_state": _read_json(run_dir / RUN_STATE), "final": None}
    if (run_dir / FINAL).exists():
        check_finished(cfg, run_dir, start["run_state"])
        start["final"] = _read_json(run_dir / FINAL)
        return start
    latest = ckpt.read_latest(ckpt_dir)
    if latest is not None and cfg.train.resume == "never":
        raise ConfigError(f"run_dir {run_dir} already holds checkpoints (train.resume=never); use a new run_dir")
    data_dir = Path(cfg.data.dir)
    manifest = load_manifest(data_dir)
    report = verify_data_dir(data_dir, manifest, ["train", "val"])
    return {**start, "latest": latest, "tags": ckpt.candidates(ckpt_dir, latest) if latest is not None else [],
            "manifest": manifest, "verified": report.line(), "read_s": time.perf_counter() - t0}


def _verify_other_nodes(cfg: DictConfig, manifest: dict, dist: DistInfo) -> None:
    """On more than one node, each other node's first rank checks its view of the data too (against the
    record rank 0 wrote: stat calls on a shared file system, a full check of a node-local copy)."""
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size))
    if local_world >= dist.world_size:
        return
    problem = ""
    if dist.local_rank == 0 and not dist.is_main:
        try:
            verify_data_dir(Path(cfg.data.dir), manifest, ["train", "val"])
        except DataError as e:
            problem = str(e)
    if all_reduce_sum(torch.tensor([1.0 if problem else 0.0], device=dist.device)).item():
        raise DataError(problem or "the data dir failed its check on another node (see that node's rank log)")


def prepare(cfg: DictConfig, dist: DistInfo) -> Optional[Prepared]:
    """Validate config, run directory, data and resume point; None when the run already finished."""
    config = check(cfg)
    t, run_dir = cfg.train, Path(cfg.run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    start = _on_main(dist, lambda: _read_start(cfg, run_dir, ckpt_dir))  # the one broadcast of the start state
    run_state, latest = start["run_state"], start.get("latest")
    if start["final"] is not None:
        if dist.is_main:
            print(f"run already completed: val_loss={start['final'].get('val_loss'):.4f} ({run_dir / FINAL})")
        return None
    data_dir, manifest = Path(cfg.data.dir), start["manifest"]
    _verify_other_nodes(cfg, manifest, dist)
    t0 = time.perf_counter()
    train_split, val_split = (open_split(data_dir, s, verify=False, manifest=manifest) for s in ("train", "val"))
    mcfg = resolve_model_config(cfg, data_dir, train_split.vocab_size, manifest)
    try:
        check_expert_parallel(parallel_of(cfg).expert, dist.world_size, routed_experts(mcfg.moe), t.precision, int(t.zero_stage))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fingerprints = {"model_fingerprint": mcfg.fingerprint(),
                    "stream_fingerprint": stream_fingerprint(data_dir, cfg, manifest)}
    steps, last_sequences = step_schedule(cfg)
    batches = TrainBatches(train_split, t.seq_len, t.micro_batch_size, t.global_batch_size,
                           dist.rank, dist.world_size, t.seed, steps, last_sequences)
    eval_windows(val_split, t.seq_len, t.eval_tokens)  # the held-out set can hold one window: fail now, not at the end
    p = Prepared(config, run_dir, ckpt_dir, train_split, val_split, mcfg, fingerprints, run_state, start["tags"], steps,
                 batches, {"read_s": start["read_s"] + time.perf_counter() - t0, "verified": start["verified"]})
    saved_settings = run_state.get("settings")
    p.run_state.update({**fingerprints, "settings": trajectory_settings(cfg)})
    if latest is not None and latest.get("tag"):
        _check_resume(cfg, p, {"settings": saved_settings, **latest}, dist)
    if dist.is_main and (run_dir / FAILED).exists():
        (run_dir / FAILED).unlink()  # this attempt supersedes the recorded failure
    return p


def train(cfg: DictConfig, dist: DistInfo) -> int:
    """Run (or resume) one training run; returns a process exit code."""
    run_dir = Path(cfg.run_dir)
    lock_fd = _hold_run_lock(run_dir, dist)
    try:
        p = prepare(cfg, dist)
        return 0 if p is None else _run(cfg, dist, p)
    finally:
        if lock_fd is not None:
            os.close(lock_fd)


def _loaded_check(cfg: DictConfig, p: Prepared, dist: DistInfo):
    """Vets the meta of the checkpoint actually loaded (an older one, after a fallback, has its own)."""
    def check(meta: dict, where: Path) -> None:
        ckpt.check_layout(meta.get("layout"), ckpt.run_layout(cfg, dist.world_size), where)
        vet_settings(cfg, meta, p.fingerprints, p.run_state["settings"], where)
    return check


def _run(cfg: DictConfig, dist: DistInfo, p: Prepared) -> int:
    started = time.time()
    t = cfg.train
    # ---- model, optimizer, engine -----------------------------------------------------------
    apply_determinism(bool(t.deterministic))
    torch.manual_seed(t.seed)
    t0 = time.perf_counter()
    par, n_routed = parallel_of(cfg), routed_experts(p.mcfg.moe)
    sharded_tables = par.engram_tables == "sharded" and p.mcfg.engram is not None
    ep_layout = expert_layout(par.expert, dist.world_size, n_routed)
    with building(build_shard(ep_layout, n_routed, sharded_tables, dist.rank, dist.world_size)):
        model = build_model(p.mcfg)  # this rank's experts and table rows only, drawn as the whole model's
    built = built_slices_line(model)  # before sharding: what the build itself held
    counts = model.model_counts(t.seq_len)
    setup_expert_parallel(model, ep_layout)  # before the optimizer
    tables = ShardedTables(model, p.config.optim, dist.rank, dist.world_size, dist.device) if sharded_tables else None
    compile_blocks(model, t.compile, dist.device)
    optimizer = build_optimizer(model, p.config.optim)
    optim_lines, optim_mem = describe_optimizer(optimizer), optimizer_memory(optimizer)  # before ZeRO flattens
    optim_lines += built
    optim_lines += expert_memory_lines(model, optimizer, optim_mem, par.expert, dist.world_size, int(t.zero_stage))
    if tables is not None:
        optim_lines, optim_mem = optim_lines + tables.describe(), tables.memory(optim_mem)
    import deepspeed

    t1 = time.perf_counter()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, p.batches.accum_steps))
    p.startup.update(model_s=t1 - t0, engine_s=time.perf_counter() - t1)
    experts = engine_hooks(engine, model, optimizer, ep_layout, t, dist.rank, dist.world_size)
    start_step, meta = 0, {}
    if p.tags:
        t2 = time.perf_counter()
        meta = ckpt.load(engine, p.ckpt_dir, p.tags, dist.device, _loaded_check(cfg, p, dist),
                         load_hooks(tables, model, optimizer), experts)
        p.startup["load_s"] = time.perf_counter() - t2
        start_step = int(meta["step"])
        log.info("resumed from %s at step %d", p.ckpt_dir / ckpt.tag_for(start_step), start_step)

    tracker = _start_tracking(cfg, dist, p, meta, start_step, counts, optim_lines, optim_mem)
    loop = Loop(cfg, dist, p, engine, model, optimizer, tracker, counts, tables)
    loop.experts = experts
    loop.on_first_step = lambda seconds: _log_startup(p.startup, seconds, dist)
    try:
        step = loop.run(start_step)
        return _finish(cfg, dist, p, loop, step, started, optim_mem)
    except Diverged as e:
        loop.progress.close()
        if dist.is_main:
            atomic_write_json(p.run_dir / FAILED, {"status": "diverged", "reason": str(e), "step": loop.step})
        tracker.finish(1)
        raise


def _start_tracking(cfg: DictConfig, dist: DistInfo, p: Prepared, meta: dict, start_step: int, counts,
                    optim_lines: list, optim_mem: dict) -> Tracker:
    """W&B (the checkpoint's run id on resume), run.json, and the start-up lines on rank 0."""
    t = cfg.train
    wandb_id = meta.get("wandb_run_id") or p.run_state.get("wandb_run_id")
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    config_dict["counts"] = {"total_params": counts.total_params, "active_params": counts.active_params,
                             "embedding_params": counts.embedding_params,
                             "flops_per_token": counts.flops_per_token,
                             "flops_per_token_causal": counts.flops_per_token_causal, "total_steps": p.steps,
                             **optim_mem}
    tracker = Tracker(p.run_dir, dict(cfg.logging.wandb), config_dict, wandb_id, dist.is_main, start_step)
    if dist.is_main:
        atomic_write_json(p.run_dir / RUN_STATE, {**p.run_state, "wandb_run_id": tracker.run_id})
        log.info("model: %s non-embedding params (%s active), %.3g train FLOPs/token, %d steps of %d tokens",
                 f"{counts.total_params:,}", f"{counts.active_params:,}", counts.train_flops_per_token, p.steps,
                 t.global_batch_size * t.seq_len)
        for line in [*optim_lines, memory_line(optim_mem)]:
            log.info(line)
    if t.precision == "bf16" and not fp32_grad_accumulation(cfg) and p.batches.accum_steps > 1 and dist.is_main:
        log.warning("bf16 gradients of the %d micro-steps accumulate in bf16 at train.zero_stage=%d (DeepSpeed 0.19 "
                    "accumulates in fp32 only at ZeRO 2, or ZeRO 1 without Muon); they are reduced in fp32",
                    p.batches.accum_steps, t.zero_stage)
    return tracker


def _log_startup(times: dict, first_step_s: float, dist: DistInfo) -> None:
    """The start-up timing line (rank 0; every rank's own in its rank log at debug level)."""
    line = (f"start-up: read/verify {times['read_s']:.2f} s ({times['verified']}), model build "
            f"{times['model_s']:.2f} s, engine init {times['engine_s']:.2f} s, "
            + (f"checkpoint load {times['load_s']:.2f} s, " if "load_s" in times else "")
            + f"first step {first_step_s:.2f} s")
    log.log(logging.INFO if dist.is_main else logging.DEBUG, line)


def _finish(cfg: DictConfig, dist: DistInfo, p: Prepared, loop: Loop, step: int, started: float,
            optim_mem: dict) -> int:
    """Final checkpoint first (an evaluation failure must not cost the trained weights), then eval, final.json."""
    counts, tracker = loop.counts, loop.tracker
    loop.save(step)
    val = loop.evaluate()
    tracker.log({"val/loss": val}, step)
    tokens = p.batches.tokens_through(step)  # exactly the tokens trained (a short last step included)
    final = {"status": "completed", "val_loss": val, "steps": step, "tokens": tokens,
             "train_flops": counts.train_flops_per_token * tokens,
             "flops_per_token": counts.train_flops_per_token, "total_params": counts.total_params,
             "active_params": counts.active_params, "wall_time_s": time.time() - started,
             "wandb_run_id": tracker.run_id, "memory": optim_mem}  # table / optimizer-state bytes
    if dist.is_main:
        atomic_write_json(p.run_dir / FINAL, final)
        tracker.summary({"final/val_loss": val, "final/tokens": final["tokens"],
                         "final/train_flops": final["train_flops"]})
        print(f"final validation loss {val:.4f} after {step} steps ({final['tokens']:,} tokens)")
        if (p.ckpt_dir / ckpt.tag_for(step)).exists():  # a benchmark run writes none
            print(f"checkpoint: {p.ckpt_dir / ckpt.tag_for(step)}")
        if tracker.location:
            print(f"W&B run ({cfg.logging.wandb.mode}): {Path(tracker.location).parent}"
                  f"  (upload with: wandb sync {Path(tracker.location).parent})")
    tracker.finish(0)
    barrier()
    return 0
