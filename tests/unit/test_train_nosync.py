"""The training step issues no host sync between log steps: the loss, the divergence flag and the
gradient norm stay on the device, and are read once per log interval (issue: training speed).

The real trainer runs in this process with every Tensor -> host conversion patched to raise inside
``Loop.one_step`` (batch copy, forward and backward through the engine, loss and divergence
bookkeeping, gradient norm, balancing hooks) and, on steps that neither log, evaluate nor checkpoint,
in the rest of the loop's iteration (``Loop.log_step``, ``Loop._periodic``), on a dense + Engram
model, and on an MoE + Engram model whose experts run ``torch._grouped_mm`` (group offsets on the device, the GPU path). Run unguarded: MoE's
``batched`` CPU path, which slices by group sizes on the host by construction (its dispatch and balancing:
tests/unit/test_moe_nosync.py), and the engine's optimizer step, DeepSpeed's code: its host reads there
are counted instead, by who asks. torch's Adam reads its step counters (host tensors: no device sync);
DeepSpeed reads device norms and overflow flags: in bf16 at ZeRO 0 (FP16_UnfusedOptimizer) one check per
parameter tensor every step (47 per step on the tiny model), at ZeRO 1 two per step (BF16_Optimizer:
the invalid-norm check and the clip coefficient), which is why the gpu family trains bf16 at ZeRO 1.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from sync_guard import allow_sync, count_host_syncs, no_host_sync
from trainer_utils import REPO, TINY_ENGRAM as ENGRAM, TINY_MODEL, TINY_TRAIN
from train import loop as loop_mod

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_in_process(cfg_overrides, monkeypatch, dist, engine_syncs: dict | None = None):
    """Train with ``Loop.one_step`` guarded; the engine's optimizer step runs unguarded, its host reads
    counted into ``engine_syncs`` (by method) when given."""
    from train.trainer import train

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=cfg_overrides)
    guarded = {"steps": 0, "between": 0}
    one_step, log_step, periodic = loop_mod.Loop.one_step, loop_mod.Loop.log_step, loop_mod.Loop._periodic

    def step_without_sync(self, step, data):
        with no_host_sync():
            out = one_step(self, step, data)
        guarded["steps"] += 1
        return out

    def log_without_sync(self, step, *a):  # the rest of the loop's iteration: guarded unless it logs
        if self.is_log_step(step):
            return log_step(self, step, *a)
        with no_host_sync():
            log_step(self, step, *a)
        guarded["between"] += 1

    def periodic_without_sync(self, step, window):  # guarded unless an evaluation or checkpoint is due
        if step % self.t.eval_interval == 0 or step % self.t.ckpt_interval == 0:
            return periodic(self, step, window)
        with no_host_sync():
            periodic(self, step, window)

    def optimizer_step(self, *a, **k):
        with allow_sync(), count_host_syncs(engine_syncs if engine_syncs is not None else {}):
            return engine_step(self, *a, **k)

    from deepspeed.runtime.engine import DeepSpeedEngine

    engine_step = DeepSpeedEngine.step
    monkeypatch.setattr(DeepSpeedEngine, "step", optimizer_step)
    monkeypatch.setattr(loop_mod.Loop, "one_step", step_without_sync)
    monkeypatch.setattr(loop_mod.Loop, "log_step", log_without_sync)
    monkeypatch.setattr(loop_mod.Loop, "_periodic", periodic_without_sync)
    assert train(cfg, dist) == 0
    assert guarded["between"] > 0 or cfg.train.log_interval == 1
    return guarded["steps"]


def test_training_steps_never_read_the_device(tiny_data, tmp_path, monkeypatch, inprocess_dist):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    syncs: dict = {}
    steps = _train_in_process([f"data.dir={tiny_data}", f"run_dir={run_dir}", *TINY_MODEL, *TINY_TRAIN, *ENGRAM,
                               "train.max_steps=8", "train.log_interval=4", "train.eval_interval=100",
                               "train.ckpt_interval=100"], monkeypatch, inprocess_dist, syncs)
    assert steps == 8
    assert "project" not in syncs and "deepspeed" not in syncs, syncs  # fp32 ZeRO 0: only Adam's host counters
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in recs if "train/loss" in r]
    assert [r["step"] for r in logged] == [4, 8]  # read back once per interval
    for r in logged:  # the gradient norm is real in fp32 ZeRO-0 (DeepSpeed reports none there)
        assert math.isfinite(r["train/grad_norm"]) and r["train/grad_norm"] > 0, r


def test_divergence_is_caught_at_the_next_read_and_names_its_step(tiny_data, tmp_path, monkeypatch, inprocess_dist):
    from train.loop import Diverged

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(Diverged, match=r"at step 1 \(limit train.max_loss=0.5\)"):
        _train_in_process([f"data.dir={tiny_data}", f"run_dir={run_dir}", *TINY_MODEL, *TINY_TRAIN,
                           "train.max_steps=8", "train.log_interval=4", "train.max_loss=0.5",
                           "train.eval_interval=100", "train.ckpt_interval=2"], monkeypatch, inprocess_dist)
    assert not (run_dir / "checkpoints" / "latest.json").exists()  # the diverged state was never saved
    assert json.loads((run_dir / "failed.json").read_text())["status"] == "diverged"


def test_moe_training_steps_on_the_grouped_mm_path_never_read_the_device(tiny_data, tmp_path, monkeypatch,
                                                                          inprocess_dist):
    """An MoE + Engram model whose experts run torch._grouped_mm (group offsets on the device, as on a GPU):
    the guarded steps read nothing back either; the load statistics arrive at the log steps."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    moe = ["model=moe", "model.moe.n_routed_experts=8", "model.moe.expert_hidden=32", "model.moe.impl=grouped_mm"]
    steps = _train_in_process([f"data.dir={tiny_data}", f"run_dir={run_dir}", *TINY_MODEL, *TINY_TRAIN, *ENGRAM,
                               *moe, "train.max_steps=4", "train.log_interval=2", "train.eval_interval=100",
                               "train.ckpt_interval=100"], monkeypatch, inprocess_dist)
    assert steps == 4
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    loads = [r for r in logged if any(k.endswith("load_max_over_mean") for k in r)]
    assert [r["step"] for r in loads] == [2, 4]


def test_the_optimizer_step_reads_the_device_at_most_twice_in_bf16_zero1(tiny_data, tmp_path, monkeypatch,
                                                                          inprocess_dist):
    """Host reads inside DeepSpeed's step, per optimizer step, in the gpu family's mode (bf16 ZeRO 1): none
    from this project's code, at most two from DeepSpeed (bf16 ZeRO 0 read 47 per step, one flag per
    parameter tensor; fp32 ZeRO 0, the cpu family: none, in the test above). The gradient norm is real."""
    precision, zero, most = "bf16", 1, 2
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    syncs: dict = {}
    steps = _train_in_process([f"data.dir={tiny_data}", f"run_dir={run_dir}", *TINY_MODEL, *TINY_TRAIN, *ENGRAM,
                               "train.max_steps=4", "train.log_interval=4", "train.eval_interval=100",
                               "train.ckpt_interval=100", f"train.precision={precision}", f"train.zero_stage={zero}"],
                              monkeypatch, inprocess_dist, syncs)
    assert syncs.get("project", 0) == 0, syncs
    assert syncs.get("deepspeed", 0) <= most * steps, syncs
    norms = [json.loads(ln)["train/grad_norm"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
             if "train/grad_norm" in ln]
    assert norms and all(math.isfinite(n) and n > 0 for n in norms), norms


def test_the_gpu_family_trains_in_the_measured_mode():
    from sweeps.planning.families import load_family

    train = load_family("gpu").train
    assert (train["precision"], train["zero_stage"]) == ("bf16", 1)


def test_tokens_per_s_leaves_evaluation_out(tiny_data, tmp_path, monkeypatch, inprocess_dist):
    """The throughput window takes evaluation time out: on a clock where every evaluation lasts 1000 s,
    the logged tokens/s still counts only training time (with the evaluations in, it would be ~0.1 tok/s)."""
    import time as real_time

    class Clock:  # the loop's clock: real time plus the evaluations' simulated 1000 s each
        offset = 0.0

        @classmethod
        def time(cls):
            return real_time.time() + cls.offset

    evaluate = loop_mod.Loop.evaluate

    def slow_evaluate(self):
        Clock.offset += 1000.0
        return evaluate(self)

    monkeypatch.setattr(loop_mod, "time", Clock)
    monkeypatch.setattr(loop_mod.Loop, "evaluate", slow_evaluate)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _train_in_process([f"data.dir={tiny_data}", f"run_dir={run_dir}", *TINY_MODEL, *TINY_TRAIN,
                       "train.max_steps=8", "train.log_interval=4", "train.eval_interval=2",
                       "train.ckpt_interval=100"], monkeypatch, inprocess_dist)
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("val/loss" in r for r in recs) >= 3  # evaluations fell inside both windows
    tps = [r["train/tokens_per_s"] for r in recs if "train/tokens_per_s" in r]
    assert len(tps) == 2 and min(tps) > 100, tps  # a 4-step window of the tiny model: thousands of tok/s
