"""Held-out loss on a fixed set of validation tokens, averaged over all ranks by token count."""
from __future__ import annotations

import torch

from core.distributed import all_reduce_sum
from train.data import eval_batches, eval_windows


@torch.no_grad()
def evaluate(engine, split, seq_len: int, eval_tokens: int, batch_size: int, rank: int, world: int,
             device: torch.device, lockstep: bool = False) -> float:
    """``lockstep``: every rank runs as many forwards as rank 0 (which holds the most windows), a rank out of
    windows a discarded one-sequence batch: sharded Engram lookups and expert-parallel all-to-alls are
    collectives every rank must join."""
    module = engine.module
    was_training = module.training
    module.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # [sum of token losses, tokens]
    done = 0
    for x, y in eval_batches(split, seq_len, eval_tokens, batch_size, rank, world):
        x, y = x.to(device), y.to(device)
        out = engine(x, y)
        total[0] += out.ce_loss.double() * y.numel()
        total[1] += y.numel()
        done += 1
    most = -(-len(range(0, eval_windows(split, seq_len, eval_tokens), world)) // batch_size)  # rank 0's batches
    for _ in range(most - done if lockstep else 0):
        engine(torch.zeros(1, seq_len, dtype=torch.int64, device=device))
    all_reduce_sum(total)
    module.train(was_training)
    return (total[0] / total[1]).item()
