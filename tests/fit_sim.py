"""Simulated sweeps for the fit's calibration, gain and power tests: truths, one sweep's draws, and a
module fixture that runs numpy's BLAS on one thread (the fits are small; threads stall on a busy machine)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """numpy's OpenBLAS on one thread for this module (threadpoolctl is not installed: ctypes does it)."""
    maps = Path("/proc/self/maps")  # Linux; elsewhere the fits just run on the default threads
    libs = {line.split()[-1] for line in (maps.read_text().splitlines() if maps.exists() else [])
            if "openblas" in line and ".so" in line}
    calls = []
    for path in libs:
        lib = ctypes.CDLL(path)
        for get, put in (("scipy_openblas_get_num_threads64_", "scipy_openblas_set_num_threads64_"),
                         ("openblas_get_num_threads", "openblas_set_num_threads")):
            if hasattr(lib, get) and hasattr(lib, put):
                calls.append((getattr(lib, put), int(getattr(lib, get)())))
                getattr(lib, put)(1)
                break
    yield
    for put, previous in calls:
        put(previous)


def simulate(truth, grid, seeds, rng, noise, seed_sd):
    """One sweep: every rho x seed, independent noise plus a per-seed shift shared by every rho."""
    rho, seed = np.repeat(grid, seeds), np.tile(np.arange(seeds), len(grid))
    return rho, seed, truth(rho) + rng.normal(0, noise, rho.size) + rng.normal(0, seed_sd, seeds)[seed]


def quadratic(r):
    return 3.0 + 0.3 * (np.asarray(r) - 0.75) ** 2


def lopsided(r):
    """A sum of power laws in the expert share and the table share; optimum 0.794, gain 0.020 nats."""
    r = np.asarray(r)
    return 3.0 + 0.134 * (r ** -0.5 + 0.3 * (1.15 - r) ** -0.5)
