"""No shape bias: on noise-free lopsided U-curves (sums of power laws in the expert share and the table
share, optima in [0.6, 0.9]) the point estimate of rho* is within 0.03 of the truth over the default grid."""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

from sweeps.analysis.ucurve import fit_u_curve

DEFAULT_GRID = np.array([1.0, 0.8, 0.6, 0.4, 0.2])  # sweeps/run.py DEFAULT_RHOS


def lopsided_family(rng, n):
    """L = rho^-a + B (1 - rho + s)^-b with a, b in [0.2, 0.8], s in [0.1, 0.5], B log-uniform; kept when
    the optimum lies in [0.6, 0.9]. Returns [(loss function, true optimum)]."""
    out = []
    while len(out) < n:
        a, b, s = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.5)
        B = float(np.exp(rng.uniform(np.log(0.01), np.log(10.0))))

        def loss(r, a=a, b=b, s=s, B=B):
            return np.asarray(r) ** -a + B * (1.0 - np.asarray(r) + s) ** -b

        r = minimize_scalar(loss, bounds=(0.2, 1.0), method="bounded", options={"xatol": 1e-10}).x
        if 0.6 <= r <= 0.9:
            out.append((loss, float(r)))
    return out


def test_rho_star_has_no_shape_bias_on_lopsided_curves():
    rng = np.random.default_rng(0)
    errors = []
    for loss, r_true in lopsided_family(rng, 300):
        y = loss(DEFAULT_GRID) + 1e-7 * np.array([1, -1, 1, -1, 1])  # noise-free up to rounding
        f = fit_u_curve(DEFAULT_GRID, y, n_boot=100)
        errors.append(abs(f.rho_star - r_true))
    worst = max(errors)
    print(f"lopsided truths: max |rho* error| {worst:.4f}, 95th percentile {np.quantile(errors, 0.95):.4f}")
    assert worst <= 0.03, f"max |rho* error| {worst:.4f} > 0.03 over 300 lopsided truths"


def test_quadratic_fit_would_have_been_biased():
    """The same truths through a global quadratic: the bias this model removes (guards the test's power)."""
    rng = np.random.default_rng(0)
    xs = np.linspace(0.2, 1.0, 4001)
    worst = max(abs(xs[np.argmin(np.polyval(np.polyfit(DEFAULT_GRID, loss(DEFAULT_GRID), 2), xs))] - r)
                for loss, r in lopsided_family(rng, 300))
    print(f"global quadratic on the same truths: max |rho* error| {worst:.4f}")
    assert worst > 0.05


def test_shape_error_term_sizes_the_spline_error():
    """The rho* interval's shape-error term (sweeps.analysis.ucurve): the gap between the spline's rho* and the vertex
    of the parabola through the three best means covers the spline's own error on most lopsided truths and
    falls short by little; on a parabola it is 0."""
    from sweeps.analysis.ucurve import _vertex

    rng = np.random.default_rng(0)
    levels = np.sort(DEFAULT_GRID)
    rows = []
    for loss, r_true in lopsided_family(rng, 300):
        mu = loss(levels)
        f = fit_u_curve(levels, mu + 1e-7 * np.array([1, -1, 1, -1, 1]), n_boot=100)
        rows.append((abs(f.rho_star - r_true), abs(f.rho_star - _vertex(levels, mu[None, :])[0])))
    err, gap = np.array(rows).T
    share, short = float(np.mean(err <= gap)), float(np.max(err - gap))
    parabola = _vertex(levels, (3.0 + (levels - 0.73) ** 2)[None, :])[0]
    msg = f"gap >= error on {share:.1%} of 300 lopsided truths, short by <= {short:.4f}; parabola vertex {parabola:.4f}"
    print(msg)
    assert share >= 0.7 and short <= 0.01 and abs(parabola - 0.73) < 1e-9, msg
