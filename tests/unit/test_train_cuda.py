"""The trainer's step on a GPU (skipped without one; benchmarks/gpu_check.sh runs it): the CPU no-sync
tests (test_train_nosync.py) patch the Python-level reads (``.item()``, ``.cpu()``, ...), which misses a
sync inside a torch op (``torch.bincount`` or ``torch.nonzero`` on CUDA wait for the device without any
Python read). Here CUDA's own sync debug mode reports every synchronising call of whole training steps of
an MoE (grouped_mm) + Engram model in the gpu family's mode (bf16, ZeRO 1, NCCL at world size 1), each
named by the Python line that made it: none may come from this project's code, and DeepSpeed's optimizer
step may read its invalid-norm flag and clip coefficient (two a step, as the CPU count found)."""
from __future__ import annotations

import warnings

import pytest
import torch
from hydra import compose, initialize_config_dir

from sync_guard import package_of
from trainer_utils import REPO, TINY_ENGRAM, TINY_MODEL, TINY_TRAIN

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
              pytest.mark.usefixtures("one_thread")]
WARM_UP, STEPS = 2, 6  # the first steps may sync once (lazy initialisation, allocator growth)


def test_cuda_training_steps_sync_only_in_deepspeeds_optimizer_step(tiny_data, tmp_path, monkeypatch,
                                                                     inprocess_dist):
    from train import loop as loop_mod
    from train.trainer import train

    assert inprocess_dist.device.type == "cuda"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    moe = ["model=moe", "model.moe.n_routed_experts=8", "model.moe.expert_hidden=32", "model.moe.impl=grouped_mm"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"data.dir={tiny_data}", f"run_dir={run_dir}", *TINY_MODEL, *TINY_TRAIN, *TINY_ENGRAM, *moe,
            "train.precision=bf16", "train.zero_stage=1", f"train.max_steps={STEPS}", f"train.log_interval={STEPS}",
            "train.eval_interval=100", "train.ckpt_interval=100"])
    one_step, seen = loop_mod.Loop.one_step, []

    def watched(self, step, data):
        if step < WARM_UP:
            return one_step(self, step, data)
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                out = one_step(self, step, data)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        seen.extend((step, package_of(w.filename), f"{w.filename}:{w.lineno}") for w in got
                    if "synchroniz" in str(w.message))
        return out

    monkeypatch.setattr(loop_mod.Loop, "one_step", watched)
    assert train(cfg, inprocess_dist) == 0
    ours = [s for s in seen if s[1] == "project"]
    assert not ours, f"device syncs in this project's step code: {ours}"
    deepspeed = [s for s in seen if s[1] == "deepspeed"]
    assert len(deepspeed) <= 2 * (STEPS - WARM_UP), f"DeepSpeed's step syncs more than twice a step: {deepspeed}"
    assert not [s for s in seen if s[1] == "torch"], f"syncs inside torch code: {seen}"
