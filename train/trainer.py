"""The training loop: DeepSpeed engine, exact resume, evaluation, checkpoints, W&B."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data_prep.reader import open_split, load_manifest
from models import ModelConfig, Transformer
from train import checkpoint as ckpt
from train.data import TrainBatches
from train.distributed import DistInfo, all_reduce_sum, barrier
from train.evaluate import evaluate
from train.hardware import peak_flops
from train.optim import build_optimizer, describe_optimizer, memory_line, optimizer_memory, set_lr
from train.schedule import lr_factor
from train.run_files import CHECKPOINTS, FAILED, FINAL, atomic_write_json
from train.tracking import Tracker

log = logging.getLogger("train")


class Diverged(RuntimeError):
    pass


def resolve_model_config(cfg: DictConfig, data_dir: Path, data_vocab: int) -> ModelConfig:
    model_dict = OmegaConf.to_container(cfg.model, resolve=True)
    engram = model_dict.get("engram")
    if engram and engram.get("tokenizer") == "data":  # compress with the tokenizer the data was made with
        tok = load_manifest(data_dir)["tokenizer"]
        engram["tokenizer"] = str((data_dir / tok["file"]).resolve())
    mcfg = ModelConfig.from_dict(model_dict)
    if data_vocab > mcfg.vocab_size:
        raise ValueError(f"data in {data_dir} uses a {data_vocab}-token vocabulary but model.vocab_size="
                         f"{mcfg.vocab_size}")
    if cfg.train.seq_len > mcfg.max_seq_len:
        raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={mcfg.max_seq_len}")
    return mcfg


def stream_fingerprint(data_dir: Path, cfg: DictConfig) -> str:
    manifest = load_manifest(data_dir)
    shards = [s["sha256"] for s in manifest["splits"]["train"]["shards"]]
    blob = json.dumps([shards, cfg.train.seq_len, cfg.train.global_batch_size, cfg.train.seed])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def total_steps(cfg: DictConfig) -> int:
    t = cfg.train
    if t.get("train_tokens"):
        return max(1, math.ceil(float(t.train_tokens) / (t.global_batch_size * t.seq_len)))
    if t.max_steps <= 0:
        raise ValueError(f"train.max_steps must be positive, got {t.max_steps}")
    return int(t.max_steps)


def deepspeed_config(cfg: DictConfig, accum: int) -> dict:
    t = cfg.train
    if t.precision not in ("fp32", "bf16"):
        raise ValueError(f"train.precision must be fp32 or bf16, got {t.precision}")
    if t.zero_stage not in (0, 1, 2):
        raise ValueError(f"train.zero_stage must be 0, 1 or 2, got {t.zero_stage}")
    return {
        "train_batch_size": int(t.global_batch_size),
        "train_micro_batch_size_per_gpu": int(t.micro_batch_size),
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(t.grad_clip or 0.0),
        "zero_optimization": {"stage": int(t.zero_stage)},
        "bf16": {"enabled": t.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def train(cfg: DictConfig, dist: DistInfo) -> int:
    """Run (or resume) one training run; returns a process exit code."""
    started = time.time()
    run_dir = Path(cfg.run_dir)
    ckpt_dir = run_dir / CHECKPOINTS
    t = cfg.train

    # ---- validate everything before any compute ---------------------------------------------
    if (run_dir / FINAL).exists():
        final = json.loads((run_dir / FINAL).read_text())
        if t.resume == "never":
            raise ValueError(f"run_dir {run_dir} already holds a finished run (train.resume=never)")
        if dist.is_main:
            print(f"run already completed: val_loss={final.get('val_loss'):.4f} ({run_dir / FINAL})")
        return 0
    latest = ckpt.read_latest(ckpt_dir)
    if latest is not None and t.resume == "never":
        raise ValueError(f"run_dir {run_dir} already holds checkpoints (train.resume=never); use a new run_dir")
    if t.resume not in ("auto", "never"):
        raise ValueError(f"train.resume must be auto or never, got {t.resume}")

    data_dir = Path(cfg.data.dir)
    train_split = open_split(data_dir, "train")
    val_split = open_split(data_dir, "val")
    mcfg = resolve_model_config(cfg, data_dir, train_split.vocab_size)
    fingerprints = {"model_fingerprint": mcfg.fingerprint(), "stream_fingerprint": stream_fingerprint(data_dir, cfg)}
    if latest is not None:
        ckpt.check_compatible(latest, fingerprints, ckpt_dir)
    steps = total_steps(cfg)
    batches = TrainBatches(train_split, t.seq_len, t.micro_batch_size, t.global_batch_size,
                           dist.rank, dist.world_size, t.seed)
    if dist.is_main and (run_dir / FAILED).exists():
        (run_dir / FAILED).unlink()  # this attempt supersedes the recorded failure

    # ---- model, optimizer, engine -----------------------------------------------------------
    torch.manual_seed(t.seed)
    model = Transformer(mcfg)
    counts = model.model_counts(t.seq_len)
    optimizer = build_optimizer(model, cfg.optim, t)
    optim_lines, optim_mem = describe_optimizer(optimizer), optimizer_memory(optimizer)  # before ZeRO flattens
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, batches.accum_steps))
    start_step, meta = 0, {}
    if latest is not None:
        meta = ckpt.load(engine, ckpt_dir, latest)
        start_step = int(meta["step"])
        log.info("resumed from %s at step %d", ckpt_dir / latest["tag"], start_step)

    run_state_path = run_dir / "run.json"
    run_state = json.loads(run_state_path.read_text()) if run_state_path.exists() else {}
    wandb_id = meta.get("wandb_run_id") or run_state.get("wandb_run_id")
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    config_dict["counts"] = {"total_params": counts.total_params, "active_params": counts.active_params,
                             "embedding_params": counts.embedding_params,
                             "flops_per_token": counts.flops_per_token, "total_steps": steps, **optim_mem}
    tracker = Tracker(run_dir, dict(cfg.logging.wandb), config_dict, wandb_id, dist.is_main, start_step)
    if dist.is_main:
        atomic_write_json(run_state_path, {**run_state, "wandb_run_id": tracker.run_id, **fingerprints})
        log.info("model: %s non-embedding params (%s active), %.3g train FLOPs/token, %d steps of %d tokens",
                 f"{counts.total_params:,}", f"{counts.active_params:,}", counts.train_flops_per_token, steps,
                 t.global_batch_size * t.seq_len)
        for line in [*optim_lines, memory_line(optim_mem)]:
            log.info(line)

    tokens_per_step = t.global_batch_size * t.seq_len
    peak = peak_flops(dist.device, cfg.logging.get("peak_tflops"))
    base_lr = float(cfg.optim.lr)

    def checkpoint_meta(step: int) -> dict:
        return {**fingerprints, "step": step, "wandb_run_id": tracker.run_id, "tokens": step * tokens_per_step}

    def eval_now() -> float:
        return evaluate(engine, val_split, t.seq_len, t.eval_tokens, t.micro_batch_size, dist.rank,
                        dist.world_size, dist.device)

    bar = None
    if dist.is_main and t.get("progress", True):
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    engine.train()
    window_t0, window_tokens = time.time(), 0
    step = start_step
    try:
        while step < steps:
            factor = lr_factor(step, steps, cfg.optim.schedule, cfg.optim.warmup_steps,
                               cfg.optim.min_lr_ratio, cfg.optim.get("decay_frac", 0.2))
            lr = set_lr(optimizer, base_lr, factor)
            loss_sum = torch.zeros(2, dtype=torch.float64)  # [ce, aux]
            for micro in range(batches.accum_steps):
                x, y = batches.get(step, micro)
                out = engine(x.to(dist.device), y.to(dist.device))
                engine.backward(out.loss)
                engine.step()
                loss_sum[0] += out.ce_loss.detach().double().cpu()
                if out.aux_loss is not None:
                    loss_sum[1] += out.aux_loss.detach().double().cpu()
            model.on_optimizer_step()
            step += 1
            loss_vec = all_reduce_sum(loss_sum.to(dist.device)).cpu() / (batches.accum_steps * dist.world_size)
            loss = loss_vec[0].item()
            if not math.isfinite(loss) or loss > t.max_loss:
                raise Diverged(f"training loss {loss} at step {step} (limit train.max_loss={t.max_loss})")
            window_tokens += tokens_per_step
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if step % t.log_interval == 0 or step == steps:
                dt = max(time.time() - window_t0, 1e-9)
                tps = window_tokens / dt
                metrics = {"train/loss": loss, "train/lr": lr, "train/tokens": step * tokens_per_step,
                           "train/tokens_per_s": tps, "train/epoch": batches.epochs_at(step),
                           "train/grad_norm": float(engine.get_global_grad_norm() or 0.0)}
                if out.aux_loss is not None:
                    metrics["train/aux_loss"] = loss_vec[1].item()
                if peak:
                    metrics["perf/mfu"] = counts.train_flops_per_token * tps / (peak * dist.world_size)
                metrics.update(model.metrics())
                tracker.log(metrics, step)
                window_t0, window_tokens = time.time(), 0
            if step % t.eval_interval == 0 and step < steps:
                val = eval_now()
                tracker.log({"val/loss": val}, step)
                log.info("step %d: val_loss %.4f", step, val)
            if step % t.ckpt_interval == 0 and step < steps:
                ckpt.save(engine, ckpt_dir, step, checkpoint_meta(step), dist.is_main, t.keep_checkpoints)
                window_t0 = time.time()  # do not charge checkpoint time to throughput
        if bar is not None:
            bar.close()
        val = eval_now()
        tracker.log({"val/loss": val}, step)
        ckpt.save(engine, ckpt_dir, step, checkpoint_meta(step), dist.is_main, t.keep_checkpoints)
        final = {"status": "completed", "val_loss": val, "steps": step, "tokens": step * tokens_per_step,
                 "train_flops": counts.train_flops_per_token * step * tokens_per_step,
                 "flops_per_token": counts.train_flops_per_token, "total_params": counts.total_params,
                 "active_params": counts.active_params, "wall_time_s": time.time() - started,
                 "wandb_run_id": tracker.run_id}
        if dist.is_main:
            atomic_write_json(run_dir / FINAL, final)
            tracker.summary({"final/val_loss": val, "final/tokens": final["tokens"],
                             "final/train_flops": final["train_flops"]})
            print(f"final validation loss {val:.4f} after {step} steps ({final['tokens']:,} tokens)")
            print(f"checkpoint: {ckpt_dir / ckpt.tag_for(step)}")
            if tracker.location:
                print(f"W&B run ({cfg.logging.wandb.mode}): {Path(tracker.location).parent}"
                      f"  (upload with: wandb sync {Path(tracker.location).parent})")
        tracker.finish(0)
        barrier()
        return 0
    except Diverged as e:
        if bar is not None:
            bar.close()
        if dist.is_main:
            atomic_write_json(run_dir / FAILED, {"status": "diverged", "reason": str(e), "step": step})
        tracker.finish(1)
        raise
