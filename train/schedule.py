"""Learning-rate schedules as pure functions of the step (so a resumed run needs no scheduler state)."""
from __future__ import annotations

import math


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int,
              min_lr_ratio: float, decay_frac: float = 0.2) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based) of ``total_steps``.

    cosine:   linear warmup, then cosine from 1 to min_lr_ratio at the last step.
    wsd:      linear warmup, constant, then linear decay to min_lr_ratio over the last decay_frac.
    constant: linear warmup, then 1.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        span = max(total_steps - 1 - warmup_steps, 1)
        progress = min(max(step - warmup_steps, 0) / span, 1.0)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "wsd":
        decay_steps = max(int(round(decay_frac * total_steps)), 1)
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min((step - decay_start + 1) / decay_steps, 1.0)
        return 1.0 - (1.0 - min_lr_ratio) * progress
    raise ValueError(f"unknown optim.schedule '{schedule}' (expected cosine, wsd or constant)")
