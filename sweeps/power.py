"""Power of an allocation sweep: the smallest gain a design detects, and the seeds an effect needs.

The gain is a contrast between two sampled rho values (rho = 1 and the optimum); with a seed block
its variance is sigma^2 (1/n_ref + 1/n_best), n = finished seeds at each. A two-sided test at level
alpha = 1 - level with ``dof`` noise degrees of freedom detects a gain delta with 80% power when
``delta >= (t_{1-alpha/2, dof} + t_{0.8, dof}) * se`` (the usual minimum detectable effect). With one
seed the noise comes from a quadratic's residuals (n_rho - 3 dof): the t quantiles then dominate, which
is why one seed rarely detects anything. The verdict also needs an F test over all rho and a located
optimum, so this is a lower bound on what a "U" needs; the simulation in tests/test_fit_power.py
measures how close it is.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Sequence

from scipy.special import stdtrit

POWER = 0.8
PAPER_GAIN = 0.014  # nats: the paper's gain at 6e20 FLOPs, about the seed noise at small scale
MAX_SEEDS = 64


def noise_dof(n_rho: int, n_seeds: int) -> int:
    """Noise degrees of freedom of a complete design (see sweeps.ucurve: pure error from 2 seeds on,
    else quadratic residuals)."""
    return (n_rho - 1) * (n_seeds - 1) if n_seeds >= 2 else n_rho - 3


def mde_of(sigma: float, dof: int, seeds_per_rho: Sequence[int], level: float = 0.95) -> float:
    """Smallest gain (nats) detected with 80% power; NaN when the noise is not estimable."""
    if not (dof >= 1 and math.isfinite(sigma) and seeds_per_rho):
        return math.nan
    n = sorted(seeds_per_rho)
    se = sigma * math.sqrt(1.0 / n[0] + 1.0 / (n[1] if len(n) > 1 else n[0]))
    crit = stdtrit(dof, 1 - (1 - level) / 2) + stdtrit(dof, POWER)  # t quantiles (the ufunc: fast)
    return float(crit * se)


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
