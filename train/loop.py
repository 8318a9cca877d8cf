"""The optimizer-step loop: steps that never wait on the device, logging once per interval.

On a GPU every value read back to the host (``.item()``, ``.cpu()``, a Python ``if`` on a tensor)
stalls the host until the device has caught up, and the host can no longer queue the next step's
kernels ahead. The loop therefore keeps everything it tracks on the device between log steps:

* the step's loss (and aux loss) accumulate in a device tensor, all-reduced on the device in the
  model's one collective of the step (with the MoE layers' token counts);
* divergence is a device flag (loss not finite or above ``train.max_loss``) with the first step it
  happened at, read at every log step and before every evaluation and checkpoint, so a diverged
  state is never saved; a run stops at most ``log_interval`` steps after its loss went bad;
* the gradient norm is read from the engine where DeepSpeed computes it (ZeRO 1/2, bf16) and
  computed on the device from the gradients otherwise (fp32 ZeRO-0, where DeepSpeed reports none),
  on log steps only; under Muon at ZeRO 1/2 DeepSpeed's norm is over the orthogonalised updates
  (about sqrt(min(out, in)) per matrix, whatever the gradient), so it is logged as
  ``train/update_norm`` and no ``train/grad_norm`` is claimed (the raw norm never leaves DeepSpeed's
  backward epilogue; sharded Engram tables' gradient norm, outside the engine, is then logged apart as
  ``train/table_grad_norm``);
* micro-batches are read ahead by a thread (pinned on a GPU) and copied without blocking.

``train/tokens_per_s`` (and MFU from it) counts training time only: time spent evaluating or writing
checkpoints inside a window is taken out of it.
"""
from __future__ import annotations

import logging
import math
import time

import torch

from rundir.schema import parallel_of
from train import checkpoint as ckpt
from train.data import Prefetcher
from train.distributed import maybe_inject_fault
from train.evaluate import evaluate
from train.expert_parallel import expert_group, grad_norm
from train.hardware import peak_flops
from train.optim import set_lr
from train.schedule import lr_factor
from train.tracking import Progress

log = logging.getLogger("train")


class Diverged(RuntimeError):
    pass


def norm_key(optim_kind: str, zero_stage: int) -> str:
    """The name of the norm DeepSpeed reports: under Muon at ZeRO 1/2 it is over Muon's updates."""
    return "train/update_norm" if optim_kind == "muon" and zero_stage > 0 else "train/grad_norm"


class Loop:
    """One run's steps, their logging, periodic evaluation and checkpoints (see the module docstring)."""

    def __init__(self, cfg, dist, p, engine, model, optimizer, tracker, counts, tables=None):
        """``tables``: a train.shards.ShardedTables (sharded Engram tables: their own clip, step, files)."""
        self.cfg, self.t, self.dist, self.p, self.tables = cfg, cfg.train, dist, p, tables
        # a forward is a collective (sharded table lookups, expert-parallel all-to-alls): evaluation in lockstep
        self.collective_forward = tables is not None or parallel_of(cfg).expert > 1
        self.engine, self.model, self.optimizer, self.tracker, self.counts = engine, model, optimizer, tracker, counts
        self.peak = peak_flops(dist.device, cfg.logging.get("peak_tflops"))
        self.base_lr = float(cfg.optim.lr)
        self.step = 0
        self.progress = Progress(False, p.steps, 0, self.t.log_interval)  # replaced by run()
        self._bad_step = torch.full((), -1, dtype=torch.long, device=dist.device)  # first diverged step
        self._bad_loss = torch.zeros((), dtype=torch.float64, device=dist.device)
        # DeepSpeed computes the norm itself under ZeRO 1/2 and its bf16 optimizer; plain fp32 ZeRO-0 does not.
        self._own_grad_norm = int(self.t.zero_stage) == 0 and self.t.precision == "fp32"
        # Muon at ZeRO 1/2: DeepSpeed orthogonalises the gradient while it fills the partition, so its
        # norm is over Muon's updates (and the Adam groups' gradients): logged by that name, not as grad_norm
        self._norm_key = norm_key(cfg.optim.kind, int(self.t.zero_stage))
        self._grad_norm = None
        self.experts = None  # train.expert_checkpoint.ExpertCheckpoint (set by the trainer)
        self.on_first_step = None  # called with the first step's seconds (the trainer's start-up timing line)

    def checkpoint_meta(self, step: int) -> dict:
        return {**self.p.fingerprints, "settings": self.p.run_state["settings"], "step": step,
                "layout": ckpt.run_layout(self.cfg, self.dist.world_size),
                "wandb_run_id": self.tracker.run_id, "tokens": self.p.batches.tokens_through(step)}

    def save(self, step: int) -> None:
        self.check_diverged()
        ckpt.save(self.engine, self.p.ckpt_dir, step, self.checkpoint_meta(step), self.dist.is_main,
                  self.t.keep_checkpoints, self.tables.save if self.tables is not None else None, self.experts)

    def evaluate(self) -> float:
        self.check_diverged()
        t, d = self.t, self.dist
        return evaluate(self.engine, self.p.val_split, t.seq_len, t.eval_tokens, t.micro_batch_size, d.rank,
                        d.world_size, d.device, lockstep=self.collective_forward)

    def is_log_step(self, step: int) -> bool:
        """``step`` counts completed steps (1-based)."""
        return step % self.t.log_interval == 0 or step == self.p.steps

    def one_step(self, step: int, data: Prefetcher) -> tuple[torch.Tensor, float, object]:
        """Forward/backward over the accumulation micro-steps and the optimizer step.
        Returns (loss_vec [2] device tensor: mean ce and aux loss over ranks, lr, last output)."""
        o, b, d = self.cfg.optim, self.p.batches, self.dist
        factor = lr_factor(step, self.p.steps, o.schedule, o.warmup_steps, o.min_lr_ratio, o.decay_frac)
        lr = set_lr(self.optimizer, self.base_lr, factor)
        if self.tables is not None:
            set_lr(self.tables.optimizer, self.base_lr, factor)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=d.device)  # [ce, aux]
        for micro in range(b.accum_steps):
            maybe_inject_fault(d.rank, step)
            x, y = data.get(step, micro)
            weight = b.loss_weight(step, micro)  # 1 except on a short last step
            out = self.engine(x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True))
            self.engine.backward(out.loss if weight == 1 else out.loss * weight)
            last = micro == b.accum_steps - 1
            if last and self.tables is not None:  # the engine does not see the shards: clip both here
                params = list(self.model.parameters()) if self._own_grad_norm else []  # else: the shards' alone
                engine_norm = grad_norm(params, expert_group(self.model)) if params else None  # EP-exact
                self._grad_norm = self.tables.clip_(params, engine_norm, float(self.t.grad_clip or 0.0))
            elif last and self._own_grad_norm and self.is_log_step(step + 1):
                # averaged, before clipping
                self._grad_norm = grad_norm(self.model.parameters(), expert_group(self.model))
            self.engine.step()
            if last and self.tables is not None:
                self.tables.step()
            loss_sum[0] += weight * out.ce_loss.detach().double()
            if out.aux_loss is not None:
                loss_sum[1] += weight * out.aux_loss.detach().double()
        loss_vec = self.model.on_optimizer_step(loss_sum) / (b.accum_steps * d.world_size)  # one collective
        self._flag_divergence(loss_vec[0], step + 1)
        return loss_vec, lr, out

    def _flag_divergence(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss) | (loss > float(self.t.max_loss))
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, torch.full_like(self._bad_step, step), self._bad_step)
        self._bad_loss = torch.where(first, loss, self._bad_loss)

    def check_diverged(self) -> None:
        """Read the divergence flag (a host sync): at log steps, before evaluations and checkpoints."""
        bad_step = int(self._bad_step.item())
        if bad_step >= 0:
            raise Diverged(f"training loss {self._bad_loss.item()} at step {bad_step} "
                           f"(limit train.max_loss={self.t.max_loss})")

    def log_step(self, step: int, loss_vec: torch.Tensor, lr: float, out, window: list) -> None:
        t = self.t
        window[1] += self.p.batches.sequences_in(step - 1) * t.seq_len
        self.progress.update(step)
        if not self.is_log_step(step):
            return
        self.check_diverged()
        loss_host = loss_vec.tolist()  # waits for the device: the window's time below is honest
        tps = window[1] / max(time.time() - window[0], 1e-9)
        metrics = {"train/loss": loss_host[0], "train/lr": lr, "train/tokens": self.p.batches.tokens_through(step),
                   "train/tokens_per_s": tps, "train/epoch": self.p.batches.epochs_at(step), **self._norms()}
        if out.aux_loss is not None:
            metrics["train/aux_loss"] = loss_host[1]
        if self.peak:
            metrics["perf/mfu"] = self.counts.train_flops_per_token_causal * tps / (self.peak * self.dist.world_size)
        metrics.update(self.model.metrics())
        self.tracker.log(metrics, step)
        self.progress.report(step, loss_host[0], lr, tps)
        window[:] = [time.time(), 0]

    def _norms(self) -> dict[str, float]:
        """The log step's norm metrics (reads the device). Sharded tables' gradients are not in the engine's
        norm: joined to a gradient norm, logged apart from Muon's update norm (not a gradient's)."""
        def num(x) -> float:
            return float(x) if x is not None else math.nan

        if self._own_grad_norm:
            return {"train/grad_norm": num(self._grad_norm)}
        norm = self.engine.get_global_grad_norm()
        if self.tables is None:
            return {self._norm_key: num(norm)}
        if self._norm_key == "train/update_norm":
            return {"train/update_norm": num(norm), "train/table_grad_norm": num(self._grad_norm)}
        return {"train/grad_norm": math.hypot(float(norm), float(self._grad_norm)) if norm is not None else math.nan}

    def _periodic(self, step: int, window: list) -> None:
        """Evaluation and checkpoint at their intervals; their time is taken out of the throughput window."""
        evaluate = step % self.t.eval_interval == 0 and step < self.p.steps
        save = step % self.t.ckpt_interval == 0 and step < self.p.steps
        if not (evaluate or save):
            return
        self.check_diverged()  # waits for the queued training work first: that time stays in the window
        t0 = time.time()
        if evaluate:
            val = self.evaluate()
            self.tracker.log({"val/loss": val}, step)
            log.info("step %d: val_loss %.4f", step, val)
        if save:
            self.save(step)
        window[0] += time.time() - t0

    def run(self, start_step: int) -> int:
        t, steps = self.t, self.p.steps
        self.progress = Progress(self.dist.is_main and bool(t.progress), steps, start_step, t.log_interval)
        self.engine.train()
        data = Prefetcher(self.p.batches, start_step, steps, pin=self.dist.device.type == "cuda")
        window = [time.time(), 0]  # [start time, tokens] of the throughput window
        self.step = start_step
        try:
            while self.step < steps:
                loss_vec, lr, out = self.one_step(self.step, data)
                self.step += 1
                if self.step == start_step + 1 and self.on_first_step is not None:
                    if self.dist.device.type == "cuda":
                        torch.cuda.synchronize(self.dist.device)  # once: the first step's real duration
                    self.on_first_step(time.time() - window[0])
                self.log_step(self.step, loss_vec, lr, out, window)
                self._periodic(self.step, window)
        finally:
            data.close()
        self.check_diverged()
        self.progress.close()
        return self.step
