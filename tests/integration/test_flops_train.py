"""The trainer's logged MFU uses the causal FLOP count; final.json keeps the budget's full count."""
from __future__ import annotations

import pytest

from assembly import build_model
from models import ModelConfig


@pytest.mark.slow
def test_trainer_mfu_uses_the_causal_count(tiny_data, tmp_path):
    """The logged MFU is causal training FLOPs x tokens/s / peak; final.json keeps the budget's full count."""
    import json

    from trainer_utils import TINY_MODEL, final, run_train

    run_dir = tmp_path / "run"
    run_train(tiny_data, run_dir, "train.max_steps=4", "train.eval_interval=100", "train.ckpt_interval=100",
              "+logging.peak_tflops=1.0")
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "perf/mfu" in r]
    assert recs
    overrides = dict(kv.split("=", 1) for kv in TINY_MODEL)
    cfg = ModelConfig(**{k.split(".", 1)[1]: int(v) for k, v in overrides.items()})
    mc = build_model(cfg).model_counts(64)
    for r in recs:
        assert r["perf/mfu"] * 1e12 / r["train/tokens_per_s"] == pytest.approx(mc.train_flops_per_token_causal)
    assert final(run_dir)["flops_per_token"] == pytest.approx(mc.train_flops_per_token)

