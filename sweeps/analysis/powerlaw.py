"""Power law ("infinite memory": fixed backbone, Engram slots on a log scale).

``L = a + b (s/s0)^-c`` is fit by variable projection (a, b in closed form for each c; c on a log
grid, refined), and the log-linear form the paper reports, ``L = alpha + beta log10(s)`` (beta = change
in loss per decade of slots), both with residual-bootstrap intervals. A sweep has few points, so the
percentile intervals are *expanded* (Hesterberg 2015): the bootstrap quantiles are read at the normal
tail probability matching Student's t with the residual degrees of freedom.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import norm, t as student_t

from sweeps.analysis.fitutil import check_xy, json_safe


def expanded_quantiles(level: float, dof: int) -> list[float]:
    """Bootstrap quantiles [lo, hi] of an expanded percentile interval: the normal tail probability at
    Student's t critical value for ``dof`` degrees of freedom (the plain percentile interval as dof -> inf)."""
    if dof < 1:
        raise ValueError(f"need >= 1 degree of freedom for an interval, got {dof}")
    tail = float(norm.sf(student_t.isf((1.0 - level) / 2.0, dof)))
    return [tail, 1.0 - tail]


# --------------------------------------------------------------------------------------------------
# Power law and log-linear fits ("infinite memory" mode)
# --------------------------------------------------------------------------------------------------
@dataclass
class PowerLawFit:
    """L(s) = a + b (s / s0)^-c and L(s) = alpha + beta log10(s), with bootstrap intervals."""

    a: float
    b: float
    c: float
    s0: float  # reference slot count (the smallest sampled) that b refers to
    a_ci: list[float]
    c_ci: list[float]
    rmse: float
    alpha: float  # log-linear intercept
    beta: float  # log-linear slope: change in loss per decade of slots
    beta_ci: list[float]
    rmse_loglinear: float
    n_points: int
    n_boot: int
    level: float
    decreasing: bool  # b > 0 and c > 0: more slots lower the loss
    notes: list[str] = field(default_factory=list)

    def predict(self, slots) -> np.ndarray:
        s = np.asarray(slots, dtype=np.float64)
        return self.a + self.b * (s / self.s0) ** (-self.c)

    def predict_loglinear(self, slots) -> np.ndarray:
        return self.alpha + self.beta * np.log10(np.asarray(slots, dtype=np.float64))

    def to_dict(self) -> dict:
        return json_safe(asdict(self))


C_BOUNDS = (1e-3, 4.0)
C_GRID = np.geomspace(C_BOUNDS[0], C_BOUNDS[1], 241)  # log-spaced: neighbours differ by 3.5%


def _sse_over_c(x: np.ndarray, Y: np.ndarray, c: np.ndarray) -> np.ndarray:
    """[B, len(c)] residual sum of squares of y = a + b x^-c with (a, b) solved in closed form."""
    U = x[None, :] ** (-c[:, None])  # [G, n]
    Uc = U - U.mean(axis=1, keepdims=True)
    Yc = Y - Y.mean(axis=1, keepdims=True)  # [B, n]
    suu = np.einsum("gn,gn->g", Uc, Uc)
    sxy = Yc @ Uc.T  # [B, G]
    syy = np.einsum("bn,bn->b", Yc, Yc)
    return np.maximum(syy[:, None] - sxy**2 / np.maximum(suu, 1e-300)[None, :], 0.0)


def _ab_for_c(x: np.ndarray, Y: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form (a, b) per row of Y for that row's exponent c."""
    U = x[None, :] ** (-c[:, None])  # [B, n]
    Uc = U - U.mean(axis=1, keepdims=True)
    b = np.einsum("bn,bn->b", Uc, Y - Y.mean(axis=1, keepdims=True)) / np.maximum(
        np.einsum("bn,bn->b", Uc, Uc), 1e-300)
    a = Y.mean(axis=1) - b * U.mean(axis=1)
    return a, b


def _power_law_batch(x: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """[B, 3] (a, b, c) of y = a + b x^-c for each row of Y (x >= 1): variable projection, c from a
    log-spaced grid refined by a parabola through the grid minimum and its neighbours (in log c)."""
    sse = _sse_over_c(x, Y, C_GRID)
    i = np.clip(np.argmin(sse, axis=1), 1, C_GRID.size - 2)
    rows = np.arange(Y.shape[0])
    s0, s1, s2 = sse[rows, i - 1], sse[rows, i], sse[rows, i + 1]
    step = np.log(C_GRID[1] / C_GRID[0])
    denom = s0 - 2 * s1 + s2
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(denom > 0, 0.5 * (s0 - s2) / denom, 0.0)
    logc = np.log(C_GRID[i]) + np.clip(shift, -1.0, 1.0) * step
    c = np.exp(logc)
    a, b = _ab_for_c(x, Y, c)
    return np.stack([a, b, c], axis=1)


def _power_law_point(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    """Best (a, b, c, sse) for one curve: the batch solution polished by a bounded 1-D search."""
    a, b, c = _power_law_batch(x, y[None, :])[0]
    j = int(np.searchsorted(C_GRID, c))
    lo, hi = C_GRID[max(j - 2, 0)], C_GRID[min(j + 1, C_GRID.size - 1)]

    def sse(cv: float) -> float:
        return float(_sse_over_c(x, y[None, :], np.array([cv]))[0, 0])

    res = minimize_scalar(sse, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    if res.fun < sse(c):
        c = float(res.x)
        a, b = (float(v[0]) for v in _ab_for_c(x, y[None, :], np.array([c])))
    return float(a), float(b), float(c), sse(c)


def fit_power_law(slots: Sequence[float], loss: Sequence[float], *, n_boot: int = 1000, level: float = 0.95,
                  seed: int = 0) -> PowerLawFit:
    """Fit loss against Engram slot count (non-finite losses dropped); needs >= 4 distinct slot counts."""
    s, y = check_xy(slots, loss, "slots")
    if np.any(s <= 0):
        raise ValueError("slots must be positive")
    ok = np.isfinite(y)
    s, y = s[ok], y[ok]
    if np.unique(s).size < 4:
        raise ValueError(f"a power law a + b s^-c needs finite losses at >= 4 distinct slot counts, "
                         f"got {np.unique(s).size}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    notes: list[str] = []
    s0 = float(s.min())
    x = s / s0
    a, b, c, sse = _power_law_point(x, y)
    n = y.size
    fitted = a + b * x ** (-c)
    L = np.stack([np.ones_like(s), np.log10(s)], axis=1)
    (alpha, beta), *_ = np.linalg.lstsq(L, y, rcond=None)
    fitted_ll = L @ np.array([alpha, beta])
    if c >= C_GRID[-2] or c <= C_GRID[1]:
        notes.append(f"power-law exponent at its search bound {C_BOUNDS}: the form is poorly identified")

    nan2 = [math.nan, math.nan]
    a_ci, c_ci, beta_ci = nan2, nan2, nan2
    if n_boot > 0 and n > 3:
        rng = np.random.default_rng(seed)
        q = expanded_quantiles(level, n - 3)
        r = (y - fitted) * math.sqrt(n / (n - 3))
        r = r - r.mean()
        Ys = fitted[None, :] + r[rng.integers(0, n, (n_boot, n))]
        boots = _power_law_batch(x, Ys)
        a_ci = [float(v) for v in np.quantile(boots[:, 0], q)]
        c_ci = [float(v) for v in np.quantile(boots[:, 2], q)]
        rl = (y - fitted_ll) * math.sqrt(n / (n - 2))
        rl = rl - rl.mean()
        Yl = fitted_ll[None, :] + rl[rng.integers(0, n, (n_boot, n))]
        coefs = np.linalg.lstsq(L, Yl.T, rcond=None)[0]
        beta_ci = [float(v) for v in np.quantile(coefs[1], expanded_quantiles(level, n - 2))]
    return PowerLawFit(
        a=a, b=b, c=c, s0=s0, a_ci=a_ci, c_ci=c_ci, rmse=math.sqrt(sse / n), alpha=float(alpha),
        beta=float(beta), beta_ci=beta_ci, rmse_loglinear=float(np.sqrt(np.mean((y - fitted_ll) ** 2))),
        n_points=int(n), n_boot=int(n_boot) if n > 3 else 0, level=float(level), decreasing=bool(b > 0 and c > 0),
        notes=notes)
