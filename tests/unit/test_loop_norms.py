"""Which norm the loop logs under which name: a gradient norm only where it is one (Muon at ZeRO 1/2 hands
DeepSpeed orthogonalised updates, whose norm is logged as train/update_norm), sharded tables' gradient norm
joined to a gradient norm and kept apart from an update norm."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from train.loop import Loop, norm_key


def _loop(kind: str, zero: int, precision: str = "bf16", tables: bool = False, engine_norm=32.0) -> Loop:
    loop = Loop.__new__(Loop)
    loop.t = SimpleNamespace(zero_stage=zero, precision=precision)
    loop._own_grad_norm = zero == 0 and precision == "fp32"
    loop._norm_key = norm_key(kind, zero)
    loop.engine = SimpleNamespace(get_global_grad_norm=lambda: engine_norm)
    loop.tables = object() if tables else None
    loop._grad_norm = torch.tensor(0.5)
    return loop


@pytest.mark.parametrize("kind, zero, precision, tables, want", [
    ("adamw", 1, "bf16", False, {"train/grad_norm": 32.0}),
    ("muon", 0, "fp32", False, {"train/grad_norm": 0.5}),  # the loop's own norm of the gradients
    ("muon", 2, "bf16", False, {"train/update_norm": 32.0}),
    ("muon", 1, "bf16", True, {"train/update_norm": 32.0, "train/table_grad_norm": 0.5}),
    ("adamw", 1, "bf16", True, {"train/grad_norm": math.hypot(32.0, 0.5)}),
])
def test_norms_are_logged_under_what_they_measure(kind, zero, precision, tables, want):
    got = _loop(kind, zero, precision, tables)._norms()
    assert got == pytest.approx(want)

