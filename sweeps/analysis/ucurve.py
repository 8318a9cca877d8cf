"""Allocation U-curve: loss against the expert share rho, with a verdict and calibrated intervals.

Model. ``y[run] = mu[rho] + s[seed] + e``, e ~ N(0, sigma^2). One free mean per sampled rho (no shape
assumed) and a fixed effect per seed (effect-coded, so mu is the average over seeds): a seed fixes the
data order for every rho, so its effect is shared across rho and cancels in every contrast between rho
values (a paired / blocked analysis). The curve between sampled rho is the not-a-knot cubic spline
through the seed-adjusted means mu (a parabola through 3 levels, a cubic through 4).

Why this model. The physically motivated U is a sum of power laws in the expert share and the table
share (``A rho^-a + B (1 - rho + s)^-b``): steep near the ends, lopsided in the middle. A global
quadratic, and any low-order polynomial fitted by least squares, is pulled by the steep ends (the
Huber quadratic this replaces misplaced rho* by up to 0.08 on such curves over the default grid
1.0..0.2); a local quadratic through the three best points by up to 0.05. The interpolating spline of
the means has no shape to be wrong about: on noise-free lopsided curves with optima in [0.6, 0.9] it
puts rho* within 0.03 of the truth (tests/unit/test_fit_shape.py), and it reproduces any cubic exactly.
The price is that it spends one parameter per rho, so the noise needs other degrees of freedom:

Noise. From the residuals of the means-plus-seeds model (pure error, (n_rho - 1)(n_seeds - 1) dof in a
complete design) when that has >= 3 dof or at least as many as the alternative; otherwise (one seed)
from the residuals of a quadratic-plus-seeds model (n_rho - 3 dof for one seed). Lack of fit of the
quadratic can only inflate that estimate: intervals get wider, never falsely narrow.

Intervals. Draws of mu from its exact posterior under a flat prior, a multivariate t with the noise's dof
(``mu_hat + sqrt(cov) z * sqrt(dof / chi2_dof)``): with 2 dof the tails are as heavy as they must be, with
no bootstrap quantile beyond its replicates. rho* gets the percentile interval of its draws, widened at
both ends by a shape-error term. Without it, the spline's own shape error (0.011 on the lopsided test
truth with 5 rho, 0.003 with 9) is a third of the interval once the means are known to ~0.002 nats (5
seeds at noise 0.005), and coverage fell below the floor (lopsided truth, nominal 90%, 300 sweeps: 5 rho x
10 seeds 80.3%, 5 rho x 5 seeds 87.7%). The term is the posterior mean of the gap between each draw's
spline rho* and the vertex of the parabola through its three best means: the two are exact on different
shapes (cubics, parabolas), so their gap measures how far the shape between knots can move rho*
(noise-free, over 300 lopsided truths on 5 / 9 rho, the gap is >= the spline's error in 74% / 92% of them
and short of it by <= 0.008 / 0.001; 0 on a parabola); averaging over the draws keeps noise from making it
small by chance. With it those designs cover 90.3% and 95.0%, all the designs of
tests/unit/test_fit_calibration.py cover 90.3-99.7% at nominal 90% and 95.3-100% at 95%, the interval is
~0.03-0.05 wider everywhere, and the power of "U" at gain = mde is unchanged (tests/unit/test_fit_power.py);
more rho values, not more seeds, shrink the term. Where the gap falls short of the error (a quarter of
lopsided truths on 5 rho), coverage still falls as seeds grow without bound.

The gain ``g = L(ref) - min L = max_r D(r)``, ``D(r) = L(ref) - L(r)``, is a maximum, so percentile
intervals of its draws are pulled by selection (the earlier shifted-percentile interval covered 86.8% at
nominal 90% with 5 rho x 2 seeds). Its interval now comes from a simultaneous band of D: D is linear in
mu, so the draws give the exact level-quantile c of ``max_r |D_draw - D_hat| / se``, every D(r) lies in
``D_hat +- c se`` with probability >= level, and then g lies in [max (D_hat - c se), max (D_hat + c se)].
Coverage >= level by construction, for any dof and seed effect (conservative: measured 96-100% at
nominal 90% and 95%, tests/unit/test_fit_calibration.py). The lower end is >= 0 (D(ref) = 0) and is > 0 only
when some rho beats rho_ref significantly. It treats the spline through the true means as the curve;
between knots the spline of a lopsided truth misstates its gain by <= 2e-4 nats on 5-9 rho in [0.2, 1].

Gain point. A maximum of noisy contrasts is biased upward: the plug-in ``g(mu_hat)`` is never negative and
reports noise as a gain (+0.7 .. +1.3 noise sd under a flat truth). Any point inside the gain's interval
is >= 0 (g is), so under a flat truth its mean is small only if it is 0 in most sweeps. The point is
therefore the one-sided lower bound of the same band at confidence q = ``GAIN_POINT_CONF`` (0.75): k = the
q-quantile of ``max_r (D_hat - D) / se`` (from the same draws), point = ``max_r (D_hat - k se)``. With
probability >= q every D(r) >= D_hat(r) - k se(r), so the true gain is >= the point in >= 75% of sweeps
for every truth, design and seed count (measured 85-94%); it is 0 in >= 75% of sweeps without an effect;
and k <= c, so it lies inside the interval (clipped into it when ``level`` < q). Measured over 200-300
sweeps per design (tests/unit/test_fit_calibration.py): under a flat truth its mean is +0.06 .. +0.18 noise sd
(5-9 rho x 1-5 seeds; +0.12 .. +0.14 with one seed); on the quadratic and lopsided truths (gains of 0.4-4
noise sd) it reads low by 0.22 .. 1.41 noise sd: conservative, the price of not reporting noise as gain;
the deficit is about k se, so it shrinks with the noise. The alternatives, measured on the same
simulations: the bias-corrected plug-in ``g(mu_hat) - (mean g(draws) - g(mu_hat))`` stays +0.07 (5 rho) ..
+0.85 (9 rho) noise sd high with one seed and falls below its interval in 20-50% of flat-truth sweeps;
cross-fitting (rho* chosen on half the seeds, the gain read on the other half) is centred on 0 under a
flat truth but negative in about half of those sweeps, i.e. outside its interval, and clipped into the
interval it is +0.2 .. +0.4 high; it needs 2+ seeds. The median bound (q = 0.5) is +0.26 .. +0.44 high
under a flat truth, q = 0.7 +0.12 .. +0.22; q = 0.75 is the smallest with a margin under 0.2 noise sd at
one seed.

Verdict (at ``level``, alpha = 1 - level):
  insufficient  fewer than 3 finished rho, or no degree of freedom left for the noise (reason given);
  flat          the F test of "all mu equal" (seed-adjusted; quadratic when the noise comes from it)
                does not reject: no allocation effect detectable. ``mde`` says what could have been;
  U             the F test rejects, the whole rho* interval lies strictly inside the sampled range and
                the gain interval excludes zero;
  monotone      the F test rejects, the fitted minimum is at an end of the range and the gain band puts
                some rho significantly above or below rho_ref (a significant slope);
  flat          (with a reason) when the F test rejects but the optimum is not located.
The F test gates every verdict other than "flat", so under a flat truth with Gaussian noise "U" occurs
in at most alpha of sweeps, whatever the design, seed effects included (they are in both models).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.special import fdtrc

from sweeps.analysis.fitutil import check_xy, effect_coding, json_safe, nan_list, ols, spline_matrix
from sweeps.analysis.power import BAND_STRIDE, GRID_POINTS, mde_of  # GRID_POINTS: resolution 0.0025 over [0.2, 1]


BAND_POINTS = 41  # pointwise band of the curve written to summary.json
PURE_MIN_DOF = 3
GAIN_POINT_CONF = 0.75  # the gain point is the band's one-sided lower bound at this confidence
VERDICTS = ("U", "flat", "monotone", "insufficient")


@dataclass
class UCurveFit:
    """A sweep's verdict, rho* and gain over rho_ref, with intervals (NaN / None when not estimable)."""

    verdict: str
    reason: str
    rho_star: float
    rho_star_ci: list[float]
    gain_vs_moe: float  # 75% lower bound of L(rho_ref) - min L (inside gain_vs_moe_ci; see the docstring)
    gain_vs_moe_ci: list[float]
    mde: float  # smallest gain this design detects at 80% power (see sweeps.analysis.power)
    p_effect: float  # F test of "loss does not depend on rho"
    level: float
    rho_ref: float
    loss_star: float
    loss_ref: float
    interior: bool  # fitted minimum strictly inside the sampled range
    rho_range: list[float]
    knots_rho: list[float]  # sampled rho levels
    knots_loss: list[float]  # seed-adjusted mean loss at each level (the spline's knots)
    sigma: float  # noise sd per run
    sigma_dof: int
    sigma_source: str  # "pure_error" | "quadratic_residuals" | "none"
    n_points: int
    n_rho: int
    n_seeds: int
    seeds_per_rho: list[int]
    outliers: list[int] = field(default_factory=list)  # input indices, |residual| > 3.5 robust sd (flagged, kept)
    n_draws: int = 0
    boot_interior_frac: float = math.nan  # share of draws whose minimum is interior
    rho_star_shape: float = math.nan  # shape-error term added to both ends of rho_star_ci (see the docstring)
    differs_from_ref: bool = False  # the gain band puts some rho significantly above or below rho_ref
    ref_extrapolated: bool = False
    band_rho: list[float] = field(default_factory=list)
    band_lo: list[float] = field(default_factory=list)
    band_hi: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gain_estimator: str = ""  # what gain_vs_moe is, in words (older summaries: another estimator)

    def predict(self, rho) -> np.ndarray:
        r = np.asarray(rho, dtype=np.float64)
        if len(self.knots_rho) < 2:
            return np.full(r.shape, math.nan)
        return _spline(np.asarray(self.knots_rho), np.asarray(self.knots_loss))(r)

    def to_dict(self) -> dict:
        return json_safe(asdict(self))

    @classmethod
    def from_dict(cls, d: dict) -> "UCurveFit":
        """Inverse of :meth:`to_dict` (JSON nulls become NaN)."""
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        for key in ("rho_star_ci", "gain_vs_moe_ci"):
            kw[key] = nan_list(kw.get(key))
        for key in ("rho_star", "gain_vs_moe", "mde", "p_effect", "loss_star", "loss_ref", "sigma",
                    "boot_interior_frac", "rho_star_shape"):
            kw[key] = math.nan if kw.get(key) is None else kw[key]
        return cls(**kw)


def _spline(levels: np.ndarray, values: np.ndarray) -> CubicSpline:
    """Not-a-knot cubic spline through (levels, values); values may be [R] or [R, B]."""
    return CubicSpline(levels, values, axis=0, bc_type="not-a-knot")


@lru_cache(maxsize=64)
def _grid_weights(levels: tuple[float, ...], ref: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(grid [G], W [G, R], w_ref [R]) for a design's rho levels (cached: simulations repeat designs)."""
    lv = np.asarray(levels)
    grid = np.linspace(lv[0], lv[-1], GRID_POINTS)
    return grid, spline_matrix(lv, grid), spline_matrix(lv, np.array([ref]))[0]


@dataclass
class _Model:
    """The linear models of one sweep: means+seeds (curve), quadratic+seeds, intercept+seeds."""

    levels: np.ndarray  # [R]
    mu: np.ndarray  # [R] seed-adjusted means
    mu_cov_unit: np.ndarray  # [R, R] covariance of mu / sigma^2
    sigma: float
    dof: int
    source: str
    p_effect: float
    std_resid: np.ndarray  # [n] residuals of the noise model / their robust scale (zeros when it is 0)


def _design(rho: np.ndarray, seeds: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """([n, R + S-1] one mean per rho level plus effect-coded seeds, [n, S-1] the seed columns alone)."""
    g = np.searchsorted(levels, np.round(rho, 9))
    seed_levels, s = np.unique(seeds, return_inverse=True)
    S = effect_coding(s, seed_levels.size)  # [n, S-1]
    onehot = (g[:, None] == np.arange(levels.size)[None, :]).astype(float)  # [n, R]
    return np.hstack([onehot, S]), S


def _models(rho: np.ndarray, seeds: np.ndarray, y: np.ndarray) -> _Model:
    levels = np.unique(np.round(rho, 9))
    Xc, S = _design(rho, seeds, levels)
    beta_c, rss_c, dof_c, inv_c = ols(Xc, y)
    z = (rho - levels.mean()) / max(np.ptp(levels) / 2, 1e-12)
    Xq = np.hstack([np.stack([np.ones_like(z), z, z * z], axis=1), S])
    beta_q, rss_q, dof_q, _ = ols(Xq, y)
    _, rss_0, dof_0, _ = ols(np.hstack([np.ones((y.size, 1)), S]), y)
    if dof_c >= 1 and (dof_c >= PURE_MIN_DOF or dof_c >= dof_q):
        rss, dof, source, fitted = rss_c, dof_c, "pure_error", Xc @ beta_c
    elif dof_q >= 1:
        rss, dof, source, fitted = rss_q, dof_q, "quadratic_residuals", Xq @ beta_q
    else:
        rss, dof, source, fitted = 0.0, 0, "none", y
    sigma = math.sqrt(rss / dof) if dof > 0 else math.nan
    if dof > 0 and rss > 0 and dof_0 > dof:
        F = ((rss_0 - rss) / (dof_0 - dof)) / (rss / dof)
        p = float(fdtrc(dof_0 - dof, dof, F))  # F survival function (the ufunc: fast)
    else:
        p = 0.0 if dof > 0 and rss_0 > 0 else math.nan  # exact data: any difference is real
    R = levels.size
    resid = y - fitted
    # Outliers are flagged against a robust scale (MAD, dof-corrected): the outlier itself inflates sigma.
    mad = 1.4826 * float(np.median(np.abs(resid))) * math.sqrt(y.size / dof) if dof > 0 else 0.0
    std_resid = resid / mad if mad > 0 else np.zeros_like(y)
    return _Model(levels, beta_c[:R], inv_c[:R, :R], sigma, dof, source, p, std_resid)


def _mu_draws(m: _Model, n_draws: int, rng: np.random.Generator) -> np.ndarray:
    """[B, R] draws of mu from its multivariate-t posterior (flat prior, sigma unknown with m.dof dof)."""
    w, V = np.linalg.eigh(m.mu_cov_unit)
    root = V * np.sqrt(np.clip(w, 0.0, None))  # [R, R]
    z = rng.standard_normal((n_draws, m.levels.size)) @ root.T
    scale = m.sigma * np.sqrt(m.dof / rng.chisquare(m.dof, size=(n_draws, 1)))
    return m.mu[None, :] + z * scale


def _argmin(curves: np.ndarray, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of curves [B, G]: (argmin rho refined by a parabola through the grid minimum, min value)."""
    i = np.argmin(curves, axis=1)
    rows = np.arange(curves.shape[0])
    j = np.clip(i, 1, grid.size - 2)
    c0, c1, c2 = curves[rows, j - 1], curves[rows, j], curves[rows, j + 1]
    denom = c0 - 2 * c1 + c2
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where((denom > 0) & (i == j), 0.5 * (c0 - c2) / denom, 0.0)
    shift = np.clip(shift, -0.5, 0.5)
    step = grid[1] - grid[0]
    return grid[i] + shift * step, curves[rows, i] - 0.25 * (c0 - c2) * shift * (i == j)


def fit_u_curve(rho: Sequence[float], loss: Sequence[float], seeds: Optional[Sequence[int]] = None, *,
                rho_ref: float = 1.0, n_boot: int = 4000, level: float = 0.95, seed: int = 0) -> UCurveFit:
    """Verdict, rho* and gain of an allocation sweep. ``seeds`` (one per run; default: all the same
    seed) makes the fit block on seeds; non-finite losses (failed runs) are dropped."""
    rho, loss = check_xy(rho, loss, "rho")
    seeds_arr = np.zeros(rho.size, dtype=np.int64) if seeds is None else np.asarray(seeds).ravel()
    if seeds_arr.size != rho.size:
        raise ValueError(f"seeds and rho differ in length ({seeds_arr.size} != {rho.size})")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 100:
        raise ValueError(f"n_boot must be >= 100 draws for a {level:.0%} interval, got {n_boot}")
    ok = np.flatnonzero(np.isfinite(loss))
    rho, loss, seeds_arr = rho[ok], loss[ok], seeds_arr[ok]
    levels = np.unique(np.round(rho, 9))
    base = _empty(rho, seeds_arr, levels, rho_ref, level)
    if levels.size < 3:
        base.reason = (f"{levels.size} finished rho value(s) {levels.tolist()}: a curve with an optimum needs "
                       f">= 3")
        return base
    m = _models(rho, seeds_arr, loss)
    if m.dof < 1:
        base.reason = (f"{rho.size} finished runs at {levels.size} rho values leave no degree of freedom for the "
                       f"noise: add seeds (or rho values)")
        return base
    rng = np.random.default_rng(seed)
    return _finish(base, m, ok, rho_ref, n_boot, level, rng)


def _empty(rho: np.ndarray, seeds: np.ndarray, levels: np.ndarray, rho_ref: float, level: float) -> UCurveFit:
    nan2 = [math.nan, math.nan]
    per_rho = [int(np.sum(np.round(rho, 9) == v)) for v in levels]
    rng_ = [float(levels[0]), float(levels[-1])] if levels.size else nan2
    return UCurveFit(
        verdict="insufficient", reason="", rho_star=math.nan, rho_star_ci=nan2, gain_vs_moe=math.nan,
        gain_vs_moe_ci=nan2, mde=math.nan, p_effect=math.nan, level=float(level), rho_ref=float(rho_ref),
        loss_star=math.nan, loss_ref=math.nan, interior=False, rho_range=rng_, knots_rho=[float(v) for v in levels],
        knots_loss=[], sigma=math.nan, sigma_dof=0, sigma_source="none",
        n_points=int(rho.size), n_rho=int(levels.size), n_seeds=int(np.unique(seeds).size), seeds_per_rho=per_rho)


def _finish(f: UCurveFit, m: _Model, idx_ok: np.ndarray, rho_ref: float, n_draws: int, level: float,
            rng: np.random.Generator) -> UCurveFit:
    lo, hi = float(m.levels[0]), float(m.levels[-1])
    ref = min(max(rho_ref, lo), hi)
    if ref != rho_ref:
        f.ref_extrapolated = True
        f.notes.append(f"rho_ref={rho_ref} outside the sampled range [{lo}, {hi}]: gain measured against rho={ref}")
    grid, W, w_ref = _grid_weights(tuple(float(v) for v in m.levels), ref)  # [G], [G, R], [R]
    draws = _mu_draws(m, n_draws, rng)  # [B, R]
    curves = draws @ W.T  # [B, G]
    rs, _ = _argmin(curves, grid)
    star, min_hat = _argmin((W @ m.mu)[None, :], grid)
    q = [(1 - level) / 2, (1 + level) / 2]
    f.rho_star = float(star[0])
    f.rho_star_shape = float(np.mean(np.abs(rs - _vertex(m.levels, draws))))  # the shape-error term
    r_lo, r_hi = np.quantile(rs, q)
    f.rho_star_ci = [max(float(r_lo) - f.rho_star_shape, lo), min(float(r_hi) + f.rho_star_shape, hi)]
    f.gain_vs_moe_ci, crit, worst_hi, f.gain_vs_moe = _gain_band(m, W, w_ref, draws, level)
    f.gain_estimator = f"{GAIN_POINT_CONF:.0%} lower bound"  # P(true gain >= gain_vs_moe) >= GAIN_POINT_CONF
    f.differs_from_ref = bool(f.gain_vs_moe_ci[0] > 0 or worst_hi < 0)
    f.loss_star, f.loss_ref = float(min_hat[0]), float(m.mu @ w_ref)
    f.interior = bool(lo + 1e-9 < f.rho_star < hi - 1e-9)
    f.boot_interior_frac = float(np.mean((rs > lo + 1e-9) & (rs < hi - 1e-9)))
    f.knots_loss = [float(v) for v in m.mu]
    f.sigma, f.sigma_dof, f.sigma_source, f.p_effect = m.sigma, m.dof, m.source, m.p_effect
    f.n_draws = int(n_draws)
    f.mde = mde_of(m.sigma, m.dof, f.seeds_per_rho, level, crit=crit if math.isfinite(crit) else None)
    f.outliers = [int(idx_ok[i]) for i in np.flatnonzero(np.abs(m.std_resid) > 3.5)]
    band = np.linspace(0, GRID_POINTS - 1, BAND_POINTS).astype(int)
    b_lo, b_hi = np.quantile(curves[:, band], q, axis=0)
    f.band_rho, f.band_lo, f.band_hi = grid[band].tolist(), b_lo.tolist(), b_hi.tolist()
    f.verdict, f.reason = verdict_of(f, 1 - level)
    return f


def _vertex(levels: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Per row of mu [B, R]: the vertex of the parabola through its three best means (the best level when
    that parabola is not convex; clipped to the range) [B]."""
    rows, R = np.arange(mu.shape[0]), levels.size
    i = np.argmin(mu, axis=1)
    j = np.clip(i, 1, R - 2)
    x0, x1, x2 = levels[j - 1], levels[j], levels[j + 1]
    y0, y1, y2 = mu[rows, j - 1], mu[rows, j], mu[rows, j + 1]
    num = (x1 - x0) ** 2 * (y1 - y2) - (x1 - x2) ** 2 * (y1 - y0)
    den = (x1 - x0) * (y1 - y2) - (x1 - x2) * (y1 - y0)
    convex = (y2 - y1) / (x2 - x1) > (y1 - y0) / (x1 - x0)
    with np.errstate(divide="ignore", invalid="ignore"):
        v = np.where(convex, x1 - 0.5 * num / den, levels[i])
    return np.clip(v, levels[0], levels[-1])


def _gain_band(m: _Model, W: np.ndarray, w_ref: np.ndarray, draws: np.ndarray,
               level: float) -> tuple[list[float], float, float, float]:
    """Interval of the gain ``g = max_r D(r)``, ``D(r) = L(ref) - L(r)``, from a simultaneous band of D.

    D is linear in mu, so ``(D_hat - D) / se`` is multivariate t with the noise's dof, and the draws give
    the level-quantile c of its maximum over the grid. With probability >= level every D(r) lies in
    ``D_hat(r) +- c se(r)``, and then g (a maximum of D) lies in [max (D_hat - c se), max (D_hat + c se)]:
    coverage >= level whatever the dof, with no selection bias to correct (the lower end is >= 0 because
    D(ref) = 0; it is > 0 only when some rho beats rho_ref significantly). Also returns c (for ``mde``)
    and min (D_hat + c se) over rho != ref: < 0 when some rho is significantly worse than rho_ref, and the
    point ``max (D_hat - k se)``, k the one-sided GAIN_POINT_CONF quantile (see the module docstring).
    """
    C = w_ref[None, :] - W[::BAND_STRIDE]  # [G', R]: every 4th grid point (0.01 apart on [0.2, 1])
    d_hat = C @ m.mu  # [G']
    se = m.sigma * np.sqrt(np.clip(np.einsum("gr,rs,gs->g", C, m.mu_cov_unit, C), 0.0, None))  # [G]
    dev = (draws - m.mu[None, :]) @ C.T  # [B, G']
    ok = se > 1e-12 * max(m.sigma, 1e-300)
    if not ok.any():
        return [0.0, 0.0], math.nan, 0.0, 0.0
    t = dev[:, ok] / se[ok]  # [B, G'']: (D_draw - D_hat) / se; -t is distributed as (D_hat - D) / se
    c = float(np.quantile(np.max(np.abs(t), axis=1), level))
    k = float(np.quantile(np.max(-t, axis=1), GAIN_POINT_CONF))  # one-sided: D >= D_hat - k se everywhere
    upper = d_hat + c * se
    ci = [max(0.0, float(np.max(d_hat - c * se))), float(np.max(upper))]
    point = float(np.clip(np.max(d_hat - k * se), *ci))  # the ref row (D = 0, se = 0) keeps it >= 0
    return ci, c, float(np.min(upper[ok])), point


def verdict_of(f: UCurveFit, alpha: float) -> tuple[str, str]:
    """The verdict and its one-line reason from a fitted sweep (see the module docstring)."""
    lo, hi = f.rho_range
    p = f.p_effect
    if not p < alpha:
        return "flat", (f"no allocation effect detected (F test p = {p:.2g}); this design detects a gain of "
                        f"{f.mde:.4f} nats with 80% power")
    inside = f.rho_star_ci[0] > lo + 1e-9 and f.rho_star_ci[1] < hi - 1e-9
    if inside and f.gain_vs_moe_ci[0] > 0:
        return "U", f"interior optimum (F test p = {p:.2g}); rho* and gain intervals clear the ends and zero"
    if not f.interior:
        end = "low" if f.rho_star < 0.5 * (lo + hi) else "high"
        if not f.differs_from_ref:
            return "flat", (f"loss depends on rho (F test p = {p:.2g}), lowest at the {end} end, but no rho differs "
                            f"significantly from rho={f.rho_ref:g} (no significant slope)")
        return "monotone", (f"loss depends on rho (F test p = {p:.2g}), best at the {end} end of the range, with a "
                            f"significant slope")
    why = "rho* interval reaches an end of the range" if not inside else "gain interval includes zero"
    return "flat", f"loss depends on rho (F test p = {p:.2g}) but the optimum is not located: {why}"
