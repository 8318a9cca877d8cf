"""Power of an allocation sweep: the smallest gain a design detects, and the seeds an effect needs.

The gain is a contrast between two sampled rho values (rho = 1 and the optimum); with a seed block
its variance is sigma^2 (1/n_ref + 1/n_best), n = finished seeds at each. The verdict "U" needs the lower
end of the gain's interval above zero, and that end comes from a simultaneous band over rho (sweeps.analysis.ucurve):
``D_hat - c se`` with c the band's critical value, above the pointwise t quantile because the optimum is
not known in advance. So a gain delta is detected with 80% power when ``delta >= (c + t_{0.8, dof}) se``.
c depends on the number of rho values, the noise dof and the level only (equally spaced rho, balanced
seeds; a fit uses its own draws' c). With one seed the noise comes from a quadratic's residuals (n_rho - 3
dof): c and the t quantile then dominate, which is why one seed rarely detects anything. The verdict also
needs an F test and a rho* interval inside the range: simulated quadratic U-curves with gain = mde get
"U" in the share printed by tests/unit/test_fit_power.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from functools import lru_cache

import numpy as np
from scipy.special import stdtrit

from sweeps.analysis.fitutil import spline_matrix

POWER = 0.8
PAPER_GAIN = 0.014  # nats: the paper's gain at 6e20 FLOPs, about the seed noise at small scale
MAX_SEEDS = 64
GRID_POINTS = 321  # the fit's evaluation grid over the sampled range (sweeps.analysis.ucurve)
BAND_STRIDE = 4  # the gain's simultaneous band uses every 4th grid point: D is smooth, its max barely moves
CRIT_DRAWS = 20000


@lru_cache(maxsize=256)
def band_crit(n_rho: int, dof: int, level: float = 0.95) -> float:
    """Critical value c of the gain's simultaneous band for n_rho equally spaced rho (balanced seeds):
    the level-quantile of ``max_r |D_draw(r) - D_hat(r)| / se(r)`` under the multivariate t (fixed seed)."""
    levels = np.linspace(0.0, 1.0, n_rho)
    W = spline_matrix(levels, np.linspace(0.0, 1.0, GRID_POINTS)[::BAND_STRIDE])  # [G', R]
    C = W[-1][None, :] - W[:-1]  # [G'-1, R]: L(ref = top) - L(r), the zero row dropped
    rng = np.random.default_rng(0)
    z = rng.standard_normal((CRIT_DRAWS, n_rho)) * np.sqrt(dof / rng.chisquare(dof, size=(CRIT_DRAWS, 1)))
    return float(np.quantile(np.max(np.abs(z @ C.T) / np.linalg.norm(C, axis=1), axis=1), level))


def noise_dof(n_rho: int, n_seeds: int) -> int:
    """Noise degrees of freedom of a complete design (see sweeps.analysis.ucurve: pure error from 2 seeds on,
    else quadratic residuals)."""
    return (n_rho - 1) * (n_seeds - 1) if n_seeds >= 2 else n_rho - 3


def mde_of(sigma: float, dof: int, seeds_per_rho: Sequence[int], level: float = 0.95,
           crit: Optional[float] = None) -> float:
    """Smallest gain (nats) detected with 80% power; NaN when the noise is not estimable. ``crit``: the
    fit's own band critical value (default: ``band_crit`` of an equally spaced, balanced design)."""
    if not (dof >= 1 and math.isfinite(sigma) and len(seeds_per_rho) >= 2):
        return math.nan
    n = sorted(seeds_per_rho)
    se = sigma * math.sqrt(1.0 / n[0] + 1.0 / n[1])
    c = band_crit(len(n), int(dof), float(level)) if crit is None else crit
    return float((c + stdtrit(dof, POWER)) * se)


def seeds_needed(effect: float, sigma: float, n_rho: int, level: float = 0.95) -> Optional[int]:
    """Fewest seeds per rho whose design detects ``effect`` at 80% power (None: more than MAX_SEEDS)."""
    for s in range(1, MAX_SEEDS + 1):
        dof = noise_dof(n_rho, s)
        if dof >= 1 and mde_of(sigma, dof, [s] * n_rho, level) <= effect:
            return s
    return None


def noise_from_earlier(out: Path, family: str) -> Optional[tuple[float, int]]:
    """(sigma, dof) pooled over finished allocation sweeps of ``family`` under ``out`` (None: none yet)."""
    ss, dofs = 0.0, 0
    for path in sorted(Path(out).glob(f"{family}-*/summary.json")):
        try:
            fit = (json.loads(path.read_text()) or {}).get("fit") or {}
        except (OSError, ValueError):
            continue
        sigma, dof = fit.get("sigma"), fit.get("sigma_dof") or 0
        if sigma is not None and dof >= 1 and math.isfinite(sigma):
            ss, dofs = ss + sigma * sigma * dof, dofs + dof
    return (math.sqrt(ss / dofs), dofs) if dofs else None


def power_lines(sigma: Optional[float], source: str, n_rho: int, n_seeds: int, level: float = 0.95) -> list[str]:
    """The dry run's power report: what this design can detect and what the paper's gain needs."""
    if sigma is None:
        return ["power: no noise level known (pass --noise SD, or finish a sweep of this family in --out first)"]
    dof = noise_dof(n_rho, n_seeds)
    head = f"power ({source} noise sd {sigma:.4g} nats, {n_rho} rho x {n_seeds} seed(s), {level:.0%} level):"
    mde = mde_of(sigma, dof, [n_seeds] * n_rho, level) if dof >= 1 else math.nan
    lines = [head, f"  smallest gain detectable at 80% power: {mde:.4f} nats" if math.isfinite(mde) else
             f"  no noise degrees of freedom with {n_rho} rho x {n_seeds} seed(s): the sweep cannot give a verdict"]
    need = seeds_needed(PAPER_GAIN, sigma, n_rho, level)
    lines.append(f"  seeds per rho for a {PAPER_GAIN}-nat gain: "
                 + (str(need) if need else f"more than {MAX_SEEDS}"))
    return lines
