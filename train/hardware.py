"""Peak-throughput figures for MFU.

MFU = train_flops_per_token_causal x tokens/s / (peak x devices): active-parameter FLOPs from the
models' own counts, with causal attention counted as a causal kernel computes it (about half of the
full T x T product that the budget's ``flops_per_token`` counts; see core.accounting).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

# Dense bf16 tensor-core peaks (no sparsity), FLOP/s.
_GPU_PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device: torch.device, override_tflops: Optional[float]) -> Optional[float]:
    """Peak FLOP/s of one device: the configured value, a known GPU, or a rough CPU estimate
    (cores x 2.5 GHz x 32 fp32 FLOP/cycle, i.e. AVX2 FMA on two ports)."""
    if override_tflops:
        return float(override_tflops) * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, val in _GPU_PEAKS.items():
            if key in name:
                return val
        return None
    threads = torch.get_num_threads() or os.cpu_count() or 1
    return threads * 2.5e9 * 32
