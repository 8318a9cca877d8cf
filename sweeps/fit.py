"""U-curve and power-law fits with bootstrap confidence intervals.

U-curve (allocation sweep at one budget). Validation loss L against the expert share rho is fit by a
quadratic ``L(rho) = b0 + b1 z + b2 z^2`` in the standardised coordinate ``z = (rho - m) / h`` (m, h:
centre and half-width of the sampled range, for conditioning). The fit is a Huber M-estimate solved by
iteratively re-weighted least squares (k = 1.345 sigma, 95% efficiency under Gaussian noise), so one
bad run (a loss spike, a half-diverged seed) moves it little. The noise scale sigma is estimated once:
from the spread of seeds around their rho's mean when every rho has several seeds ("pure error"),
otherwise from the least-squares residuals; both through the MAD, so outliers do not inflate it.

    rho*          argmin of the fitted quadratic over the sampled range [rho_min, rho_max]; equal to
                  the vertex -b1 / (2 b2) when the curve is convex with its vertex inside the range
                  (``interior`` = True), otherwise the better end point (no U was observed).
    gain_vs_moe   L_fit(rho_ref) - L_fit(rho*), rho_ref = 1 (all sparse parameters in experts).
                  Non-negative by construction when rho_ref lies in the sampled range.

Confidence intervals are percentile intervals of a bootstrap that keeps the design (the rho grid)
fixed and refits the robust quadratic on every replicate:

* ``strata`` (chosen by "auto" when every rho has >= 3 finite seeds): seeds are resampled with
  replacement within each rho. Deviations from the rho mean are inflated by sqrt(n_g / (n_g - 1))
  before resampling, so that the bootstrap variance of a rho's mean equals s_g^2 / n_g rather than
  the (n_g - 1)/n_g too-small plug-in value.
* ``residual`` (otherwise): residuals of the robust fit, corrected for leverage (r_i / sqrt(1 - h_ii))
  and centred, are resampled onto the fitted curve. With 2 seeds per rho a stratum has only three
  distinct bootstrap means and ``strata`` under-covers (81% for a nominal 90% in 300 synthetic
  sweeps of 5 rho x 2 seeds, against 88% for ``residual``), hence the threshold of 3.

A sweep has few degrees of freedom (5 rho values x 1-3 seeds), and a plain percentile interval then
acts as if the noise scale were known: with 2 residual dof a nominal 90% interval covers about 75%.
Intervals are therefore *expanded percentile* intervals (Hesterberg 2015, adapted to regression): the
bootstrap quantiles are read at the normal tail probability matching Student's t with the dof the
noise is estimated with (pure-error dof for ``strata``, n - 3 for ``residual``).

Power law ("infinite memory": fixed backbone, Engram slots on a log scale): ``L = a + b (s/s0)^-c``
fit by variable projection (a, b in closed form for each c; c on a log grid, refined), and the
log-linear form the paper reports, ``L = alpha + beta log10(s)`` (beta = change in loss per decade
of slots), both with expanded residual-bootstrap intervals.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Optional, Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.stats import norm, t as student_t

HUBER_K = 1.345
BAND_POINTS = 41  # grid of the pointwise confidence band of the fitted curve
STRATA_MIN_SEEDS = 3  # "auto" resamples seeds within rho only from this many seeds per rho up
MAD_TO_SIGMA = 1.4826  # 1 / Phi^-1(3/4): the MAD of a Gaussian sample times this estimates sigma


# --------------------------------------------------------------------------------------------------
# Robust quadratic (vectorised over bootstrap replicates)
# --------------------------------------------------------------------------------------------------
def _design(z: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(z), z, z * z], axis=1)


def huber_irls(X: np.ndarray, Y: np.ndarray, scale: float, k: float = HUBER_K, max_iter: int = 200,
               tol: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """Huber M-estimate of ``Y ~ X beta`` with a fixed noise scale, for a batch of responses.

    X: [n, p] design; Y: [B, n] responses (one row per replicate). Returns (beta [B, p], weights [B, n]).
    Starts from ordinary least squares; weights w = min(1, k * scale / |r|); a replicate stops
    iterating once its coefficients move by less than ``tol`` (relative).
    """
    Y = np.atleast_2d(np.asarray(Y, dtype=np.float64))
    beta = np.linalg.lstsq(X, Y.T, rcond=None)[0].T  # [B, p]
    if not scale > 0:  # exact data or no residual dof: nothing to down-weight
        return beta, np.ones_like(Y)
    thresh = k * scale

    def weights(b, y):
        r = y - b @ X.T
        return np.minimum(1.0, thresh / np.maximum(np.abs(r), 1e-300))

    active = np.arange(Y.shape[0])
    for _ in range(max_iter):
        if active.size == 0:
            break
        b, y = beta[active], Y[active]
        w = weights(b, y)
        XtW = X.T[None, :, :] * w[:, None, :]  # [A, p, n]
        new = np.linalg.solve(XtW @ X, np.einsum("apn,an->ap", XtW, y)[..., None])[..., 0]
        moved = np.max(np.abs(new - b), axis=1) > tol * (1.0 + np.max(np.abs(new), axis=1))
        beta[active] = new
        active = active[moved]
    return beta, weights(beta, Y)


def _group_index(rho: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rho values (to 1e-9) and each point's group index."""
    keys = np.round(rho, 9)
    levels, inverse = np.unique(keys, return_inverse=True)
    return levels, inverse


def _pure_error_deviations(y: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Deviations from each group's mean, scaled by sqrt(n_g/(n_g-1)) so each has variance sigma^2."""
    dev = np.zeros_like(y)
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        n_g = idx.size
        if n_g < 2:
            continue
        dev[idx] = (y[idx] - y[idx].mean()) * math.sqrt(n_g / (n_g - 1))
    return dev


def robust_scale(residuals: np.ndarray, dof_correction: float = 1.0) -> float:
    """MAD-based sigma of (approximately zero-centred) residuals."""
    r = np.asarray(residuals, dtype=np.float64)
    if r.size == 0:
        return 0.0
    return float(MAD_TO_SIGMA * np.median(np.abs(r - np.median(r))) * dof_correction)


def expanded_quantiles(level: float, dof: int) -> list[float]:
    """Bootstrap quantiles [lo, hi] of an expanded percentile interval: the normal tail probability at
    Student's t critical value for ``dof`` degrees of freedom (the plain percentile interval as dof -> inf)."""
    if dof < 1:
        raise ValueError(f"need >= 1 degree of freedom for an interval, got {dof}")
    tail = float(norm.sf(student_t.isf((1.0 - level) / 2.0, dof)))
    return [tail, 1.0 - tail]


def _argmin_on_range(beta: np.ndarray, z_lo: float, z_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Minimiser of b0 + b1 z + b2 z^2 over [z_lo, z_hi] per row of beta, and whether it is interior."""
    b1, b2 = beta[:, 1], beta[:, 2]
    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(b2 > 0, -b1 / (2.0 * b2), np.nan)
    interior = (b2 > 0) & (vertex > z_lo) & (vertex < z_hi)

    def value(z):
        return beta[:, 0] + b1 * z + b2 * z * z

    end = np.where(value(z_lo) <= value(z_hi), z_lo, z_hi)
    return np.where(interior, vertex, end), interior


# --------------------------------------------------------------------------------------------------
# Public U-curve fit
# --------------------------------------------------------------------------------------------------
@dataclass
class UCurveFit:
    """A robust quadratic fit of loss against rho, with bootstrap intervals (NaN when not estimable)."""

    coef: list[float]  # [c0, c1, c2] of L(rho) = c0 + c1 rho + c2 rho^2 (raw rho)
    rho_star: float
    rho_star_ci: list[float]  # [low, high]
    loss_star: float
    rho_ref: float
    loss_ref: float  # fitted loss at rho_ref
    gain_vs_moe: float
    gain_vs_moe_ci: list[float]
    interior: bool  # convex with vertex strictly inside the sampled range (a U was observed)
    vertex: Optional[float]  # the unclipped vertex (None if the fit is not convex)
    rho_range: list[float]
    scale: float  # robust noise sigma used by the Huber weights
    scale_source: str  # "pure_error" | "residuals" | "none"
    n_points: int
    n_rho: int
    outliers: list[int]  # indices (into the input) of points with |residual| > 3 sigma
    bootstrap: str  # "strata" | "residual" | "none"
    n_boot: int
    level: float
    boot_interior_frac: float  # share of replicates whose minimum is interior
    ref_extrapolated: bool  # rho_ref lies outside the sampled range
    band_rho: list[float] = field(default_factory=list)  # pointwise bootstrap band of the fitted curve
    band_lo: list[float] = field(default_factory=list)
    band_hi: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def predict(self, rho) -> np.ndarray:
        r = np.asarray(rho, dtype=np.float64)
        c0, c1, c2 = self.coef
        return c0 + c1 * r + c2 * r * r

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "UCurveFit":
        """Inverse of :meth:`to_dict` (JSON nulls in intervals become NaN)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("rho_star_ci", "gain_vs_moe_ci"):
            kw[key] = [math.nan if v is None else v for v in kw.get(key) or [None, None]]
        for key in ("boot_interior_frac", "scale"):
            if kw.get(key) is None:
                kw[key] = math.nan
        return cls(**kw)


def json_safe(obj):
    """``obj`` with non-finite floats as None and numpy scalars as Python numbers (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    return obj


def _check_xy(x: Sequence[float], y: Sequence[float], xname: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"{xname} and loss differ in length ({x.size} != {y.size})")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{xname} contains non-finite values")
    return x, y


def fit_u_curve(rho: Sequence[float], loss: Sequence[float], *, rho_ref: float = 1.0, n_boot: int = 2000,
                level: float = 0.95, bootstrap: str = "auto", seed: int = 0) -> UCurveFit:
    """Fit the U-curve of loss vs rho; non-finite losses (failed runs) are dropped.

    bootstrap: "auto" (strata when every rho has >= 3 finite seeds, else residual), "strata",
    "residual" or "none".
    """
    rho, loss = _check_xy(rho, loss, "rho")
    if bootstrap not in ("auto", "strata", "residual", "none"):
        raise ValueError(f"bootstrap must be auto, strata, residual or none, got {bootstrap!r}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    ok = np.isfinite(loss)
    idx_ok = np.flatnonzero(ok)
    rho, loss = rho[ok], loss[ok]
    levels, groups = _group_index(rho)
    if levels.size < 3:
        raise ValueError(f"a quadratic U-curve needs finite losses at >= 3 distinct rho values, got {levels.size}")
    notes: list[str] = []
    lo, hi = float(levels[0]), float(levels[-1])
    m, h = 0.5 * (lo + hi), 0.5 * (hi - lo)
    X = _design((rho - m) / h)
    n, p = X.shape
    counts = np.bincount(groups)
    replicated = bool(np.all(counts >= 2))
    strata_default = bool(np.all(counts >= STRATA_MIN_SEEDS))

    # Noise scale: pure error from seeds if there are enough of them, else MAD of least-squares residuals.
    pure_dof = int(np.sum(np.maximum(counts - 1, 0)))
    if pure_dof >= 3:
        dev = _pure_error_deviations(loss, groups)
        scale, scale_source = robust_scale(dev[counts[groups] >= 2]), "pure_error"
    elif n > p:
        ols = np.linalg.lstsq(X, loss, rcond=None)[0]
        scale = robust_scale(loss - X @ ols, math.sqrt(n / (n - p)))
        scale_source = "residuals"
    else:
        scale, scale_source = 0.0, "none"
        notes.append("as many parameters as points: the quadratic interpolates, no noise estimate")

    beta, w = huber_irls(X, loss[None, :], scale)
    beta = beta[0]
    w = w[0]
    z_lo, z_hi = -1.0, 1.0
    z_star, interior = _argmin_on_range(beta[None, :], z_lo, z_hi)
    z_star, interior = float(z_star[0]), bool(interior[0])
    vertex = float(m + h * (-beta[1] / (2 * beta[2]))) if beta[2] > 0 else None
    if not interior:
        notes.append("no interior minimum: the fitted curve is not a U over the sampled range")
    z_ref = (rho_ref - m) / h
    ref_extrapolated = not (lo - 1e-9 <= rho_ref <= hi + 1e-9)
    if ref_extrapolated:
        notes.append(f"rho_ref={rho_ref} outside the sampled range [{lo}, {hi}]: gain is extrapolated")

    def curve(b: np.ndarray, z) -> np.ndarray:
        return b[..., 0] + b[..., 1] * z + b[..., 2] * z * z

    loss_star = float(curve(beta, z_star))
    loss_ref = float(curve(beta, z_ref))
    fitted = X @ beta
    resid = loss - fitted
    outliers = [int(idx_ok[i]) for i in np.flatnonzero(np.abs(resid) > 3 * scale)] if scale > 0 else []

    # Raw-rho coefficients: z = (rho - m)/h.
    b0, b1, b2 = beta
    coef = [b0 - b1 * m / h + b2 * m * m / (h * h), b1 / h - 2 * b2 * m / (h * h), b2 / (h * h)]

    method = bootstrap
    if method == "auto":
        method = "strata" if strata_default else "residual"
    if method == "strata" and not replicated:
        raise ValueError("bootstrap='strata' needs >= 2 finite seeds at every rho")
    if method == "residual" and n <= p:
        method = "none"
        notes.append("no residual degrees of freedom: no bootstrap interval")
    nan2 = [math.nan, math.nan]
    rho_ci, gain_ci, interior_frac = nan2, nan2, math.nan
    band: tuple[list, list, list] = ([], [], [])
    if method != "none" and n_boot > 0:
        rng = np.random.default_rng(seed)
        if method == "strata":
            Ystar = _strata_replicates(loss, groups, n_boot, rng)
        else:
            Ystar = _residual_replicates(X, fitted, resid, w, scale, n_boot, rng)
        bstar, _ = huber_irls(X, Ystar, scale)
        zs, ints = _argmin_on_range(bstar, z_lo, z_hi)
        gains = curve(bstar, z_ref) - curve(bstar, zs)
        dof = pure_dof if method == "strata" else n - p
        q = expanded_quantiles(level, dof)
        rho_ci = [float(v) for v in m + h * np.quantile(zs, q)]
        gain_ci = [float(v) for v in np.quantile(gains, q)]
        interior_frac = float(np.mean(ints))
        zg = np.linspace(-1.0, 1.0, BAND_POINTS)
        curves = bstar[:, :1] + bstar[:, 1:2] * zg + bstar[:, 2:3] * zg * zg  # [B, G]
        lo_band, hi_band = np.quantile(curves, q, axis=0)
        band = ([float(v) for v in m + h * zg], [float(v) for v in lo_band], [float(v) for v in hi_band])
    else:
        method = "none"

    return UCurveFit(
        coef=[float(c) for c in coef], rho_star=float(m + h * z_star), rho_star_ci=rho_ci, loss_star=loss_star,
        rho_ref=float(rho_ref), loss_ref=loss_ref, gain_vs_moe=loss_ref - loss_star, gain_vs_moe_ci=gain_ci,
        interior=interior, vertex=vertex, rho_range=[lo, hi], scale=float(scale), scale_source=scale_source,
        n_points=int(n), n_rho=int(levels.size), outliers=outliers, bootstrap=method,
        n_boot=int(n_boot) if method != "none" else 0, level=float(level), boot_interior_frac=interior_frac,
        ref_extrapolated=ref_extrapolated, band_rho=band[0], band_lo=band[1], band_hi=band[2], notes=notes)


def _strata_replicates(y: np.ndarray, groups: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n] responses: each rho's seeds resampled with replacement (variance-corrected)."""
    out = np.empty((n_boot, y.size))
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        n_g = idx.size
        mean = y[idx].mean()
        dev = (y[idx] - mean) * math.sqrt(n_g / (n_g - 1))
        pick = rng.integers(0, n_g, size=(n_boot, n_g))
        out[:, idx] = mean + dev[pick]
    return out


def _residual_replicates(X: np.ndarray, fitted: np.ndarray, resid: np.ndarray, w: np.ndarray, scale: float,
                         n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """[n_boot, n] responses: fitted curve + resampled leverage-corrected, centred residuals.

    Centring uses the Huber location of the residuals (their mean after clipping at k sigma), which
    is what the robust fit sets to zero: the plain mean would let one outlier shift every replicate.
    """
    Xw = X * np.sqrt(w)[:, None]
    hat = np.einsum("ij,jk,ik->i", Xw, np.linalg.pinv(Xw.T @ Xw), Xw)
    adj = resid / np.sqrt(np.clip(1.0 - hat, 1e-6, None))
    clip = HUBER_K * scale if scale > 0 else np.inf
    adj = adj - np.mean(np.clip(adj, -clip, clip))
    pick = rng.integers(0, adj.size, size=(n_boot, adj.size))
    return fitted[None, :] + adj[pick]


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
    s, y = _check_xy(slots, loss, "slots")
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
