"""Power by simulation: a quadratic U-curve whose gain equals the design's ``mde`` gets the verdict "U"
in about 80% of sweeps (the mde is what the verdict's own test can detect, not a pointwise t bound)."""
from __future__ import annotations

import numpy as np
import pytest

from sweeps.analysis.power import mde_of, noise_dof
from sweeps.analysis.ucurve import fit_u_curve
from fit_sim import one_blas_thread, simulate  # noqa: F401  (fixture used by autouse)

N_SWEEPS = 150  # binomial sd 3.3% at 80%


@pytest.mark.parametrize("n_rho,seeds,noise", [(5, 1, 0.01), (5, 2, 0.01), (9, 2, 0.02), (5, 5, 0.005)])
def test_gain_of_mde_is_detected_with_about_80_percent_power(n_rho, seeds, noise):
    mde = mde_of(noise, noise_dof(n_rho, seeds), [seeds] * n_rho, 0.95)
    curv = mde / (1.0 - 0.75) ** 2  # optimum 0.75 inside [0.2, 1]: L(1) - L(0.75) = mde

    def truth(r):
        return 3.0 + curv * (np.asarray(r) - 0.75) ** 2

    rng = np.random.default_rng(11 * n_rho + seeds)
    grid = np.linspace(0.2, 1.0, n_rho)
    verdicts = []
    for t in range(N_SWEEPS):
        rho, seed, y = simulate(truth, grid, seeds, rng, noise, 0.02)
        verdicts.append(fit_u_curve(rho, y, seed, n_boot=400, level=0.95, seed=t).verdict)
    rate = verdicts.count("U") / N_SWEEPS
    msg = f"{n_rho} rho x {seeds} seed(s), noise {noise}: gain = mde = {mde:.4f} nats gives U in {rate:.1%}"
    print(msg)
    assert 0.7 <= rate <= 0.97, msg
