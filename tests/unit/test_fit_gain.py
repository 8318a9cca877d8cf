"""The gain point (a one-sided lower bound of the gain's band, sweeps.analysis.ucurve) lies inside its own interval
in every sweep: any level (also below the point's own 75%), flat, U-shaped and monotone truths, 1-3 seeds,
failed runs. Each assertion prints how many of the simulated sweeps broke it."""
from __future__ import annotations

import numpy as np
import pytest

from sweeps.analysis.ucurve import fit_u_curve
from fit_sim import lopsided, one_blas_thread, quadratic, simulate  # noqa: F401  (autouse)

N_SWEEPS = 120


def flat(r):
    return 3.0 + 0.0 * np.asarray(r)


def falling(r):
    return 3.0 - 0.02 * np.asarray(r)


@pytest.mark.parametrize("truth", [flat, quadratic, lopsided, falling], ids=lambda f: f.__name__)
def test_gain_point_lies_inside_its_interval(truth):
    rng = np.random.default_rng(3)
    outside, below_zero = [], 0
    for t in range(N_SWEEPS):
        n_rho, seeds, level = int(rng.integers(4, 10)), int(rng.integers(1, 4)), float(rng.choice([0.5, 0.8, 0.95]))
        rho, seed, y = simulate(truth, np.linspace(0.2, 1.0, n_rho), seeds, rng, rng.uniform(0.002, 0.05), 0.02)
        if rng.random() < 0.3:
            y[rng.integers(y.size)] = np.nan  # a failed run
        f = fit_u_curve(rho, y, seed, n_boot=300, level=level, seed=t)
        if f.verdict == "insufficient":
            continue
        lo, hi = f.gain_vs_moe_ci
        if not lo <= f.gain_vs_moe <= hi:
            outside.append((n_rho, seeds, level, round(f.gain_vs_moe, 5), round(lo, 5), round(hi, 5)))
        below_zero += f.gain_vs_moe < 0
    msg = f"{truth.__name__}: gain point outside its interval in {len(outside)} of {N_SWEEPS} sweeps {outside[:3]}"
    print(msg)
    assert not outside and below_zero == 0, msg
